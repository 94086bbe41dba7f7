"""Approximation-accuracy metrics: how close a structure ``Ĉ`` is to the exact block ``C``, at what cost.

The exact block of one layer (``tensorcurv/stats.py``) is never formed:

    C = scale Σ_j vec(G_j) vec(G_j)ᵀ,   j = (s, k),   G_j = Σ_t g_jt a_stᵀ   (m x n, column-major vec)

Everything below reduces to the per-sample factors ``a`` (N, T, n) and ``g`` (N, K, T, m):

* ``C vec(V) = scale Σ_j ⟨G_j, V⟩ G_j`` with ``⟨G_j, V⟩ = Σ_t g_jtᵀ V a_st`` (one pass, :class:`ExactBlock`).
* ``‖C‖_F² = scale² Σ_{j,j'} ⟨G_j, G_j'⟩²`` (Gram matrix of the per-sample gradients; for ``T = 1``
  ``⟨G_sk, G_s'k'⟩ = (a_sᵀ a_s')(g_skᵀ g_s'k')``), computed in row chunks.
* ``⟨C, Ĉ⟩ = scale Σ_j ⟨G_j, Ĉ G_j⟩`` and ``‖Ĉ‖_F²`` from the structure's own factors
  (:func:`inner_with_exact` / :func:`frobenius_sq`, dispatch tables keyed by structure class, with a
  generic fallback through ``Ĉ.mv``), so ``‖C − Ĉ‖_F² = ‖C‖² − 2⟨C, Ĉ⟩ + ‖Ĉ‖²`` is exact for any size.
* spectral norms by Lanczos (full re-orthogonalization) on the implicit product ``(C − Ĉ) v``;
* ``(C + λI)⁻¹ g`` by conjugate gradients on implicit products (or a dense solve on small layers);
* the floor: the optimal rank-r Kronecker-sum error ``sqrt(‖C‖² − Σ_{i≤r} σ_i²) / ‖C‖`` from the
  leading singular values of the rearranged block ``R(C)`` (``tensorcurv.rearrange``, Eckart–Young).

A model-level :class:`ExactModel` concatenates the covered layers (the same ``j = (s, k)`` index runs
through every layer of one capture), so off-diagonal blocks are part of ``C`` there.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tensorcurv.linalg import unvec, vec
from tensorcurv.stats import LayerStats
from tensorcurv.structures.base import Structure

#: Blocks with ``m n`` up to this size may use dense matrices of size ``(mn, mn)`` (auto paths).
DENSE_MAX_DIM = 2048


# =============================================================================== exact block
class ExactBlock:
    """The exact block ``C`` of one layer as an implicit operator over its per-sample factors."""

    def __init__(self, stats: LayerStats, chunk: int = 128) -> None:
        self.stats, self.chunk = stats, int(chunk)
        self.a, self.g, self.scale = stats.a, stats.g, float(stats.scale)
        self.m, self.n = stats.shape
        self.dim = self.m * self.n
        self.J = stats.N * stats.K  # number of per-sample gradients G_j
        self._gram: Tensor | None = None

    # ------------------------------------------------------------------ per-sample gradients
    def grads(self, s0: int, s1: int) -> Tensor:
        """``G_j`` for samples ``s0 ≤ s < s1`` (all ``k``), shape ``((s1-s0) K, m, n)``."""
        G = torch.einsum("sktm,stn->skmn", self.g[s0:s1], self.a[s0:s1])
        return G.reshape(-1, self.m, self.n)

    def grad_chunks(self):
        for s0 in range(0, self.stats.N, self.chunk):
            yield self.grads(s0, min(s0 + self.chunk, self.stats.N))

    # ------------------------------------------------------------------ products
    def coefficients(self, V: Tensor) -> Tensor:
        """``⟨G_sk, V⟩ = Σ_t g_sktᵀ V a_st`` as an ``(N, K)`` tensor (``V``: ``(m, n)``)."""
        return torch.einsum("sktm,mn,stn->sk", self.g, V, self.a)

    def combine(self, w: Tensor) -> Tensor:
        """``scale Σ_sk w_sk G_sk`` for coefficients ``w`` of shape ``(N, K)``."""
        return self.scale * torch.einsum("sk,sktm,stn->mn", w, self.g, self.a)

    def mv(self, V: Tensor) -> Tensor:
        """``C vec(V)`` reshaped to ``(m, n)``: ``scale Σ_j ⟨G_j, V⟩ G_j``."""
        return self.combine(self.coefficients(V))

    def gradient_sum(self) -> Tensor:
        """``scale Σ_j G_j`` (for the empirical kind this is the gradient of the loss)."""
        return self.combine(torch.ones(self.stats.N, self.stats.K, dtype=self.a.dtype, device=self.a.device))

    # ------------------------------------------------------------------ Gram matrix
    def gram_rows(self, s0: int, s1: int) -> Tensor:
        """Rows ``j = (s, k)``, ``s0 ≤ s < s1``, of the Gram matrix ``⟨G_j, G_j'⟩`` (``(·, J)``).

        ``T = 1``: ``(a_sᵀ a_s') (g_skᵀ g_s'k')`` from two small Gram matrices; otherwise the
        per-sample gradients of the row chunk against those of every column chunk.
        """
        K = self.stats.K
        if self.stats.T == 1:
            a, g = self.a[:, 0], self.g[:, :, 0]  # (N, n), (N, K, m)
            Ga = a[s0:s1] @ a.T  # (S, N)
            Gg = torch.einsum("skm,ulm->skul", g[s0:s1], g)  # (S, K, N, K)
            return (Ga[:, None, :, None] * Gg).reshape((s1 - s0) * K, self.J)
        rows = vec(self.grads(s0, s1))
        return torch.cat([rows @ vec(Gc).T for Gc in self.grad_chunks()], dim=1)

    def gram(self) -> Tensor:
        """The full ``(J, J)`` Gram matrix (cached); ``C`` and ``scale·Gram`` share their nonzero eigenvalues."""
        if self._gram is None:
            N = self.stats.N
            self._gram = torch.cat([self.gram_rows(s0, min(s0 + self.chunk, N))
                                    for s0 in range(0, N, self.chunk)], dim=0)
        return self._gram

    def frobenius_sq(self) -> float:
        """``‖C‖_F² = scale² Σ_{j,j'} ⟨G_j, G_j'⟩²`` (row chunks of the Gram matrix; exact)."""
        if self._gram is not None:
            return self.scale ** 2 * float(self._gram.pow(2).sum())
        N, total = self.stats.N, 0.0
        for s0 in range(0, N, self.chunk):
            total += float(self.gram_rows(s0, min(s0 + self.chunk, N)).pow(2).sum())
        return self.scale ** 2 * total

    def trace(self) -> float:
        """``tr C = scale Σ_j ‖G_j‖²``."""
        if self.stats.T == 1:
            return self.scale * float((self.a[:, 0].pow(2).sum(1)[:, None] * self.g[:, :, 0].pow(2).sum(2)).sum())
        return self.scale * sum(float(G.pow(2).sum()) for G in self.grad_chunks())

    def diagonal(self) -> Tensor:
        """``diag(C)`` as an ``(m, n)`` matrix: ``scale Σ_j G_j²`` (elementwise)."""
        if self.stats.T == 1:
            return self.scale * (self.g[:, :, 0].pow(2).sum(1).T @ self.a[:, 0].pow(2))
        return self.scale * sum(G.pow(2).sum(0) for G in self.grad_chunks())

    def eigenvalues(self) -> Tensor:
        """Nonzero spectrum of ``C`` (descending) as the eigenvalues of ``scale·Gram`` (``J x J``)."""
        return torch.linalg.eigvalsh(self.scale * self.gram()).flip(0).clamp_min(0)

    def to_dense(self) -> Tensor:
        """``C`` as an ``(mn, mn)`` matrix (tests and small layers only)."""
        C = self.a.new_zeros(self.dim, self.dim)
        for G in self.grad_chunks():
            P = vec(G)
            C += P.T @ P
        return self.scale * C


# =============================================================================== ⟨C, Ĉ⟩ and ‖Ĉ‖²
_INNER: dict[type, Callable[[Structure, ExactBlock], float]] = {}
_FROB: dict[type, Callable[[Structure], float]] = {}


def register_inner(cls: type):
    """Register a fast ``⟨C, Ĉ⟩`` formula for structures of class ``cls`` (used by :func:`inner_with_exact`)."""
    def deco(fn):
        _INNER[cls] = fn
        return fn
    return deco


def register_frobenius(cls: type):
    """Register a closed-form ``‖Ĉ‖_F²`` for structures of class ``cls`` (used by :func:`frobenius_sq`)."""
    def deco(fn):
        _FROB[cls] = fn
        return fn
    return deco


def _lookup(table: dict, structure: Structure):
    for cls in type(structure).__mro__:
        if cls in table:
            return table[cls]
    return None


def batched_mv(structure: Structure, V: Tensor) -> Tensor:
    """``Ĉ vec(V_b)`` for a stack ``V`` of shape ``(B, m, n)``: ``torch.vmap`` over ``mv``, else a loop."""
    try:
        return torch.vmap(structure.mv)(V)
    except Exception:  # a structure whose mv has data-dependent control flow
        return torch.stack([structure.mv(v) for v in V])


def inner_with_exact(structure: Structure, block: ExactBlock) -> float:
    """``⟨C, Ĉ⟩_F = scale Σ_j ⟨G_j, Ĉ G_j⟩`` (registered closed form, or batched ``mv`` over chunks)."""
    fn = _lookup(_INNER, structure)
    if fn is not None:
        return fn(structure, block)
    total = 0.0
    for G in block.grad_chunks():
        total += float((G * batched_mv(structure, G)).sum())
    return block.scale * total


def frobenius_sq(structure: Structure, dense_max_dim: int = DENSE_MAX_DIM) -> float:
    """``‖Ĉ‖_F²`` from the structure's factors (registered closed form), else from ``to_dense()`` on
    small blocks, else ``Σ_i ‖Ĉ e_i‖²`` over the unit matrices (exact, ``mn`` products)."""
    fn = _lookup(_FROB, structure)
    if fn is not None:
        return fn(structure)
    m, n = structure.shape
    if m * n <= dense_max_dim:
        return float(structure.to_dense().pow(2).sum())
    dtype = next(iter(structure.tensors().values())).dtype
    total = 0.0
    for i0 in range(0, m * n, 256):
        i1 = min(i0 + 256, m * n)
        E = torch.zeros(i1 - i0, m * n, dtype=dtype)
        E[torch.arange(i1 - i0), torch.arange(i0, i1)] = 1.0
        total += float(batched_mv(structure, unvec(E, m, n)).pow(2).sum())
    return total


def _register_builtin() -> None:
    from tensorcurv.structures.dense import Dense
    from tensorcurv.structures.diagonal import Diagonal
    from tensorcurv.structures.ekfac import EKFAC, projected_core
    from tensorcurv.structures.kfac import KFAC

    @register_inner(KFAC)
    def _kfac_inner(s, block):  # T = 1: scale Σ_sk (a_sᵀ A a_s)(g_skᵀ G g_sk)
        if block.stats.T != 1:
            return block.scale * sum(float((G * (s.G @ G @ s.A)).sum()) for G in block.grad_chunks())
        a, g = block.a[:, 0], block.g[:, :, 0]
        qa = ((a @ s.A) * a).sum(1)
        qg = ((g @ s.G) * g).sum(2)
        return block.scale * float((qa[:, None] * qg).sum())

    register_frobenius(KFAC)(lambda s: float(s.A.pow(2).sum() * s.G.pow(2).sum()))

    @register_inner(Diagonal)
    def _diag_inner(s, block):
        return float((block.diagonal() * s.D).sum())

    register_frobenius(Diagonal)(lambda s: float(s.D.pow(2).sum()))

    @register_inner(EKFAC)  # ⟨C, Q diag(S) Qᵀ⟩ = ⟨diag(Qᵀ C Q), S⟩
    def _ekfac_inner(s, block):
        return float((projected_core(block.stats, s.QA, s.QG, block.chunk) * s.S).sum())

    register_frobenius(EKFAC)(lambda s: float(s.S.pow(2).sum()))  # Q_A ⊗ Q_G orthogonal

    @register_inner(Dense)
    def _dense_inner(s, block):
        return block.scale * sum(float(((vec(G) @ s.C) * vec(G)).sum()) for G in block.grad_chunks())

    register_frobenius(Dense)(lambda s: float(s.C.pow(2).sum()))


_register_builtin()


def frobenius_error(structure: Structure, block: ExactBlock, c_frob_sq: float | None = None) -> dict[str, float]:
    """Exact ``‖C − Ĉ‖_F`` and ``‖C − Ĉ‖_F / ‖C‖_F`` (plus the three Frobenius terms)."""
    cc = block.frobenius_sq() if c_frob_sq is None else c_frob_sq
    ch = inner_with_exact(structure, block)
    hh = frobenius_sq(structure)
    err_sq = max(cc - 2.0 * ch + hh, 0.0)
    return {"c_frob_sq": cc, "inner": ch, "approx_frob_sq": hh, "fro_abs": math.sqrt(err_sq),
            "fro_rel": math.sqrt(err_sq / cc) if cc > 0 else float("nan")}


# =============================================================================== Lanczos
def lanczos(op: Callable[[Tensor], Tensor], dim: int, *, max_iter: int = 200, tol: float = 1e-10,
            dtype=torch.float64, seed: int = 0) -> Tensor:
    """Ritz values of a symmetric operator ``op`` on ``R^dim`` (ascending), Lanczos with full
    re-orthogonalization. Stops when the residual ``β_k |y_k|`` of both extreme Ritz pairs is below
    ``tol·max|θ|``, at an invariant subspace, or after ``min(max_iter, dim)`` steps (exact then)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=dtype)
    Q = [q / q.norm()]
    alphas, betas = [], []
    steps = min(max_iter, dim)
    for k in range(steps):
        w = op(Q[-1])
        alpha = float(w @ Q[-1])
        alphas.append(alpha)
        Qm = torch.stack(Q)
        for _ in range(2):  # full re-orthogonalization, twice is enough
            w = w - Qm.T @ (Qm @ w)
        beta = float(w.norm())
        Tk = torch.diag(torch.tensor(alphas, dtype=dtype))
        if betas:
            off = torch.tensor(betas, dtype=dtype)
            Tk = Tk + torch.diag(off, 1) + torch.diag(off, -1)
        theta, Y = torch.linalg.eigh(Tk)
        scale = float(theta.abs().max()) if theta.numel() else 0.0
        if beta <= 1e-14 * max(scale, 1e-300) or k == steps - 1:
            return theta
        resid = beta * Y[-1, [0, -1]].abs()
        if k >= 2 and float(resid.max()) <= tol * scale:
            return theta
        betas.append(beta)
        Q.append(w / beta)
    return theta  # pragma: no cover  (loop always returns)


def spectral_norm(op: Callable[[Tensor], Tensor], dim: int, **kw) -> float:
    """``‖M‖_2 = max |λ(M)|`` of a symmetric operator by Lanczos (see :func:`lanczos`)."""
    return float(lanczos(op, dim, **kw).abs().max())


def spectral_error(structure: Structure, block: ExactBlock, **kw) -> dict[str, float]:
    """``‖C − Ĉ‖_2`` and ``‖C − Ĉ‖_2 / ‖C‖_2`` via Lanczos on ``v ↦ C v − Ĉ v`` (never formed)."""
    m, n = block.m, block.n

    def diff(v):
        V = unvec(v, m, n)
        return vec(block.mv(V) - structure.mv(V))

    err = spectral_norm(diff, block.dim, **kw)
    c2 = float(block.eigenvalues()[0]) if block.J <= 4096 else spectral_norm(lambda v: vec(block.mv(unvec(v, m, n))),
                                                                             block.dim, **kw)
    return {"spec_abs": err, "spec_rel": err / c2 if c2 > 0 else float("nan"), "c_spec": c2}


# =============================================================================== damped inverse
def cg(op: Callable[[Tensor], Tensor], b: Tensor, *, tol: float = 1e-10, max_iter: int | None = None,
       ) -> tuple[Tensor, dict[str, Any]]:
    """Conjugate gradients for a symmetric positive-definite ``op``; stops at ``‖r‖ ≤ tol‖b‖``."""
    max_iter = max_iter or 10 * b.numel() + 10
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float((r * r).sum())
    bnorm = math.sqrt(float((b * b).sum()))
    it = 0
    while it < max_iter and math.sqrt(rr) > tol * bnorm:
        Ap = op(p)
        alpha = rr / float((p * Ap).sum())
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = float((r * r).sum())
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
    return x, {"iters": it, "rel_residual": math.sqrt(rr) / bnorm if bnorm > 0 else 0.0}


def exact_solve(block: ExactBlock, V: Tensor, damping: float, *, method: str = "auto",
                tol: float = 1e-10) -> tuple[Tensor, dict[str, Any]]:
    """``(C + λI)⁻¹ vec(V)`` reshaped to ``(m, n)``: ``dense`` (Cholesky of the formed block, small
    layers) or ``cg`` (conjugate gradients on implicit products); ``auto`` picks dense up to
    :data:`DENSE_MAX_DIM`."""
    if damping <= 0:
        raise ValueError(f"damping must be > 0 for the exact solve, got {damping}")
    if method == "auto":
        method = "dense" if block.dim <= DENSE_MAX_DIM else "cg"
    if method == "dense":
        M = block.to_dense() + damping * torch.eye(block.dim, dtype=V.dtype)
        x = torch.cholesky_solve(vec(V)[:, None], torch.linalg.cholesky(M))[:, 0]
        return unvec(x, block.m, block.n), {"method": "dense", "iters": 0, "rel_residual": 0.0}
    if method == "cg":
        x, info = cg(lambda P: block.mv(P) + damping * P, V, tol=tol)
        return x, {"method": "cg", **info}
    raise ValueError(f"unknown exact-solve method {method!r}; valid: auto, dense, cg")


def direction_quality(exact: Tensor, approx: Tensor) -> dict[str, float]:
    """Cosine and relative error ``‖x̂ − x‖/‖x‖`` between two directions."""
    en, an = float(exact.norm()), float(approx.norm())
    cos = float((exact * approx).sum()) / (en * an) if en > 0 and an > 0 else float("nan")
    return {"cos": cos, "rel_err": float((approx - exact).norm()) / en if en > 0 else float("nan")}


def inverse_quality(structure: Structure, block: ExactBlock, grad: Tensor, damping_rel: Sequence[float],
                    *, method: str = "auto", repeats: int = 3) -> list[dict[str, float]]:
    """For each ``ρ`` in ``damping_rel``: ``λ = ρ tr(C)/(mn)``, compare ``x̂ = (Ĉ + λI)⁻¹g`` to the exact
    ``x = (C + λI)⁻¹g`` (cosine, relative error), with the median solve time of ``Ĉ``."""
    base = block.trace() / block.dim
    rows = []
    for rho in damping_rel:
        lam = float(rho) * base
        x, info = exact_solve(block, grad, lam, method=method)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            xh = structure.solve(grad, lam)
            times.append(time.perf_counter() - t0)
        rows.append({"damping_rel": float(rho), "damping": lam, **direction_quality(x, xh),
                     "solve_time": statistics.median(times), "exact_iters": info["iters"]})
    return rows


# =============================================================================== floor
def kronecker_floor(block: ExactBlock, ranks: Sequence[int], c_frob_sq: float | None = None,
                    **svd_kw) -> dict[int, float]:
    """``floor_r = sqrt(‖C‖² − Σ_{i≤r} σ_i²) / ‖C‖``: the smallest relative Frobenius error of any
    sum of ``r`` Kronecker products (Eckart–Young on ``R(C)``; singular values by
    ``tensorcurv.rearrange.kronecker_svd``)."""
    from tensorcurv.rearrange import kronecker_svd

    ranks = sorted({int(r) for r in ranks})
    rmax = min(ranks[-1], block.n * block.n, block.m * block.m)
    sigma = kronecker_svd(block.stats, rmax, **svd_kw)[0]
    cc = block.frobenius_sq() if c_frob_sq is None else c_frob_sq
    csum = torch.cumsum(sigma.double().pow(2), 0)
    out = {}
    for r in ranks:
        head = float(csum[min(r, len(csum)) - 1])
        out[r] = math.sqrt(max(cc - head, 0.0) / cc) if cc > 0 else float("nan")
    return out


# =============================================================================== model level
class ExactModel:
    """The exact curvature of all covered layers together (off-diagonal blocks included):
    ``C = scale Σ_j vec(G_j) vec(G_j)ᵀ`` with ``G_j`` the concatenation of the layers' ``G_j``."""

    def __init__(self, blocks: Mapping[str, ExactBlock]) -> None:
        self.blocks = dict(blocks)
        first = next(iter(self.blocks.values()))
        self.scale = first.scale
        self.dim = sum(b.dim for b in self.blocks.values())

    def mv(self, V: Mapping[str, Tensor]) -> dict[str, Tensor]:
        w = sum(b.coefficients(V[k]) for k, b in self.blocks.items())
        return {k: b.combine(w) for k, b in self.blocks.items()}

    def frobenius_sq(self) -> float:
        """``scale² ‖Σ_l Gram_l‖_F²`` (the Gram matrices of the layers add up)."""
        return self.scale ** 2 * float(sum(b.gram() for b in self.blocks.values()).pow(2).sum())

    def trace(self) -> float:
        return sum(b.trace() for b in self.blocks.values())

    def solve(self, V: Mapping[str, Tensor], damping: float, tol: float = 1e-10):
        """``(C + λI)⁻¹ V`` by CG over the dict of layer matrices."""
        keys = list(self.blocks)
        shapes = [(self.blocks[k].m, self.blocks[k].n) for k in keys]

        def flat(D):
            return torch.cat([vec(D[k]) for k in keys])

        def unflat(x):
            out, i = {}, 0
            for k, (m, n) in zip(keys, shapes):
                out[k] = unvec(x[i:i + m * n], m, n)
                i += m * n
            return out

        x, info = cg(lambda p: flat(self.mv(unflat(p))) + damping * p, flat(V), tol=tol)
        return unflat(x), info


def model_direction_quality(exact: Mapping[str, Tensor], approx: Mapping[str, Tensor]) -> dict[str, float]:
    keys = list(exact)
    return direction_quality(torch.cat([vec(exact[k]) for k in keys]), torch.cat([vec(approx[k]) for k in keys]))
