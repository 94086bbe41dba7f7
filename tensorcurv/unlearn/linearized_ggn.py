"""The data GGN of the unlearning objective at a fixed ``θ`` on a fixed data set, with the network linearized once.

For ``f(X; θ)`` with outputs ``z_i`` (``(N, C)``) and the loss-Hessian factor ``S_i`` (``S_i S_iᵀ = ∇²_z ℓ_i``,
``losses.py``), the weighted data GGN is

    G_w v = Σ_i w_i J_iᵀ S_i S_iᵀ J_i v,          J_i = ∂z_i/∂θ   (w_i = 1: the GGN of the sum loss).

:class:`LinearizedGGN` pays once for ``torch.func.linearize`` (a traced JVP of ``θ ↦ f(X; θ)``),
``torch.func.vjp`` (the retained backward graph) at ``θ`` and one product (the trace's first call is slower); a
product is then one JVP through the trace and one VJP, about a forward pass each, where
:meth:`~tensorcurv.unlearn.objective.Objective.ggn_vp` re-runs the forward pass and differentiates twice. The
same product as ``Objective.ggn_vp`` (without ``μ``), so the GGN of a corrected data set ``D̃`` at ``θ*`` is a
re-weighting: ``w_i = 0`` on removed rows, and for rows whose features change the product on the new rows is
added (``Objective.ggn_vp`` on ``Z̃``, ``|Z̃|`` rows). Labels do not enter ``G`` (``S`` depends on the outputs
only), so a relabel keeps ``w = 1``. Flat ``θ`` and ``v`` in the ``Objective`` convention (``named_parameters``
order).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.func import linearize, vjp

from tensorcurv.unlearn.objective import Objective


class LinearizedGGN:
    """``v ↦ Σ_i w_i J_iᵀ S_i S_iᵀ J_i v`` at ``theta`` on ``X`` (module docstring); ``setup_time`` is the one-off."""

    def __init__(self, obj: Objective, theta: Tensor, X: Tensor) -> None:
        if X.shape[0] == 0:
            raise ValueError("linearized GGN: the data set is empty")
        theta = theta.detach()

        def outputs(t: Tensor) -> Tensor:
            return obj.outputs(t, X)

        with warnings.catch_warnings():  # linearize's tracer warns (embedded constants, torch.jit); not actionable
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            z, self._jvp = linearize(outputs, theta)
        self._vjp = vjp(outputs, theta)[1]
        self.S = obj.loss.hessian_factor(z.detach()).to(z.dtype)  # (N, C, K)
        self.N = X.shape[0]
        self.mv(torch.zeros_like(theta))  # the traced JVP's first call is ~3x slower: it belongs to the one-off

    def mv(self, v: Tensor, weights: Tensor | None = None) -> Tensor:
        """``G_w v``; ``weights``: ``(N,)`` per-row weights ``w_i`` (None: all 1)."""
        jv = self._jvp(v)  # (N, C)
        s = torch.einsum("nck,nc->nk", self.S, jv)
        if weights is not None:
            if weights.shape != (self.N,):
                raise ValueError(f"linearized GGN: weights must have shape ({self.N},), got {tuple(weights.shape)}")
            s = s * weights.to(s.dtype).unsqueeze(1)
        (out,) = self._vjp(torch.einsum("nck,nk->nc", self.S, s))
        return out
