"""Near-PSD Kronecker sums: the unconstrained rank-r truncation plus the smallest identity shift that makes it PSD.

Column-major vec, ``R`` the Van Loan rearrangement (``R(A ⊗ G) = vec(A) vec(G)ᵀ``). Some blocks (an
autoencoder's code layer) have an Eckart–Young truncation ``Ĉ = Σ_{k≤r} A_k ⊗ G_k`` that is PSD up to a
tiny negative eigenvalue, while a sum of PSD factors (:mod:`tensorcurv.structures.kron_sum.psd_factors`)
stays far from the floor: the terms ``k ≥ 2`` of the truncation are indefinite, only their sum with the
first is PSD. Then

    Ĉ_μ = Ĉ + μ I_n ⊗ I_m,      μ = max(0, −λ_min(Ĉ) + ρ)

(``λ_min`` by Lanczos, ``ρ`` the residual of its Ritz pair plus ``1e-12 λ_max`` as margin) is PSD, and its
error is known without forming anything:

    ‖C − Ĉ_μ‖² = ‖C − Ĉ‖² − 2μ (tr C − tr Ĉ) + μ² nm,    tr Ĉ = Σ_k tr A_k tr G_k.

The shift is stored as one more term ``(μ I_n) ⊗ I_m``. :func:`shifted_truncation` returns it when it is
more accurate than the PSD-factor fit; blocks with ``n·m`` above :data:`NEAR_PSD_MAX_DIM` are not tried
(Lanczos on ``nm``-vectors would cost more than the whole fit there).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.lanczos import lanczos
from tensorcurv.linalg.rearrange import RearrangedOperator, kronecker_svd
from tensorcurv.structures.kron_sum.certificates import recompress

NEAR_PSD_MAX_DIM = 8192
"""Largest ``n·m`` on which the shifted truncation is tried (the reference CNN, MLP output and autoencoder
code layers; not the 10x1025 output layer of the cost benchmark, whose extra rank-r fit and Lanczos would add
to every update)."""
NEAR_PSD_GAIN = 0.1
"""The shift is only computed when the PSD-factor error exceeds the unconstrained one by this fraction."""
LANCZOS_STEPS = 60


def fitted_energy(op: RearrangedOperator, A: Tensor, G: Tensor) -> float:
    """``‖C‖² − ‖C − Σ A_k ⊗ G_k‖² = 2 Σ_k ⟨A_k, R(C) vec(G_k)⟩ − Σ_jk ⟨A_j, A_k⟩⟨G_j, G_k⟩``."""
    cross = 2 * float((op.rmatvec(A) * G).sum())
    return cross - float(((A.flatten(1) @ A.flatten(1).T) * (G.flatten(1) @ G.flatten(1).T)).sum())


def kron_sum_mv(A: Tensor, G: Tensor, v: Tensor) -> Tensor:
    """``(Σ_k A_k ⊗ G_k) v`` for a column ``v`` (``nm x 1``, column-major ``vec`` of an ``m x n`` matrix)."""
    m, n = G.shape[-1], A.shape[-1]
    V = v.reshape(n, m).T
    return torch.einsum("kij,jl,knl->in", G, V, A).T.reshape(-1, 1)


def min_eigenvalue(A: Tensor, G: Tensor, steps: int = LANCZOS_STEPS) -> tuple[float, float]:
    """``(θ_min − ρ, θ_max)``: the smallest Ritz value less its residual, and the largest Ritz value."""
    d = A.shape[-1] * G.shape[-1]
    start = torch.ones(d, 1, dtype=A.dtype, device=A.device)
    start = start + 1e-3 * torch.arange(d, dtype=A.dtype, device=A.device).reshape(d, 1).cos()
    res = lanczos(lambda v: kron_sum_mv(A, G, v), start, max_iter=steps, breakdown_tol=1e-12)
    return float(res.ritz_values[0] - res.residuals[0]), float(res.ritz_values[-1])


def with_shift(A: Tensor, G: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """The terms ``A, G`` followed by ``(μ I) ⊗ I``."""
    eye_a = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    eye_g = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return torch.cat([A, (mu * eye_a)[None]]), torch.cat([G, eye_g[None]])


def shift_for(A: Tensor, G: Tensor) -> float:
    """The identity shift ``μ ≥ 0`` that makes ``Σ A_k ⊗ G_k`` PSD (module doc)."""
    low, high = min_eigenvalue(A, G)
    return max(0.0, -(low - 1e-12 * abs(high))) if low < 1e-12 * abs(high) else 0.0


def shifted_error_sq(op: RearrangedOperator, A: Tensor, G: Tensor, mu: float, err_sq: float) -> float:
    """``‖C − Σ A_k ⊗ G_k − μI‖²`` from ``err_sq = ‖C − Σ A_k ⊗ G_k‖²`` (module doc)."""
    n, m = A.shape[-1], G.shape[-1]
    eye_a = torch.eye(n, dtype=A.dtype, device=A.device)
    eye_g = torch.eye(m, dtype=G.dtype, device=G.device)
    trace_c = float((op.matvec(eye_g[None])[0] * eye_a).sum())  # ⟨C, I ⊗ I⟩ = vec(I)ᵀ R(C) vec(I)
    trace_fit = float(sum(torch.trace(a) * torch.trace(g) for a, g in zip(A, G)))
    return err_sq - 2 * mu * (trace_c - trace_fit) + mu * mu * n * m


def shifted_truncation(
    stats: LayerStats,
    A_psd: Tensor,
    G_psd: Tensor,
    rank: int,
    fit_kw: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor] | None:
    """The shifted rank-``rank`` truncation when it is more accurate than the PSD-factor fit ``A_psd, G_psd``
    (``fit_kw``: :func:`kronecker_svd` options); None otherwise or when the block is too large."""
    m, n = stats.m, stats.n
    if rank < 2 or m * n > NEAR_PSD_MAX_DIM:
        return None
    op = RearrangedOperator(stats)
    total = op.frobenius_sq()
    err_psd = max(total - fitted_energy(op, A_psd, G_psd), 0.0)
    sigma, A, G = kronecker_svd(stats, rank, **fit_kw)
    A = A * sigma[:, None, None]
    err_free = max(total - fitted_energy(op, A, G), 0.0)
    if math.sqrt(err_psd) <= (1 + NEAR_PSD_GAIN) * math.sqrt(err_free):
        return None
    mu = shift_for(A, G)
    err_shift = shifted_error_sq(op, A, G, mu, err_free)
    if info is not None:
        info.update(near_psd_shift=mu, near_psd_error_sq=err_shift, psd_factor_error_sq=err_psd)
    if err_shift >= err_psd:
        return None
    return with_shift(A, G, mu)


def shifted_update(
    A: Tensor, G: Tensor, stats: LayerStats, decay: float, rank: int, fit_kw: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """Running average of a shifted state ``A, G`` (``rank + 1`` terms): the batch's rank-``rank``
    truncation (warm-started from the state), the exact rank-``rank`` truncation of
    ``decay·Ĉ_old + (1 − decay)·Ĉ_batch`` (:func:`recompress`), then its shift."""
    sigma, A_b, G_b = kronecker_svd(stats, rank, init=(A[:rank], G[:rank]), **fit_kw)
    A_b = A_b * sigma[:, None, None]
    A_mix, G_mix = recompress(torch.cat([decay * A, (1 - decay) * A_b]), torch.cat([G, G_b]), rank)
    return with_shift(A_mix, G_mix, shift_for(A_mix, G_mix))


__all__ = [
    "NEAR_PSD_MAX_DIM",
    "fitted_energy",
    "kron_sum_mv",
    "shift_for",
    "shifted_error_sq",
    "shifted_truncation",
    "shifted_update",
    "with_shift",
]
