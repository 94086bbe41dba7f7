"""The exact GGN as an operator on the per-sample factors ``a``, ``g`` that structures are fitted from.

For one layer's :class:`~tensorcurv.core.stats.LayerStats` (``a`` (N, T, n), ``g`` (N, K, T, m), scale ``c``)

    C_l vec(V) = c Σ_{s,k} w_sk vec(G_sk),   w_sk = ⟨G_sk, V⟩ = Σ_t g_sktᵀ V a_st,   G_sk = Σ_t g_skt a_stᵀ

(column-major ``vec``): two products with ``a`` and two with ``g`` per call, ``G`` is never formed.
With ``g`` captured as the columns of ``J_sᵀ S_s`` (capture kind ``ggn``, ``S_s S_sᵀ = ∇²_z ℓ_s``), the
stacked ``u_sk = (vec G^{(l)}_sk)_l`` over all layers are the columns of ``J_sᵀ S_s``, so the *full* GGN
of the covered parameters is ``c Σ_{s,k} u_sk u_skᵀ``: ``coupling="full"`` sums ``w_sk`` over layers (exact,
cross-layer), ``"block"`` keeps each layer's own ``w`` (the block-diagonal GGN a per-layer structure
approximates). For a one-layer model (logistic regression) both are the exact GGN = Hessian.

The same columns give per-sample gradients in closed form: if ``S_s c_s = ∇_z ℓ_s`` then
``Σ_k c_sk G_sk = ∇_W ℓ_s`` (:func:`output_coefficients`, :func:`stats_gradient`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import Tensor

from tensorcurv.core.losses import CrossEntropy, LossSpec, MeanSquaredError
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import summed_outer_products

COUPLINGS = ("full", "block")


def check_coupling(coupling: str) -> None:
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling={coupling!r} is not one of {list(COUPLINGS)}")


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
        return torch.cat(parts)  # type: ignore[arg-type]  # the layers cover every parameter


class StatsGGN:
    """``v ↦ C v`` for ``C = c Σ_{s,k} u_sk u_skᵀ`` from captured statistics (module docstring)."""

    def __init__(self, stats: Mapping[str, LayerStats], coupling: str = "full") -> None:
        check_coupling(coupling)
        if not stats:
            raise ValueError("no layer statistics")
        first = next(iter(stats.values()))
        for name, st in stats.items():
            if (st.N, st.K) != (first.N, first.K) or st.scale != first.scale:
                raise ValueError(f"layer {name!r}: statistics of {st.N} samples x {st.K} columns (scale {st.scale}) "
                                 f"do not match {first.N} x {first.K} (scale {first.scale}); one capture is needed")
        self.stats, self.coupling, self.scale = dict(stats), coupling, first.scale
        self.N, self.K = first.N, first.K
        self.matvecs = 0
        self._lam: dict[str, Tensor] = {}

    def _weights(self, st: LayerStats, V: Tensor) -> Tensor:
        """``w_sk = Σ_t g_sktᵀ V a_st``, shape (N, K)."""
        Z = st.a @ V.T  # (N, T, m)
        return torch.einsum("sktm,stm->sk", st.g, Z)

    def _spread(self, st: LayerStats, w: Tensor) -> Tensor:
        """``c Σ_{s,k} w_sk G_sk`` as an (m, n) matrix."""
        h = torch.einsum("sk,sktm->stm", w, st.g).reshape(-1, st.m)
        return (h.T @ st.a.reshape(-1, st.n)) * self.scale

    def _output_ggn(self, name: str, st: LayerStats) -> Tensor:
        """``Λ_s = Σ_k g_sk g_skᵀ`` (N, m, m) for ``T = 1``, formed once: then the block's product is
        ``c Σ_s (Λ_s V a_s) a_sᵀ`` — one batched product instead of the two passes over ``g``."""
        lam = self._lam.get(name)
        if lam is None:
            lam = self._lam[name] = summed_outer_products(st.g[:, :, 0])
        return lam

    def mv_mats(self, mats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.matvecs += 1
        if (self.coupling == "block" or len(self.stats) == 1) and all(st.T == 1 for st in self.stats.values()):
            out = {}
            for k, st in self.stats.items():  # block-diagonal (or one layer): per-sample output GGNs Λ_s
                a = st.a[:, 0]
                h = (self._output_ggn(k, st) @ (a @ mats[k].T).unsqueeze(-1)).squeeze(-1)  # (N, m)
                out[k] = (h.T @ a) * self.scale
            return out
        ws = {k: self._weights(st, mats[k]) for k, st in self.stats.items()}
        if self.coupling == "full":
            w = cast(Tensor, sum(ws.values()))
            return {k: self._spread(st, w) for k, st in self.stats.items()}
        return {k: self._spread(st, ws[k]) for k, st in self.stats.items()}


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
    out = {}
    for k, st in stats.items():
        h = torch.einsum("sk,sktm->stm", coeffs, st.g).reshape(-1, st.m)
        out[k] = h.T @ st.a.reshape(-1, st.n)
    return out
