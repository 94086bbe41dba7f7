"""Ritz-step helpers shared by the Kronecker SVD drivers (``power``, ``gram``): the per-pair stopping rule,
the overflow check, and zero padding of the returned terms."""

from __future__ import annotations

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats, NonFiniteError


def check_finite_ritz(values: Tensor, stats: LayerStats) -> None:
    """Overflowing products of finite statistics (e.g. ``g ~ 1e25`` in float32) give non-finite Ritz values:
    stop at once instead of iterating on NaN (which a normalization would turn into zero factors)."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(
            f"layer {stats.name!r}: the Kronecker-sum fit overflowed in {stats.a.dtype} "
            f"(max |a| = {float(stats.a.abs().max()):.3g}, "
            f"max |g| = {float(stats.g.abs().max()):.3g})"
        )


def pair_change(theta2: Tensor, prev: Tensor, rank: int, tol: float, eps: float) -> float:
    """Per-pair convergence measure of the Ritz values ``theta2 = σ_k²`` (descending, block width ``p``)
    against the previous ones: ``Σ_{k≤r} |σ_k² − σ_k²_prev| / τ²``, where ``τ² = σ_{r+1}²`` (the first
    Ritz value beyond the rank, ``σ_r²`` when the block has no extra column; for ``r = 1`` without one
    the captured energy ``σ_1²``). Why this scale: the rank-``r`` Ritz truncation has error
    ``‖R − R̂‖² = floor² + Σ_{k≤r} (s_k² − σ_k²)`` (``s``: the exact singular values), and
    ``floor² = Σ_{k>r} s_k² ≥ s_{r+1}² ≥ σ_{r+1}²`` (Ritz values interlace), so a change small against
    ``τ²`` is small against the Eckart–Young floor itself, not against ``σ_1²`` which dominates the
    captured energy. ``τ²`` is kept above ``100 ε σ_1² / tol`` (``eps``: of the data's dtype; changes below
    ``100 ε σ_1²`` are rounding noise), so that the fit stops at ``change ≤ tol``."""
    k = min(rank, theta2.numel(), prev.numel())
    j = k if theta2.numel() > k else (k - 1 if k > 1 else None)
    tau2 = float(theta2[:k].sum() if j is None else theta2[j])
    noise = 100 * eps * float(theta2[0]) / tol
    return float((theta2[:k] - prev[:k]).abs().sum()) / max(tau2, noise, torch.finfo(torch.float64).tiny)


def pad_terms(sigma, A, G, rank):
    """Pad with zero terms when ``R(C)`` has rank below the requested ``rank``."""
    r = sigma.numel()
    if r == rank:
        return sigma, A, G
    z = rank - r
    return (
        torch.cat([sigma, sigma.new_zeros(z)]),
        torch.cat([A, A.new_zeros(z, *A.shape[1:])]),
        torch.cat([G, G.new_zeros(z, *G.shape[1:])]),
    )
