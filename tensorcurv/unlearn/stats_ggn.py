"""Unlearning's view of the captured per-sample factors: flat ``θ`` ↔ layer matrices, and gradients in closed form.

The exact GGN of the covered parameters as an operator on the factors is
:class:`tensorcurv.core.exact.ExactModel` (``coupling="full"``: cross-layer, ``"block"``: block diagonal;
for a one-layer model such as logistic regression both are the exact GGN = Hessian). :class:`ParamLayout`
maps the flat parameter vector of the unlearning objective onto its layer matrices.

With ``g`` captured as the columns of ``J_sᵀ S_s`` (capture kind ``ggn``, ``S_s S_sᵀ = ∇²_z ℓ_s``), the same
columns give per-sample gradients in closed form: if ``S_s c_s = ∇_z ℓ_s`` then ``Σ_k c_sk G_sk = ∇_W ℓ_s``
(:func:`output_coefficients`, :func:`stats_gradient`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tensorcurv.core.exact import weighted_gradient_sum
from tensorcurv.core.losses import CrossEntropy, LossSpec, MeanSquaredError
from tensorcurv.core.stats import LayerStats


class ParamLayout:
    """Flat ``θ`` (trainable parameters in ``named_parameters()`` order) ↔ one ``[W, b]`` matrix per layer.

    Built from ``Curvature.adapters``; every trainable parameter must belong to a covered layer
    (otherwise the stats operator would not be the GGN of all of ``θ``).
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], adapters: Mapping) -> None:
        by_id = {id(p): i for i, (_, p) in enumerate(named_params)}
        self.numels = [p.numel() for _, p in named_params]
        self.shapes = [p.shape for _, p in named_params]
        self.layers = [(name, ad, [by_id[id(p)] for _, p in ad.params()]) for name, ad in adapters.items()]
        covered = {i for _, _, idx in self.layers for i in idx}
        missing = [n for i, (n, _) in enumerate(named_params) if i not in covered]
        if missing:
            raise ValueError(f"parameters {missing} are not in a covered layer; the stats GGN operator needs "
                             "every trainable parameter inside a Linear/Conv2d block")

    def to_mats(self, v: Tensor) -> dict[str, Tensor]:
        parts = [t.view(s) for t, s in zip(v.split(self.numels), self.shapes)]
        return {name: ad.to_matrix([parts[i] for i in idx]) for name, ad, idx in self.layers}

    def to_flat(self, mats: Mapping[str, Tensor]) -> Tensor:
        parts: list[Tensor | None] = [None] * len(self.numels)
        for name, ad, idx in self.layers:
            for i, t in zip(idx, ad.from_matrix(mats[name])):
                parts[i] = t.reshape(-1)
        return torch.cat(parts)


def output_coefficients(loss: LossSpec, outputs: Tensor, targets: Tensor) -> Tensor:
    """``c_s`` (N, K) with ``S_s c_s = ∇_z ℓ_s`` for the loss-Hessian factor ``S`` of ``losses.py``.

    Cross-entropy: ``S = (I − p1ᵀ) diag(√p)``, so ``c = √p − e_y/√p_y`` (``S c = p − e_y``).
    MSE: ``S = √(2ρ) I``, so ``c = ∇_z ℓ / √(2ρ)``. ``ValueError`` where no closed form applies
    (another loss, or ``p_y`` so small that ``1/√p_y`` overflows).
    """
    if isinstance(loss, CrossEntropy):
        p = outputs.softmax(-1)
        py = p.gather(1, targets.unsqueeze(1))
        if bool((py < 1e-250).any()):
            raise ValueError("a probability of the true class underflows; no stable closed-form coefficient")
        c = p.sqrt()
        c.scatter_add_(1, targets.unsqueeze(1), -py.rsqrt())
        return c
    if isinstance(loss, MeanSquaredError):
        return loss.output_gradient(outputs, targets) / (2.0 * loss.rho(outputs)) ** 0.5
    raise ValueError(f"no closed-form per-sample gradient from GGN statistics for loss {type(loss).__name__}")


def stats_gradient(stats: Mapping[str, LayerStats], coeffs: Tensor) -> dict[str, Tensor]:
    """``Σ_{s,k} c_sk G_sk`` per layer (no scale): with :func:`output_coefficients` the summed
    per-sample gradient ``Σ_s ∇_W ℓ_s`` of every layer's ``[W, b]``."""
    return {k: weighted_gradient_sum(st, coeffs) for k, st in stats.items()}
