"""Van Loan rearrangement ``R(C)`` of a layer block, applied implicitly from the per-sample factors.

Index convention (column-major ``vec`` of ``W`` (m x n), so ``C[j*m + i, j'*m + i']``):

    R(C)[(j, j'), (i, i')] = C[j*m + i, j'*m + i']      (an n² x m² matrix)

rows flattened row-major over ``(j, j')``, columns over ``(i, i')``. Then ``R(A ⊗ G) =
vec(A) vec(G)ᵀ`` (``torch.kron(A, G)`` ordering, ``vec = X.reshape(-1)``), and ``C ≈ Σ_k σ_k A_k ⊗ G_k``
is the truncated SVD of ``R(C)`` (Eckart–Young; Van Loan & Pitsianis 1993).

With ``C = scale Σ_{s,k} vec(G_sk) vec(G_sk)ᵀ``, ``G_sk = g[s,k]ᵀ a[s]`` (``a[s]``: T x n, ``g[s,k]``:
T x m), the two products never form ``C`` or ``R(C)``:

    R(C)  vec(X) = scale Σ_{s,k} a[s]ᵀ (g[s,k] X g[s,k]ᵀ) a[s]        (X: m x m -> n x n)
    R(C)ᵀ vec(Y) = scale Σ_{s,k} g[s,k]ᵀ (a[s] Y a[s]ᵀ) g[s,k]        (Y: n x n -> m x m)

For ``T = 1`` this is the sample-space form ``R(C) vec(X) = Σ_s w_s vec(a_s a_sᵀ)`` with
``w_s = scale Σ_k g_skᵀ X g_sk``: one weighted covariance, i.e. the cost of one K-FAC factor.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats, NonFiniteError
from tensorcurv.linalg import gram, summed_outer_products, symmetric_part
from tensorcurv.linalg.krylov import orthonormalize

METHODS = ("auto", "power", "gram")


def rearrange(C: Tensor, shape: tuple[int, int]) -> Tensor:
    """``R(C)`` (``n² x m²``) of a dense block ``C`` (``mn x mn``) of a weight of shape ``(m, n)``."""
    m, n = shape
    return C.reshape(n, m, n, m).permute(0, 2, 1, 3).reshape(n * n, m * m)


def dense_rearranged(stats: LayerStats) -> Tensor:
    """``R(C)`` formed densely from per-sample gradients (small layers / tests only)."""
    G = stats.per_sample_grads()  # (q, m, n)
    R = torch.einsum("qij,qkl->jlik", G, G) * stats.scale
    return R.reshape(stats.n ** 2, stats.m ** 2)


class RearrangedOperator:
    """Implicit ``R(C)`` of one layer block: :meth:`matvec` and :meth:`rmatvec` (batched over a
    leading dimension), each one pass over the per-sample factors. ``products`` counts how many
    single-matrix applications have been made.

    ``T = 1``: sample-space form (weights, then one weighted covariance; for a single matrix
    :func:`sym_quadratic_forms` and :func:`weighted_covariances`). ``T > 1``: per-sample
    position Gram (``T x T``) path or explicit per-sample gradients, whichever costs fewer flops,
    in chunks of samples so that intermediates stay below ``max_elems`` entries.
    """

    def __init__(self, stats: LayerStats, max_elems: int = 2 ** 24) -> None:
        self.stats = stats
        self.a, self.g, self.scale = stats.a, stats.g, stats.scale
        self.N, self.T, self.K, self.n, self.m = stats.N, stats.T, stats.K, stats.n, stats.m
        self.shape = (self.n * self.n, self.m * self.m)
        self.max_elems = max_elems
        self.products = 0
        self.one_signed = {"matvec": False, "rmatvec": False}
        T, K, n, m = self.T, self.K, self.n, self.m
        cost_pos = K * T * m * m + K * T * T * m + T * T * n + T * n * n
        cost_grad = K * (m * m * n + m * n * n)
        self.path = "samples" if T == 1 else ("positions" if cost_pos <= cost_grad else "grads")

    # ------------------------------------------------------------------ helpers
    def _chunks(self, per_sample: int):
        step = max(1, min(self.N, self.max_elems // max(1, per_sample)))
        for i in range(0, self.N, step):
            yield slice(i, i + step)

    @staticmethod
    def _batch(X: Tensor, size: int) -> tuple[Tensor, bool]:
        if X.dim() == 2:
            X = X.unsqueeze(0)
        if X.shape[-2:] != (size, size):
            raise ValueError(f"expected ({size}, {size}) matrices, got {tuple(X.shape[-2:])}")
        return X, True

    # ------------------------------------------------------------------ products
    def matvec(self, X: Tensor) -> Tensor:
        """``R(C) vec(X)`` as ``(n, n)`` for ``X`` of shape ``(m, m)`` or ``(p, m, m)``."""
        single = X.dim() == 2
        X, _ = self._batch(X, self.m)
        p = X.shape[0]
        self.products += p
        if self.path == "samples":
            g = self.g[:, :, 0].reshape(-1, self.m)  # (NK, m)
            a = self.a[:, 0]
            if p == 1:  # one column: quadratic forms, then one (exactly symmetric) weighted covariance
                w = sym_quadratic_forms(g, _sym(X[0])).reshape(1, self.N, self.K).sum(-1) * self.scale
                Y = weighted_covariances(a, w.T)
            else:
                w = ((g @ X) * g).sum(-1).reshape(p, self.N, self.K).sum(-1) * self.scale  # (p, N)
                Y = (a.T.unsqueeze(0) * w.unsqueeze(1)) @ a
            self.one_signed["matvec"] = _one_signed(w)
        elif self.path == "positions":
            Y = X.new_zeros(p, self.n, self.n)
            per = p * self.K * self.T * max(self.m, self.T)
            for sl in self._chunks(per):
                a, g = self.a[sl], self.g[sl]
                gX = torch.einsum("sktm,cml->csktl", g, X)
                M = torch.einsum("csktl,skul->cstu", gX, g)
                Y += torch.einsum("stn,cstu,sul->cnl", a, M, a)
            Y *= self.scale
        else:
            Y = X.new_zeros(p, self.n, self.n)
            per = self.K * self.m * self.n * (p + 1)
            for sl in self._chunks(per):
                G = torch.einsum("sktm,stn->skmn", self.g[sl], self.a[sl]).reshape(-1, self.m, self.n)
                Y += torch.einsum("qmn,cml,qlo->cno", G, X, G)
            Y *= self.scale
        return Y[0] if single else Y

    def rmatvec(self, Y: Tensor) -> Tensor:
        """``R(C)ᵀ vec(Y)`` as ``(m, m)`` for ``Y`` of shape ``(n, n)`` or ``(p, n, n)``."""
        single = Y.dim() == 2
        Y, _ = self._batch(Y, self.n)
        p = Y.shape[0]
        self.products += p
        if self.path == "samples":
            a = self.a[:, 0]
            g = self.g[:, :, 0]  # (N, K, m)
            gf = g.reshape(-1, self.m)
            if p == 1:
                v = (sym_quadratic_forms(a, _sym(Y[0])) * self.scale).unsqueeze(0)
                vk = v[0].repeat_interleave(self.K) if self.K > 1 else v[0]
                Z = weighted_covariances(gf, vk[:, None])
            else:
                v = ((a @ Y) * a).sum(-1) * self.scale  # (p, N)
                vk = v.unsqueeze(-1).expand(p, self.N, self.K).reshape(p, -1)
                Z = (gf.T.unsqueeze(0) * vk.unsqueeze(1)) @ gf
            self.one_signed["rmatvec"] = _one_signed(v)
        elif self.path == "positions":
            Z = Y.new_zeros(p, self.m, self.m)
            per = p * self.T * max(self.n, self.T) * self.K
            for sl in self._chunks(per):
                a, g = self.a[sl], self.g[sl]
                M = torch.einsum("stn,cnl,sul->cstu", a, Y, a)
                Z += torch.einsum("sktm,cstu,skul->cml", g, M, g)
            Z *= self.scale
        else:
            Z = Y.new_zeros(p, self.m, self.m)
            per = self.K * self.m * self.n * (p + 1)
            for sl in self._chunks(per):
                G = torch.einsum("sktm,stn->skmn", self.g[sl], self.a[sl]).reshape(-1, self.m, self.n)
                Z += torch.einsum("qmn,cno,qlo->cml", G, Y, G)
            Z *= self.scale
        return Z[0] if single else Z

    def frobenius_sq(self) -> float:
        """``‖C‖_F² = ‖R(C)‖_F²`` from the sample Gram (``T = 1``) or per-sample gradients."""
        if self.path == "samples":
            Gu, Gw = sample_grams(self.stats)
            return float((Gu * Gw).sum()) * self.scale ** 2
        G = self.stats.per_sample_grads().reshape(-1, self.m * self.n)
        return float((G @ G.T).pow(2).sum()) * self.scale ** 2


def _sym(X: Tensor) -> Tensor:
    """Symmetric part ``(X + Xᵀ)/2`` (a quadratic form sees only it); ``X`` itself if exactly symmetric."""
    return X if torch.equal(X, X.T) else 0.5 * (X + X.T)


def _one_signed(w: Tensor) -> bool:
    """Every row of ``w`` (p, N) is ``≥ 0`` or ``≤ 0``: then ``Σ_s w_s a_s a_sᵀ`` is ± PSD (a certificate)."""
    return bool(((w >= 0).all(-1) | (w <= 0).all(-1)).all())


def sample_grams(stats: LayerStats) -> tuple[Tensor, Tensor]:
    """For ``T = 1``: ``Gu[s,t] = (a_sᵀa_t)²`` and ``Gw[s,t] = Σ_{k,k'} (g_skᵀ g_tk')²`` (N x N), so
    that ``R(C) = scale U Wᵀ`` with ``U = [vec(a_s a_sᵀ)]``, ``W = [vec(Σ_k g_sk g_skᵀ)]`` and
    ``UᵀU = Gu``, ``WᵀW = Gw``. Cost ``2N²(n + K²m)`` flops."""
    if stats.T != 1:
        raise ValueError("sample-space Gram matrices need T = 1 (no weight sharing)")
    a = stats.a[:, 0]
    g = stats.g[:, :, 0].reshape(-1, stats.m)
    Gu = sym_gram(a).square_()
    Gw = sym_gram(g).square_()
    if stats.K > 1:
        Gw = Gw.reshape(stats.N, stats.K, stats.N, stats.K).sum((1, 3))
    return Gu, Gw


def gram_operator(X: Tensor, max_elems: int = 2 ** 24) -> Callable[[Tensor], Tensor]:
    """``C ↦ M C`` for the sample Gram ``M[s,t] = Σ_{k,k'} (x_skᵀ x_tk')² = ⟨S_s, S_t⟩_F``,
    ``S_s = Σ_k x_sk x_skᵀ``, from ``X`` of shape ``(N, K, d)``.

    Small ``d`` (``d(d+1)/2 ≤ N/2``): factored, ``M = Φ Φᵀ`` with ``Φ_s`` the symmetric vec of ``S_s``
    (off-diagonal entries times √2), so ``M C = Φ (Φᵀ C)`` costs ``O(N d² p)`` and ``M`` is never formed.
    Otherwise ``M`` is formed once (:func:`sym_gram` and an entrywise square; for ``K > 1`` in chunks
    of samples whose ``(chunk K) x (N K)`` products stay below ``max_elems`` entries)."""
    N, K, d = X.shape
    if d * (d + 1) // 2 <= N // 2:
        i, j = torch.triu_indices(d, d, device=X.device)
        S = summed_outer_products(X)
        w = torch.full(i.shape, math.sqrt(2.0), dtype=X.dtype, device=X.device).masked_fill_(i == j, 1.0)
        Phi = S[:, i, j] * w
        return lambda C: Phi @ (Phi.T @ C)
    if K == 1:
        M = sym_gram(X[:, 0]).square_()
    else:  # row chunks of samples: the (N K)² products never exist at once
        flat, M = X.reshape(N * K, d), X.new_empty(N, N)
        step = max(1, max_elems // (K * K * N))
        for i in range(0, N, step):
            blk = (X[i:i + step].reshape(-1, d) @ flat.T).square_()
            M[i:i + step] = blk.reshape(-1, K, N, K).sum((1, 3))
    return lambda C: M @ C


def sym_gram(X: Tensor) -> Tensor:
    """``X Xᵀ`` (``N x N`` for ``X`` of shape ``(N, d)``): one plain gemm, made exactly symmetric (a gemm is
    bitwise symmetric only when both triangles are summed in the same order, which threading does not promise)."""
    return symmetric_part(gram(X.mT))


def weighted_covariances(X: Tensor, W: Tensor | None) -> Tensor:
    """``Σ_s W[s,k] x_s x_sᵀ`` for every column ``k`` of ``W`` (``N x r``), as ``(r, d, d)`` for ``X`` of
    shape ``(N, d)``: one plain gemm ``(W_k ⊙ X)ᵀ X`` per column (one weighted copy of ``X`` at a time), made
    exactly symmetric. ``W = None``: ``XᵀX`` as ``(1, d, d)`` (no weighting pass)."""
    if W is None:
        return gram(X).unsqueeze(0)
    return symmetric_part(torch.stack([(X * w[:, None]).mT @ X for w in W.mT]))


def sym_quadratic_forms(X: Tensor, M: Tensor) -> Tensor:
    """``x_sᵀ M x_s`` for every row of ``X`` (``N x d``) and ``M`` (``d x d``): ``rowsum((X M) ∘ X)``."""
    return torch.linalg.vecdot(X @ M, X)


def _sym_random(p: int, d: int, like: Tensor, generator: torch.Generator | None, symmetric: bool = True) -> Tensor:
    X = torch.randn(p, d, d, generator=generator, dtype=like.dtype, device="cpu").to(like.device)
    return 0.5 * (X + X.transpose(-1, -2)) if symmetric else X


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

    * ``power``: block subspace iteration on the implicit operator (any ``T``, ``K``), block size
      ``rank + oversample``, started from ``G_prev`` (warm start) or from the
      K-FAC output factor plus random symmetric matrices. Each iteration is ``p`` products with
      ``R(C)`` and ``p`` with ``R(C)ᵀ`` (each ≈ one K-FAC factor pass) followed by Rayleigh–Ritz.
      For ``rank = 1`` this is alternating least squares on ``A ⊗ G``.
    * ``gram`` (``T = 1``): block Krylov in sample space, ``R(C) = scale U Wᵀ`` with the ``N x N``
      Grams ``UᵀU = (a_sᵀa_t)²`` and ``WᵀW`` (:func:`gram_operator`); block size ``rank + oversample``
      (default ``max(16, rank + 8)``: 16 columns run fastest in MKL's sgemm, and a product reads the
      ``N x N`` matrix once whatever the few columns), each block two ``N x N`` products, Rayleigh–Ritz
      after each block; then the ``r`` factor pairs are formed once (:func:`weighted_covariances`).
      ``info["sample_coefficients"]`` gives the sample weights of every term (the PSD certificate of
      ``kron_sum``), ``info["factor_coefficients"] = (ca, cg)`` those of every returned factor
      (``A_k = Σ_s ca[s,k] a_s a_sᵀ``, ``G_k = Σ_{s,k'} cg[s,k] g_sk' g_sk'ᵀ``), ``info["gram_passes"]``
      the number of ``N x N`` products. Warm start: the previous factors are mapped into this batch's
      sample space (a sample-space vector cannot be carried over), by the cheaper side of
      :func:`gram_warm_side` (``info["warm_side"]``: ``"a"``, ``"g"`` or ``"cold"``); the first block is
      ``[1, warm columns, random columns]``, the random ones taken as right-space starts ``W ρ`` and
      stepped once to the left (``Gw ρ``) in the same ``Gw`` product, so that the first Ritz step is
      already within ``tol`` and the rule can stop after two blocks. ``info["energies"]``: the captured
      energy after each block.
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
    if not (isinstance(rank, int) and 1 <= rank <= min(n * n, m * m)):
        raise ValueError(f"rank must be an integer in [1, {min(n * n, m * m)}] for a block of shape {stats.shape}, "
                         f"got {rank!r}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
    if method == "gram" and stats.T != 1:
        raise ValueError("method='gram' needs T = 1 (no weight sharing); use 'power' or 'auto'")
    A_prev, G_prev = _init_factors(init, n, m)
    p = min(rank + (oversample if oversample is not None else (0 if rank == 1 else 2)), n * n, m * m)
    if method == "auto":
        N, K = stats.N, stats.K
        unit = 2 * N * (n * n + K * m * m)  # one product with R and one with Rᵀ, per column
        power_cost = (0.5 * N * K * m * m if G_prev is None else 0) + p * unit  # one iteration
        gram_cost = math.inf if stats.T != 1 else N * N * (n + K * K * m) + rank * unit / 2
        method = "gram" if gram_cost < power_cost else "power"
    out: dict[str, Any] = {"method": method}
    if method == "gram":
        # block size: a Gram product costs one read of an N x N matrix whatever the (few) columns, so
        # wide blocks are nearly free and cut the number of blocks
        pg = min(rank + oversample if oversample is not None else max(16, rank + 8), stats.N)
        side = gram_warm_side(stats.N, stats.K, n, m, rank, pg, A_prev is not None, G_prev is not None)
        warm = None if side == "cold" else (side, A_prev if side == "a" else G_prev)
        sigma, A, G = _gram_svd(stats, rank, pg, tol, max(max_iter, 50), generator, out, warm)
    else:
        sigma, A, G = _power_svd(stats, rank, p, tol, max_iter, G_prev, generator, out)
        out["warm_side"] = "cold" if G_prev is None else "g"  # started from the previous G factors themselves
    raw = out.pop("raw_coefficients", None)
    if method == "gram":  # exactly symmetric by construction (weighted_covariances)
        sigma, A, G, fa, fg = _normalize(sigma, A, G, scales=True)
        ca, cg = raw  # per-factor sample weights of the returned unit-norm factors (zero columns for padding)
        ca, cg = ca * fa[:ca.shape[1]], cg * fg[:cg.shape[1]]
        z = ca.new_zeros(ca.shape[0], rank - ca.shape[1])
        out["factor_coefficients"] = (torch.cat([ca, z], 1), torch.cat([cg, z], 1))
    if info is not None:
        info.update(out)
    if method == "gram":
        return sigma, A, G
    return _finish_symmetric(sigma, A, G) if stats.T == 1 else _finish(sigma, A, G)


def _init_factors(init, n: int, m: int) -> tuple[Tensor | None, Tensor | None]:
    """``(A_prev (r, n, n) or None, G_prev (r, m, m) or None)`` from ``init``: a pair, a G stack alone, or None."""
    if init is None:
        return None, None
    A, G = init if isinstance(init, (tuple, list)) else (None, init)
    for F, d, what in ((A, n, "A"), (G, m, "G")):
        if F is not None and (F.dim() not in (2, 3) or F.shape[-2:] != (d, d)):
            raise ValueError(f"init: previous {what} factors must be ({d}, {d}) matrices, got {tuple(F.shape)}")
    return (None if A is None else A.reshape(-1, n, n)), (None if G is None else G.reshape(-1, m, m))


def gram_warm_side(N: int, K: int, n: int, m: int, rank: int, p: int, have_a: bool = True,
                   have_g: bool = True) -> str:
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


def _warm_block(stats: LayerStats, side: str, F: Tensor, rand: Tensor,
                Gw: Callable[[Tensor], Tensor]) -> tuple[Tensor, bool]:
    """Columns ``1..p-1`` of a warm first block (left sample coordinates, :func:`gram_warm_side`) from the
    previous factors ``F`` of one side and the random columns ``rand`` (``N x (p-1)``): side ``a``
    ``Gw [z_1..z_q, ρ…]``, side ``g`` ``[y_1..y_q, Gw ρ…]``; ``z``, ``y`` scaled to norm ``√N`` like ``ρ``,
    every output column too (zero stays zero). Returns the block and whether a ``Gw`` product ran."""
    q = min(F.shape[0], rand.shape[1])
    F = F[:q].to(device=stats.a.device, dtype=stats.a.dtype)
    if side == "a":
        a = stats.a[:, 0]
        rand[:, :q] = _unit(torch.stack([sym_quadratic_forms(a, _sym(Fk)) for Fk in F], 1), stats.N)  # Uᵀ vec(A_k)
        return _unit(Gw(rand), stats.N), True
    g = stats.g[:, :, 0].reshape(-1, stats.m)
    y = torch.stack([sym_quadratic_forms(g, _sym(Fk)) for Fk in F], 1)  # Wᵀ vec(G_k), rows (s, k')
    if stats.K > 1:
        y = y.reshape(stats.N, stats.K, -1).sum(1)
    rest = rand[:, q:]
    ran = rest.shape[1] > 0
    return torch.cat([_unit(y, stats.N), _unit(Gw(rest), stats.N) if ran else rest], 1), ran


def _unit(X: Tensor, N: int) -> Tensor:
    """Columns of ``X`` scaled to norm ``√N``; zero columns stay zero."""
    nrm = torch.linalg.vector_norm(X, dim=0)
    return X * torch.where(nrm > 0, math.sqrt(N) / nrm.clamp_min(torch.finfo(X.dtype).tiny), 0.0)


def _power_svd(stats, rank, p, tol, max_iter, init, generator, out):
    op = RearrangedOperator(stats)
    n, m = stats.n, stats.m
    cols = []
    if init is not None:
        cols.append(init.reshape(-1, m, m)[:p].to(stats.a.dtype))
    else:
        _, G0 = stats.kron_factors("expand")
        cols.append(G0.unsqueeze(0))
    have = sum(c.shape[0] for c in cols)
    if have < p:  # T > 1: antisymmetric singular vectors exist too, so start from general matrices
        cols.append(_sym_random(p - have, m, stats.a, generator, symmetric=stats.T == 1))
    X = _orth((cols[0] if len(cols) == 1 else torch.cat(cols)).reshape(p, -1).T)  # (m², p')
    theta2_prev, it, change = None, 0, math.inf
    while True:
        it += 1
        Y = op.matvec(X.T.reshape(-1, m, m)).reshape(X.shape[1], -1).T  # (n², p)
        if Y.shape[1] == 1:  # rank 1: QR of one column is a normalization
            ny = torch.linalg.vector_norm(Y)
            Q, sy = Y / ny.clamp_min(torch.finfo(Y.dtype).tiny), ny.reshape(1)
        else:
            Q, Rf = torch.linalg.qr(Y, mode="reduced")
            sy = torch.linalg.svdvals(Rf)
        Z = op.rmatvec(Q.T.reshape(-1, n, n)).reshape(Q.shape[1], -1).T  # (m², p)
        if Z.shape[1] == 1:  # rank 1: no Rayleigh–Ritz rotation
            sz, V = torch.linalg.vector_norm(Z).reshape(1), None
        else:
            evals, V = torch.linalg.eigh(Z.T @ Z)
            evals, V = evals.flip(0).clamp_min(0), V.flip(1)
            sz = evals.sqrt()
        theta2 = sz.pow(2)
        _check_finite_ritz(theta2, stats)
        change = pair_change(theta2, sy.pow(2) if theta2_prev is None else theta2_prev, rank, tol,
                             torch.finfo(Z.dtype).eps)
        theta2_prev = theta2
        keep = sz > sz[0] * torch.finfo(Z.dtype).eps
        if V is None:
            X = Z / sz.clamp_min(torch.finfo(Z.dtype).tiny)
        else:
            X = (Z @ V[:, keep]) / sz[keep]
        if change <= tol or it >= max_iter:
            break
    r = min(rank, int(keep.sum()))
    A = (Q[:, :r] if V is None else Q @ V[:, :r]).T.reshape(r, n, n)
    G = X[:, :r].T.reshape(r, m, m)
    # p = 1 (rank 1): A and G are (±) the last two products themselves; one-signed sample weights
    # prove both PSD (nonnegative combinations of a_s a_sᵀ and g_sk g_skᵀ) — no eigendecomposition.
    certified = p == 1 and r == 1 and op.one_signed["matvec"] and op.one_signed["rmatvec"]
    out.update(iterations=it, products=op.products, converged=change <= tol, energy_change=change,
               psd_certificate=certified)
    return _pad(sz[:r], A, G, rank)


def _check_finite_ritz(values: Tensor, stats: LayerStats) -> None:
    """Overflowing products of finite statistics (e.g. ``g ~ 1e25`` in float32) give non-finite Ritz values:
    stop at once instead of iterating on NaN (which a normalization would turn into zero factors)."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(f"layer {stats.name!r}: the Kronecker-sum fit overflowed in {stats.a.dtype} "
                             f"(max |a| = {float(stats.a.abs().max()):.3g}, "
                             f"max |g| = {float(stats.g.abs().max()):.3g})")


