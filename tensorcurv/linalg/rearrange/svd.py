"""The Kronecker SVD of a layer block: the leading singular triplets of the implicit ``R(C)``,
``C ≈ Σ_k σ_k A_k ⊗ G_k`` (Eckart–Young; Van Loan & Pitsianis 1993), by the ``power`` or ``gram`` route."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.rearrange.gram import gram_svd, gram_warm_side
from tensorcurv.linalg.rearrange.power import power_svd

METHODS = ("auto", "power", "gram")


def antisymmetric(A: Tensor) -> Tensor:
    """Boolean per factor of a stack ``(r, d, d)``: True where the antisymmetric part dominates,
    ``‖A − Aᵀ‖ > ‖A + Aᵀ‖``, i.e. ``Σ_ij A_ij A_ji < 0`` (``‖A ± Aᵀ‖² = 2‖A‖² ± 2 Σ_ij A_ij A_ji``): one pass."""
    return (A * A.transpose(-1, -2)).sum((-1, -2)) < 0


def _finish_symmetric(sigma: Tensor, A: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_finish` when every pair is symmetric (``T = 1``): ``A + Aᵀ`` normalized, in two passes."""
    A, G = A + A.transpose(-1, -2), G + G.transpose(-1, -2)
    tiny = torch.finfo(A.dtype).tiny
    na = torch.linalg.vector_norm(A.flatten(1), dim=1).clamp_min(tiny)
    ng = torch.linalg.vector_norm(G.flatten(1), dim=1).clamp_min(tiny)
    sigma = sigma * na * ng / 4
    sign = torch.where(torch.diagonal(A, dim1=-2, dim2=-1).sum(-1) < 0, -1.0, 1.0).to(A.dtype)
    return sigma, A.mul_((sign / na)[:, None, None]), G.mul_((sign / ng)[:, None, None])


def _normalize(sigma: Tensor, A: Tensor, G: Tensor, scales: bool = False):
    """Unit Frobenius norms and ``tr A_k ≥ 0`` for exactly symmetric pairs, in place (one pass each).
    ``scales``: also return the factors ``sign/‖A_k‖``, ``sign/‖G_k‖`` each pair was multiplied by."""
    tiny = torch.finfo(A.dtype).tiny
    na = torch.linalg.vector_norm(A.flatten(1), dim=1).clamp_min(tiny)
    ng = torch.linalg.vector_norm(G.flatten(1), dim=1).clamp_min(tiny)
    sign = torch.where(torch.diagonal(A, dim1=-2, dim2=-1).sum(-1) < 0, -1.0, 1.0).to(A.dtype)
    fa, fg = sign / na, sign / ng
    out = sigma * na * ng, A.mul_(fa[:, None, None]), G.mul_(fg[:, None, None])
    return (*out, fa, fg) if scales else out


