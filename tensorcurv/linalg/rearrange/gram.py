"""``gram`` route of the Kronecker SVD (``T = 1``): block Krylov in sample space, with warm starts."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.rearrange.ritz import check_finite_ritz, pad_terms, pair_change
from tensorcurv.linalg.rearrange.sample_space import (
    gram_operator,
    one_signed,
    sym_quadratic_forms,
    symmetric_part_or_self,
    weighted_covariances,
)


def gram_warm_side(N: int, K: int, n: int, m: int, rank: int, p: int, have_a: bool = True, have_g: bool = True) -> str:
    """How the Gram route (block width ``p``) maps the previous factors into a new batch's sample space:
    ``"a"``, ``"g"`` or ``"cold"``, by multiply-adds. ``R(C) = scale U Wᵀ`` (``U = [vec(a_s a_sᵀ)]``,
    ``W = [vec(Σ_k g_sk g_skᵀ)]``); a left sample coordinate ``x`` stands for ``U x``, a right one for ``W x``.

    * ``a``: ``z_k = (a_sᵀ A_k a_s)_s = Uᵀ vec(A_k)``, so ``W z_k = Rᵀ vec(A_k)/scale`` and the column
      ``Gw z_k`` is ``R Rᵀ vec(A_k)/scale²`` (one power step): ``r N n²/2`` for the quadratic forms;
    * ``g``: ``y_k = (Σ_k' g_sk'ᵀ G_k g_sk')_s = Wᵀ vec(G_k)``, so the column ``y_k`` itself is
      ``R vec(G_k)/scale`` (a half step, no Gram product): ``r N K m²/2``.

    Either way the random columns are taken as right coordinates and get the half step ``Gw ρ``
    (``R W ρ/scale``) in the same ``Gw`` product, ``N min(N, m(m+1))`` per column (formed or factored,
    as :func:`gram_operator`). The cheaper available side is used if it costs less than one Krylov block
    ``N p (min(N, n(n+1)) + min(N, m(m+1)))`` (``Gu Q`` and ``Gw Z``: what a start good enough for the
    stopping rule saves); otherwise (both factors wide, e.g. 1024 x 1025 at ``N = 2048``: ``r`` K-FAC
    factor passes) the start stays cold. Ties go to ``a`` (a full power step)."""
    gu, gw = N * min(N, n * (n + 1)), N * min(N, m * (m + 1))  # one column through Gu, Gw
    costs = {}
    if have_a:
        costs["a"] = rank * N * n * n / 2 + gw * (p - 1)
    if have_g:
        costs["g"] = rank * N * K * m * m / 2 + gw * max(0, p - 1 - rank)
    if not costs or p < 2:
        return "cold"
    side = min(costs, key=lambda k: (costs[k], k))
    return side if costs[side] < p * (gu + gw) else "cold"


def _warm_block(
    stats: LayerStats, side: str, F: Tensor, rand: Tensor, Gw: Callable[[Tensor], Tensor]
) -> tuple[Tensor, bool]:
    """Columns ``1..p-1`` of a warm first block (left sample coordinates, :func:`gram_warm_side`) from the
    previous factors ``F`` of one side and the random columns ``rand`` (``N x (p-1)``): side ``a``
    ``Gw [z_1..z_q, ρ…]``, side ``g`` ``[y_1..y_q, Gw ρ…]``; ``z``, ``y`` scaled to norm ``√N`` like ``ρ``,
    every output column too (zero stays zero). Returns the block and whether a ``Gw`` product ran."""
    q = min(F.shape[0], rand.shape[1])
    F = F[:q].to(device=stats.a.device, dtype=stats.a.dtype)
    if side == "a":
        a = stats.a[:, 0]
        z = torch.stack([sym_quadratic_forms(a, symmetric_part_or_self(Fk)) for Fk in F], 1)  # Uᵀ vec(A_k)
        rand[:, :q] = _unit(z, stats.N)
        return _unit(Gw(rand), stats.N), True
    g = stats.g[:, :, 0].reshape(-1, stats.m)
    y = torch.stack([sym_quadratic_forms(g, symmetric_part_or_self(Fk)) for Fk in F], 1)  # Wᵀ vec(G_k), rows (s, k')
    if stats.K > 1:
        y = y.reshape(stats.N, stats.K, -1).sum(1)
    rest = rand[:, q:]
    ran = rest.shape[1] > 0
    return torch.cat([_unit(y, stats.N), _unit(Gw(rest), stats.N) if ran else rest], 1), ran


def _unit(X: Tensor, N: int) -> Tensor:
    """Columns of ``X`` scaled to norm ``√N``; zero columns stay zero."""
    nrm = torch.linalg.vector_norm(X, dim=0)
    return X * torch.where(nrm > 0, math.sqrt(N) / nrm.clamp_min(torch.finfo(X.dtype).tiny), 0.0)


def gram_svd(stats, rank, p, tol, max_iter, generator, out, warm=None):
    """Block Krylov (Lanczos-type) Rayleigh–Ritz in sample space: blocks ``X, (Gw Gu) X, (Gw Gu)² X, …``
    (Euclidean-orthonormalized), Ritz pairs of ``Rᵀ R`` in the ``Gu`` metric after each block; every
    block costs two ``N x N`` products (``Z = Gu Y``, ``W = Gw Z``), which the Ritz step reuses.
    ``warm = (side, F)``: columns ``1..p-1`` of the first block from the previous factors (:func:`_warm_block`).
    Then the ``r`` factor pairs are formed once (:func:`weighted_covariances`). ``out`` receives
    ``sample_coefficients`` (the sample weights of every term: the PSD certificate of ``kron_sum``),
    ``gram_passes`` (the number of ``N x N`` products), ``warm_side`` and ``energies`` (after each block)."""
    N, dtype = stats.N, stats.a.dtype
    g = stats.g[:, :, 0]
    Gu, Gw = gram_operator(stats.a[:, 0, None]), gram_operator(g)
    X, side, stepped = _first_block(stats, p, generator, Gw, warm)
    drop = 100 * torch.finfo(dtype).eps
    Ys, Zs, Ws = [], [], []
    theta_prev, it, change, invariant, energies = None, 0, math.inf, False, []
    while True:
        it += 1
        Q = _new_directions(X, Ys, p, N, drop, generator)
        if Q is None:
            invariant = True  # the Krylov space is invariant: the last Ritz pairs are exact
            break
        Z = Gu(Q)
        Ys.append(Q), Zs.append(Z), Ws.append(Gw(Z))
        theta, V, Cm, Y, Zc = _ritz_step(Ys, Zs, Ws, stats.scale, drop)
        check_finite_ritz(theta, stats)
        if theta_prev is not None:
            change = pair_change(theta, theta_prev, rank, tol, torch.finfo(dtype).eps)
        theta_prev = theta
        energies.append(float(theta[: min(rank, theta.numel())].sum()))
        invariant = Y.shape[1] >= N
        if change <= tol or it >= max_iter or invariant:
            break
        X = Ws[-1]
    if invariant:
        change = 0.0
    sz, r, ca, cg, A, G = _sample_space_factors(stats, rank, theta, V, Cm, Y, Zc)
    certified = r == 1 and one_signed(ca.T) and one_signed(cg.T)  # A_1, G_1 ± nonnegative combinations
    # term k is exactly sigma_k (Σ_s ca[s,k] a_s a_sᵀ) ⊗ (Σ_{u,k'} cg[u,k] g_uk' g_uk'ᵀ) (before and after
    # the front's normalization): the sample coefficients behind the sample-space PSD certificate of kron_sum
    out.update(
        iterations=it,
        products=2 * r,
        converged=change <= tol,
        energy_change=change,
        gram_passes=2 * len(Ys) + stepped,
        warm_side=side,
        energies=energies,
        psd_certificate=certified,
        sample_coefficients=(ca * sz[:r], cg),
        raw_coefficients=(ca, cg),
    )
    return pad_terms(sz[:r], A, G, rank)


def _first_block(stats: LayerStats, p: int, generator, Gw: Callable[[Tensor], Tensor], warm):
    """The first block ``[1, warm columns, random columns]`` (``N x p``; cold: all random after the
    constant), the warm side used and whether a ``Gw`` product ran."""
    N, dtype = stats.N, stats.a.dtype
    X = torch.randn(N, p, generator=generator, dtype=dtype, device="cpu").to(stats.a.device)
    X[:, 0] = 1.0  # K-FAC's A = U·1/N as the first direction
    side = "cold" if warm is None or p < 2 else warm[0]
    stepped = False
    if side != "cold":  # the previous factors mapped into this batch's sample space, the random columns stepped
        X[:, 1:], stepped = _warm_block(stats, side, warm[1], X[:, 1:], Gw)
    return X, side, stepped


def _new_directions(X: Tensor, Ys: list[Tensor], p: int, N: int, drop: float, generator) -> Tensor | None:
    """The next orthonormal block from ``X``: block Gram–Schmidt against the basis ``Ys`` (twice), QR within
    the block, directions below ``drop`` (relative) removed and refilled with random ones while the basis
    has room. None when nothing new is left (the Krylov space is invariant)."""
    dtype = X.dtype
    scale = float(torch.linalg.vector_norm(X, dim=0).max())
    if Ys:  # block Gram–Schmidt against the basis (twice), then QR within the block
        B = torch.cat(Ys, 1)
        for _ in range(2):
            X = X - B @ (B.T @ X)
    Q, Rq = torch.linalg.qr(X, mode="reduced")
    keep = torch.diagonal(Rq).abs() > drop * max(scale, torch.finfo(dtype).tiny)  # new directions only
    if Ys and not bool(keep.any()):
        return None
    Q = Q[:, keep]
    lost = p - Q.shape[1]
    if 0 < lost and sum(y.shape[1] for y in Ys) + p <= N:  # refill: random directions keep the block width
        Bk = torch.cat([*Ys, Q], 1)
        Xr = torch.randn(N, lost, generator=generator, dtype=dtype, device="cpu").to(Q.device)
        for _ in range(2):
            Xr = Xr - Bk @ (Bk.T @ Xr)
        Q = torch.cat([Q, torch.linalg.qr(Xr, mode="reduced")[0]], 1)
    return Q


def _ritz_step(Ys: list[Tensor], Zs: list[Tensor], Ws: list[Tensor], c: float, drop: float):
    """Ritz values ``theta`` (descending, ``σ_k²``) and vectors ``V`` of ``Rᵀ R`` on the basis ``Y`` in the
    ``Gu`` metric (float64): ``Cm`` whitens ``S = Yᵀ Gu Y`` (``U Y Cm`` orthonormal), then the eigenpairs of
    ``c² Cmᵀ H Cm``, ``H = (Gu Y)ᵀ Gw (Gu Y)``. Returns ``theta, V, Cm`` and the stacked ``Y``, ``Zc = Gu Y``."""
    Y, Zc, Wc = torch.cat(Ys, 1), torch.cat(Zs, 1), torch.cat(Ws, 1)
    S, H = (Y.T @ Zc).double(), (Zc.T @ Wc).double()
    ev, U = torch.linalg.eigh(0.5 * (S + S.T))
    ok = ev > drop * float(ev.max().clamp_min(torch.finfo(torch.float64).tiny))
    Cm = U[:, ok] / ev[ok].sqrt()  # U Y Cm orthonormal
    theta, V = torch.linalg.eigh(Cm.T @ (0.5 * (H + H.T)) @ Cm * c * c)
    theta, V = theta.flip(0).clamp_min(0), V.flip(1)
    return theta, V, Cm, Y, Zc


def _sample_space_factors(stats: LayerStats, rank: int, theta, V, Cm, Y, Zc):
    """The kept Ritz pairs as factors: ``σ_k = sqrt(theta_k)``, ``r ≤ rank`` pairs above rounding, the sample
    weights ``ca`` (``A_k = Σ_s ca[s,k] a_s a_sᵀ``, orthonormal) and ``cg`` (``G_k = Rᵀ A_k / σ_k``), and the
    factors ``A (r, n, n)``, ``G (r, m, m)`` formed once each."""
    dtype, m, c = stats.a.dtype, stats.m, stats.scale
    g = stats.g[:, :, 0]
    coef = (Cm @ V).to(dtype)
    sz = theta.sqrt().to(dtype)
    r = min(rank, int((sz > sz[0] * torch.finfo(dtype).eps).sum()))
    ca = Y @ coef[:, :r]  # A_k = Σ_s ca[s,k] a_s a_sᵀ  (orthonormal)
    cg = c * (Zc @ coef[:, :r]) / sz[:r]  # G_k = Σ_{s,k'} cg[s,k] g_sk' g_sk'ᵀ = Rᵀ A_k / σ_k
    A = weighted_covariances(stats.a[:, 0], ca)
    cgk = cg.repeat_interleave(stats.K, dim=0) if stats.K > 1 else cg  # rows (s, k') of g
    G = weighted_covariances(g.reshape(-1, m), cgk)
    return sz, r, ca, cg, A, G