def _orth(X: Tensor) -> Tensor:
    if X.shape[1] == 1:
        return X / torch.linalg.vector_norm(X).clamp_min(torch.finfo(X.dtype).tiny)
    return orthonormalize(X)


def _gram_svd(stats, rank, p, tol, max_iter, generator, out, warm=None):
    """Block Krylov (Lanczos-type) Rayleigh–Ritz in sample space: blocks ``X, (Gw Gu) X, (Gw Gu)² X, …``
    (Euclidean-orthonormalized), Ritz pairs of ``Rᵀ R`` in the ``Gu`` metric after each block; every
    block costs two ``N x N`` products (``Z = Gu Y``, ``W = Gw Z``), which the Ritz step reuses.
    ``warm = (side, F)``: columns ``1..p-1`` of the first block from the previous factors (:func:`_warm_block`)."""
    N, m, c, dtype = stats.N, stats.m, stats.scale, stats.a.dtype
    g = stats.g[:, :, 0]
    Gu, Gw = gram_operator(stats.a[:, 0, None]), gram_operator(g)
    X = torch.randn(N, p, generator=generator, dtype=dtype, device="cpu").to(stats.a.device)
    X[:, 0] = 1.0  # K-FAC's A = U·1/N as the first direction
    side = "cold" if warm is None or p < 2 else warm[0]
    stepped = False
    if side != "cold":  # the previous factors mapped into this batch's sample space, the random columns stepped
        X[:, 1:], stepped = _warm_block(stats, side, warm[1], X[:, 1:], Gw)
    drop = 100 * torch.finfo(dtype).eps
    Ys, Zs, Ws = [], [], []
    theta_prev, it, change, invariant, energies = None, 0, math.inf, False, []
    while True:
        it += 1
        scale = float(torch.linalg.vector_norm(X, dim=0).max())
        if Ys:  # block Gram–Schmidt against the basis (twice), then QR within the block
            B = torch.cat(Ys, 1)
            for _ in range(2):
                X = X - B @ (B.T @ X)
        Q, Rq = torch.linalg.qr(X, mode="reduced")
        keep = torch.diagonal(Rq).abs() > drop * max(scale, torch.finfo(dtype).tiny)  # new directions only
        if Ys and not bool(keep.any()):
            invariant = True  # the Krylov space is invariant: the last Ritz pairs are exact
            break
        Q = Q[:, keep]
        lost = p - Q.shape[1]
        if 0 < lost and sum(y.shape[1] for y in Ys) + p <= N:  # refill: random directions keep the block width
            Bk = torch.cat([*Ys, Q], 1)
            Xr = torch.randn(N, lost, generator=generator, dtype=dtype, device="cpu").to(Q.device)
            for _ in range(2):
                Xr = Xr - Bk @ (Bk.T @ Xr)
            Q = torch.cat([Q, torch.linalg.qr(Xr, mode="reduced")[0]], 1)
        Z = Gu(Q)
        Ys.append(Q), Zs.append(Z), Ws.append(Gw(Z))
        Y, Zc, Wc = torch.cat(Ys, 1), torch.cat(Zs, 1), torch.cat(Ws, 1)
        S, H = (Y.T @ Zc).double(), (Zc.T @ Wc).double()
        ev, U = torch.linalg.eigh(0.5 * (S + S.T))
        ok = ev > drop * float(ev.max().clamp_min(torch.finfo(torch.float64).tiny))
        Cm = U[:, ok] / ev[ok].sqrt()  # U Y Cm orthonormal
        theta, V = torch.linalg.eigh(Cm.T @ (0.5 * (H + H.T)) @ Cm * c * c)
        theta, V = theta.flip(0).clamp_min(0), V.flip(1)
        _check_finite_ritz(theta, stats)
        if theta_prev is not None:
            change = pair_change(theta, theta_prev, rank, tol, torch.finfo(dtype).eps)
        theta_prev = theta
        energies.append(float(theta[:min(rank, theta.numel())].sum()))
        invariant = Y.shape[1] >= N
        if change <= tol or it >= max_iter or invariant:
            break
        X = Ws[-1]
    if invariant:
        change = 0.0
    coef = (Cm @ V).to(dtype)
    sz = theta.sqrt().to(dtype)
    r = min(rank, int((sz > sz[0] * torch.finfo(dtype).eps).sum()))
    ca = Y @ coef[:, :r]  # A_k = Σ_s ca[s,k] a_s a_sᵀ  (orthonormal)
    cg = c * (Zc @ coef[:, :r]) / sz[:r]  # G_k = Σ_{s,k'} cg[s,k] g_sk' g_sk'ᵀ = Rᵀ A_k / σ_k
    A = weighted_covariances(stats.a[:, 0], ca)
    cgk = cg.repeat_interleave(stats.K, dim=0) if stats.K > 1 else cg  # rows (s, k') of g
    G = weighted_covariances(g.reshape(-1, m), cgk)
    certified = r == 1 and _one_signed(ca.T) and _one_signed(cg.T)  # A_1, G_1 ± nonnegative combinations
    # term k is exactly sigma_k (Σ_s ca[s,k] a_s a_sᵀ) ⊗ (Σ_{u,k'} cg[u,k] g_uk' g_uk'ᵀ) (before and after
    # _normalize): the sample coefficients behind the sample-space PSD certificate of kron_sum
    out.update(iterations=it, products=2 * r, converged=change <= tol, energy_change=change,
               gram_passes=2 * len(Ys) + stepped, warm_side=side, energies=energies,
               psd_certificate=certified, sample_coefficients=(ca * sz[:r], cg), raw_coefficients=(ca, cg))
    return _pad(sz[:r], A, G, rank)


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


def _pad(sigma, A, G, rank):
    """Pad with zero terms when ``R(C)`` has rank below the requested ``rank``."""
    r = sigma.numel()
    if r == rank:
        return sigma, A, G
    z = rank - r
    return (torch.cat([sigma, sigma.new_zeros(z)]),
            torch.cat([A, A.new_zeros(z, *A.shape[1:])]), torch.cat([G, G.new_zeros(z, *G.shape[1:])]))