def _finish(sigma: Tensor, A: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Project each pair onto its symmetric (or, if dominant, antisymmetric) part, normalize to
    unit Frobenius norm, fix signs so that ``tr A_k ≥ 0``.

    ``R(C)`` maps symmetric matrices to symmetric and antisymmetric to antisymmetric ones, so its
    singular vectors are one or the other. For ``T = 1`` the antisymmetric part of ``R(C)`` is 0;
    with weight sharing (``T > 1``) an antisymmetric pair ``A ⊗ G`` (a symmetric, trace-free
    matrix) can belong to the optimum and is kept.
    """
    skew = antisymmetric(A)[:, None, None]
    A = 0.5 * (A + torch.where(skew, -1.0, 1.0).to(A.dtype) * A.transpose(-1, -2))
    G = 0.5 * (G + torch.where(skew, -1.0, 1.0).to(G.dtype) * G.transpose(-1, -2))
    na = torch.linalg.norm(A.flatten(1), dim=1).clamp_min(torch.finfo(A.dtype).tiny)
    ng = torch.linalg.norm(G.flatten(1), dim=1).clamp_min(torch.finfo(G.dtype).tiny)
    sigma = sigma * na * ng
    A, G = A / na[:, None, None], G / ng[:, None, None]
    sign = torch.where(torch.diagonal(A, dim1=-2, dim2=-1).sum(-1) < 0, -1.0, 1.0).to(A.dtype)
    return sigma, A * sign[:, None, None], G * sign[:, None, None]


def kronecker_svd(
    stats: LayerStats,
    rank: int,
    *,
    method: str = "auto",
    tol: float = 1e-4,
    max_iter: int = 100,
    oversample: int | None = None,
    init: Tensor | tuple[Tensor | None, Tensor | None] | None = None,
    generator: torch.Generator | None = None,
    info: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets of ``R(C)``: ``C ≈ Σ_k sigma_k A_k ⊗ G_k``.

    Returns ``sigma (r,)`` (descending), ``A (r, n, n)`` and ``G (r, m, m)`` (unit Frobenius norm,
    ``tr A_k ≥ 0``; both symmetric, or for ``T > 1`` possibly both antisymmetric, see
    :func:`_finish`). Methods:

    ``init`` (warm start): the previous fit's factors, a pair ``(A_prev (r, n, n), G_prev (r, m, m))``
    (either may be None) or, as before, the ``G_prev`` stack alone; their batch may differ from ``stats``.

    * ``power`` (:func:`~tensorcurv.linalg.rearrange.power.power_svd`): block subspace iteration on the
      implicit operator (any ``T``, ``K``), block size ``rank + oversample`` (default ``+2``, ``+0`` for rank 1).
    * ``gram`` (``T = 1``, :func:`~tensorcurv.linalg.rearrange.gram.gram_svd`): block Krylov in sample space,
      block size ``rank + oversample`` (default ``max(16, rank + 8)``); ``info`` also receives the sample
      weights of every term and factor (``sample_coefficients``, ``factor_coefficients``).
    * ``auto``: the cheaper of the two by a flop estimate (``power`` for rank 1 or large ``K``).

    Stopping rule (per pair, :func:`pair_change`): ``Σ_{k≤r} |σ_k² − σ_k²_prev| ≤ tol · σ_{r+1}²``
    between consecutive iterations (``power``: the first iteration against its own half-step;
    ``gram``: between consecutive blocks, so at least two blocks). ``σ_{r+1}²`` (the first Ritz
    value beyond the rank) bounds the Eckart–Young floor² from below, so every kept pair is converged
    against the floor, not against ``σ_1²``. ``info`` (if a dict) receives ``method, iterations,
    products, converged, energy_change`` (the last :func:`pair_change`) ``, warm_side`` (``power``:
    ``"g"`` when started from ``G_prev``, else ``"cold"``).
    """
    n, m = stats.n, stats.m
    _check_arguments(stats, rank, method)
    A_prev, G_prev = _init_factors(init, n, m)
    p = min(rank + (oversample if oversample is not None else (0 if rank == 1 else 2)), n * n, m * m)
    if method == "auto":
        method = _cheaper_method(stats, rank, p, G_prev is None)
    if method == "gram" and not (bool(stats.a.any()) and bool(stats.g.any())):
        method = "power"  # a zero block (dead units) has no sample-space pairs; the power route returns σ = 0
    out: dict[str, Any] = {"method": method}
    if method == "gram":
        sigma, A, G = _gram_route(stats, rank, oversample, tol, max_iter, generator, out, A_prev, G_prev)
    else:
        sigma, A, G = power_svd(stats, rank, p, tol, max_iter, G_prev, generator, out)
        out["warm_side"] = "cold" if G_prev is None else "g"  # started from the previous G factors themselves
    if info is not None:
        info.update(out)
    if method == "gram":
        return sigma, A, G
    return _finish_symmetric(sigma, A, G) if stats.T == 1 else _finish(sigma, A, G)


def _check_arguments(stats: LayerStats, rank: int, method: str) -> None:
    """One-line errors for a rank outside ``[1, min(n², m²)]``, an unknown method, ``gram`` with ``T > 1``."""
    n, m = stats.n, stats.m
    if not (isinstance(rank, int) and 1 <= rank <= min(n * n, m * m)):
        raise ValueError(
            f"rank must be an integer in [1, {min(n * n, m * m)}] for a block of shape {stats.shape}, got {rank!r}"
        )
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
    if method == "gram" and stats.T != 1:
        raise ValueError("method='gram' needs T = 1 (no weight sharing); use 'power' or 'auto'")


def _cheaper_method(stats: LayerStats, rank: int, p: int, cold: bool) -> str:
    """``"gram"`` or ``"power"`` by flops: one power iteration (plus the K-FAC start when ``cold``) against
    the two sample Grams and half a block of products (``gram`` needs ``T = 1``)."""
    n, m, N, K = stats.n, stats.m, stats.N, stats.K
    unit = 2 * N * (n * n + K * m * m)  # one product with R and one with Rᵀ, per column
    power_cost = (0.5 * N * K * m * m if cold else 0) + p * unit  # one iteration
    gram_cost = math.inf if stats.T != 1 else N * N * (n + K * K * m) + rank * unit / 2
    return "gram" if gram_cost < power_cost else "power"


def _gram_route(stats, rank, oversample, tol, max_iter, generator, out, A_prev, G_prev):
    """The ``gram`` route: block width, warm side, :func:`gram_svd`, then unit-norm symmetric pairs with the
    per-factor sample weights ``out["factor_coefficients"]`` (zero columns for padding)."""
    n, m = stats.n, stats.m
    # block size: a Gram product costs one read of an N x N matrix whatever the (few) columns, so
    # wide blocks are nearly free and cut the number of blocks
    pg = min(rank + oversample if oversample is not None else max(16, rank + 8), stats.N)
    side = gram_warm_side(stats.N, stats.K, n, m, rank, pg, A_prev is not None, G_prev is not None)
    warm = None if side == "cold" else (side, A_prev if side == "a" else G_prev)
    sigma, A, G = gram_svd(stats, rank, pg, tol, max(max_iter, 50), generator, out, warm)
    raw = out.pop("raw_coefficients", None)
    # exactly symmetric by construction (weighted_covariances)
    sigma, A, G, fa, fg = _normalize(sigma, A, G, scales=True)
    ca, cg = raw  # per-factor sample weights of the returned unit-norm factors (zero columns for padding)
    ca, cg = ca * fa[: ca.shape[1]], cg * fg[: cg.shape[1]]
    z = ca.new_zeros(ca.shape[0], rank - ca.shape[1])
    out["factor_coefficients"] = (torch.cat([ca, z], 1), torch.cat([cg, z], 1))
    return sigma, A, G


def _init_factors(init, n: int, m: int) -> tuple[Tensor | None, Tensor | None]:
    """``(A_prev (r, n, n) or None, G_prev (r, m, m) or None)`` from ``init``: a pair, a G stack alone, or None."""
    if init is None:
        return None, None
    A, G = init if isinstance(init, (tuple, list)) else (None, init)
    for F, d, what in ((A, n, "A"), (G, m, "G")):
        if F is not None and (F.dim() not in (2, 3) or F.shape[-2:] != (d, d)):
            raise ValueError(f"init: previous {what} factors must be ({d}, {d}) matrices, got {tuple(F.shape)}")
    return (None if A is None else A.reshape(-1, n, n)), (None if G is None else G.reshape(-1, m, m))
