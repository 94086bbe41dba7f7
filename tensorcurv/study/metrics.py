"""Approximation-accuracy metrics: how close a structure ``Ĉ`` is to the exact block ``C``, at what cost.

The exact block of one layer (``tensorcurv/core/stats.py``) is never formed:

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
  leading singular values of the rearranged block ``R(C)`` (``tensorcurv.linalg.rearrange``, Eckart–Young).

A model-level :class:`ExactModel` concatenates the covered layers (the same ``j = (s, k)`` index runs
through every layer of one capture), so off-diagonal blocks are part of ``C`` there.
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from tensorcurv import structures
from tensorcurv.core.capture import check_kind
from tensorcurv.core.losses import as_loss_spec
from tensorcurv.core.stats import LayerStats
from tensorcurv.curvature import Curvature
from tensorcurv.linalg import unvec, vec
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

    def gram_eigh(self) -> tuple[Tensor, Tensor]:
        """Cached ``eigh`` of the Gram matrix (ascending)."""
        if getattr(self, "_gram_eigh", None) is None:
            self._gram_eigh = torch.linalg.eigh(self.gram())
        return self._gram_eigh

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
        return (self.scale * self.gram_eigh()[0]).flip(0).clamp_min(0)

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

    try:
        from tensorcurv.structures.kron_sum.structure import KronSum
    except ImportError:  # pragma: no cover  (older checkouts)
        return

    @register_inner(KronSum)  # Ĉ = Σ_r A_r ⊗ G_r; T = 1: scale Σ_r Σ_sk (a_sᵀ A_r a_s)(g_skᵀ G_r g_sk)
    def _kron_sum_inner(s, block):
        if block.stats.T != 1:
            return block.scale * sum(float((G * batched_mv(s, G)).sum()) for G in block.grad_chunks())
        a, g = block.a[:, 0], block.g[:, :, 0]
        qa = torch.einsum("sn,rnl,sl->rs", a, s.A, a)
        qg = torch.einsum("skm,rmi,ski->rsk", g, s.G, g)
        return block.scale * float((qa[:, :, None] * qg).sum())

    @register_frobenius(KronSum)  # Σ_{r,q} ⟨A_r, A_q⟩ ⟨G_r, G_q⟩
    def _kron_sum_frob(s):
        A, G = s.A.flatten(1), s.G.flatten(1)
        return float(((A @ A.T) * (G @ G.T)).sum())


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
            dtype=torch.float64, seed: int = 0, return_residuals: bool = False):
    """Ritz values of a symmetric operator ``op`` on ``R^dim`` (ascending), Lanczos with full
    re-orthogonalization. Stops when the residual ``β_k |y_k|`` of both extreme Ritz pairs is below
    ``tol·max|θ|``, at an invariant subspace, or after ``min(max_iter, dim)`` steps (exact then).
    Only the extreme Ritz values are converged at an early stop; ``return_residuals=True`` also
    returns every Ritz pair's residual ``β_k |y_k|`` to tell which interior ones are."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=dtype)
    Q = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
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
        done = beta <= 1e-14 * max(scale, 1e-300) or k == steps - 1
        if not done:
            resid = beta * Y[-1, [0, -1]].abs()
            done = k >= 2 and float(resid.max()) <= tol * scale
        if done:
            return (theta, beta * Y[-1].abs()) if return_residuals else theta
        betas.append(beta)
        Q.append(w / beta)
    return theta  # pragma: no cover  (loop always returns)


def spectral_norm(op: Callable[[Tensor], Tensor], dim: int, **kw) -> float:
    """``‖M‖_2 = max |λ(M)|`` of a symmetric operator by Lanczos (see :func:`lanczos`)."""
    return float(lanczos(op, dim, **kw).abs().max())


def asymmetry(structure: Structure, probes: int = 3, seed: int = 0) -> float:
    """``max |uᵀĈv − vᵀĈu| / ‖Ĉ‖_F`` over random unit ``u, v`` (0 for a symmetric ``Ĉ``, up to rounding)."""
    m, n = structure.shape
    dtype = next(iter(structure.tensors().values())).dtype
    gen = torch.Generator().manual_seed(seed)
    norm = math.sqrt(max(frobenius_sq(structure), 0.0))
    worst = 0.0
    for _ in range(probes):
        U, V = (torch.randn(m, n, generator=gen, dtype=dtype) for _ in range(2))
        U, V = U / U.norm(), V / V.norm()
        worst = max(worst, abs(float((U * structure.mv(V)).sum() - (V * structure.mv(U)).sum())))
    return worst / norm if norm > 0 else 0.0


def spectral_error(structure: Structure, block: ExactBlock, *, asym_tol: float = 1e-8,
                   dense_max_dim: int = 8192, **kw) -> dict[str, float]:
    """``‖C − Ĉ‖_2`` (largest singular value) and ``‖C − Ĉ‖_2 / ‖C‖_2``.

    Symmetric ``Ĉ``: Lanczos on ``v ↦ C v − Ĉ v`` (never formed), ``max |λ|``. A non-symmetric ``Ĉ``
    (``asymmetry > asym_tol``) needs ``Ĉᵀ`` products: Lanczos on ``(C − Ĉ)ᵀ(C − Ĉ)`` with ``Ĉᵀ`` from
    ``to_dense()`` up to ``dense_max_dim``, else NaN. ``asym`` is reported either way."""
    m, n = block.m, block.n
    asym = asymmetry(structure)

    def diff(v):
        V = unvec(v, m, n)
        return vec(block.mv(V) - structure.mv(V))

    if asym <= asym_tol:
        err = spectral_norm(diff, block.dim, **kw)
    elif block.dim <= dense_max_dim:
        DT = structure.to_dense().T

        def normal(v):
            w = diff(v)
            return vec(block.mv(unvec(w, m, n))) - DT @ w

        err = math.sqrt(max(float(lanczos(normal, block.dim, **kw).max()), 0.0))
    else:
        err = float("nan")
    c2 = float(block.eigenvalues()[0]) if block.J <= 4096 else spectral_norm(lambda v: vec(block.mv(unvec(v, m, n))),
                                                                             block.dim, **kw)
    return {"spec_abs": err, "spec_rel": err / c2 if c2 > 0 else float("nan"), "c_spec": c2, "asym": asym}


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


def woodbury_solve(gram: Tensor, scale: float, coefficients: Callable[[Any], Tensor],
                   combine: Callable[[Tensor], Any], V, damping: float, eig=None):
    """``(scale PᵀP + λI)⁻¹ v = (v − Pᵀ (λ/scale I + P Pᵀ)⁻¹ P v) / λ`` with ``P`` the stacked per-sample
    gradients (never formed): ``P Pᵀ`` is the ``(J, J)`` Gram matrix, ``P v`` = ``coefficients(V)``,
    ``Pᵀ w`` = ``combine(w) / scale``. Exact; ``eig``: a cached ``eigh(gram)``."""
    e, U = eig if eig is not None else torch.linalg.eigh(gram)
    w = coefficients(V)
    shape = w.shape
    z = U @ ((U.T @ w.reshape(-1)) / (damping / scale + e.clamp_min(0)))
    back = combine(z.reshape(shape))
    if isinstance(V, Mapping):
        return {k: (V[k] - back[k] / scale) / damping for k in V}
    return (V - back / scale) / damping


def exact_solve(block: ExactBlock, V: Tensor, damping: float, *, method: str = "auto",
                tol: float = 1e-10) -> tuple[Tensor, dict[str, Any]]:
    """``(C + λI)⁻¹ vec(V)`` reshaped to ``(m, n)``, exact by one of

    * ``woodbury``: the ``J x J`` Gram system of the per-sample gradients (:func:`woodbury_solve`);
    * ``dense``: Cholesky of the formed block (small layers);
    * ``cg``: conjugate gradients on implicit products ``C v`` (any size, iterative).

    ``auto``: woodbury when ``J ≤ 4096``, else dense up to :data:`DENSE_MAX_DIM`, else cg."""
    if damping <= 0:
        raise ValueError(f"damping must be > 0 for the exact solve, got {damping}")
    if method == "auto":
        method = "woodbury" if block.J <= 4096 else ("dense" if block.dim <= DENSE_MAX_DIM else "cg")
    if method == "woodbury":
        x = woodbury_solve(block.gram(), block.scale, block.coefficients, block.combine, V, damping,
                           eig=block.gram_eigh())
        return x, {"method": "woodbury", "iters": 0, "rel_residual": 0.0}
    if method == "dense":
        M = block.to_dense() + damping * torch.eye(block.dim, dtype=V.dtype)
        x = torch.cholesky_solve(vec(V)[:, None], torch.linalg.cholesky(M))[:, 0]
        return unvec(x, block.m, block.n), {"method": "dense", "iters": 0, "rel_residual": 0.0}
    if method == "cg":
        x, info = cg(lambda P: block.mv(P) + damping * P, V, tol=tol)
        return x, {"method": "cg", **info}
    raise ValueError(f"unknown exact-solve method {method!r}; valid: auto, woodbury, dense, cg")


def direction_quality(exact: Tensor, approx: Tensor) -> dict[str, float]:
    """Cosine and relative error ``‖x̂ − x‖/‖x‖`` between two directions."""
    en, an = float(exact.norm()), float(approx.norm())
    cos = float((exact * approx).sum()) / (en * an) if en > 0 and an > 0 else float("nan")
    return {"cos": cos, "rel_err": float((approx - exact).norm()) / en if en > 0 else float("nan")}


def exact_directions(block: ExactBlock, grad: Tensor, damping_rel: Sequence[float], *, method: str = "auto",
                     ) -> dict[float, tuple[float, Tensor, dict[str, Any]]]:
    """``{ρ: (λ, (C + λI)⁻¹g, info)}`` with ``λ = ρ tr(C)/(mn)`` (shared by every structure compared)."""
    base = block.trace() / block.dim
    return {float(rho): (float(rho) * base, *exact_solve(block, grad, float(rho) * base, method=method))
            for rho in damping_rel}


def inverse_quality(structure: Structure, block: ExactBlock, grad: Tensor, damping_rel: Sequence[float],
                    *, method: str = "auto", repeats: int = 3,
                    exact: Mapping[float, tuple[float, Tensor, dict[str, Any]]] | None = None,
                    ) -> list[dict[str, float]]:
    """For each ``ρ`` in ``damping_rel``: ``λ = ρ tr(C)/(mn)``, compare ``x̂ = (Ĉ + λI)⁻¹g`` to the exact
    ``x = (C + λI)⁻¹g`` (cosine, relative error), with the median solve time of ``Ĉ``.
    ``exact``: precomputed :func:`exact_directions` (else computed here with ``method``)."""
    exact = exact if exact is not None else exact_directions(block, grad, damping_rel, method=method)
    rows = []
    for rho in damping_rel:
        lam, x, info = exact[float(rho)]
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
    ``tensorcurv.linalg.rearrange.kronecker_svd``, by default to a relative energy change of 1e-10)."""
    from tensorcurv.linalg.rearrange import kronecker_svd

    ranks = sorted({int(r) for r in ranks})
    rmax = min(ranks[-1], block.n * block.n, block.m * block.m)
    svd_kw = {"tol": 1e-10, "max_iter": 500, "generator": torch.Generator().manual_seed(0), **svd_kw}
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
        return self.combine(self.coefficients(V))

    def frobenius_sq(self) -> float:
        """``scale² ‖Σ_l Gram_l‖_F²`` (the Gram matrices of the layers add up)."""
        return self.scale ** 2 * float(self.gram().pow(2).sum())

    def trace(self) -> float:
        return sum(b.trace() for b in self.blocks.values())

    def gram(self) -> Tensor:
        """``⟨G_j, G_j'⟩`` summed over layers (``J x J``); cached ``eigh`` in :meth:`gram_eigh`."""
        return cast(Tensor, sum(b.gram() for b in self.blocks.values()))

    def gram_eigh(self) -> tuple[Tensor, Tensor]:
        if getattr(self, "_eigh", None) is None:
            self._eigh = torch.linalg.eigh(self.gram())
        return self._eigh

    def coefficients(self, V: Mapping[str, Tensor]) -> Tensor:
        return cast(Tensor, sum(b.coefficients(V[k]) for k, b in self.blocks.items()))

    def combine(self, w: Tensor) -> dict[str, Tensor]:
        return {k: b.combine(w) for k, b in self.blocks.items()}

    def solve(self, V: Mapping[str, Tensor], damping: float, *, method: str = "woodbury", tol: float = 1e-10):
        """``(C + λI)⁻¹ V`` over the dict of layer matrices: ``woodbury`` (exact, ``J x J`` Gram
        system) or ``cg`` (conjugate gradients on implicit products)."""
        if method == "woodbury":
            x = woodbury_solve(self.gram(), self.scale, self.coefficients, self.combine, V, damping,
                               eig=self.gram_eigh())
            return x, {"method": "woodbury", "iters": 0}
        if method != "cg":
            raise ValueError(f"unknown method {method!r}; valid: woodbury, cg")
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


# =============================================================================== studies
@dataclass
class Variant:
    """One structure configuration compared in a study: registry name, hyper-parameters, label."""

    structure: str
    hparams: dict[str, Any]
    label: str
    swept: dict[str, Any] = field(default_factory=dict)


def make_variants(names: str | Sequence[str] = "all", hparams: Mapping[str, Mapping] | None = None,
                  sweeps: Mapping[str, Mapping[str, Sequence]] | None = None) -> list[Variant]:
    """Variants for ``names`` (``"all"``: every registered structure once, aliases dropped), each with
    fixed ``hparams[name]`` and the cartesian product of ``sweeps[name]`` (``{key: [values]}``).
    Every combination is validated by the structure's ``Hparams`` (clear error on a bad key);
    sweeps of unregistered structures are ignored, so a config can name structures still to come."""
    hparams, sweeps = dict(hparams or {}), dict(sweeps or {})
    if names == "all":
        canon: dict[type, str] = {}
        for n in structures.names():
            canon.setdefault(structures.get(n), structures.get(n).name or n)
        names = sorted(set(canon.values()))
    out = []
    for name in names:
        structures.get(name)  # unknown name -> ValueError listing the valid ones
        base = dict(hparams.get(name) or {})
        grid = dict(sweeps.get(name) or {})
        keys = sorted(grid)
        for combo in itertools.product(*(list(grid[k]) for k in keys)) if keys else [()]:
            swept = dict(zip(keys, combo))
            hp = {**base, **swept}
            structures.make_hparams(name, **hp)
            label = name if not swept else f"{name}(" + ",".join(f"{k}={_fmt(v)}" for k, v in swept.items()) + ")"
            out.append(Variant(name, hp, label, swept))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)


def _fit_variant(variant: Variant, stats: Mapping[str, LayerStats]):
    """Fit one variant on every layer; returns ``(per-layer structures, model solve fn, fit time)``."""
    cls = structures.get(variant.structure)
    hp = structures.make_hparams(variant.structure, **variant.hparams)
    t0 = time.perf_counter()
    if cls.scope == "model":
        ms = cls({k: st.shape for k, st in stats.items()}, hp).fit(dict(stats))
        fit_time = time.perf_counter() - t0
        nan_times = {k: float("nan") for k in stats}
        return dict(ms.blocks), (lambda mats, lam: ms.solve(mats, lam)), ms.nbytes, nan_times, fit_time
    blocks, times = {}, {}
    for k, st in stats.items():
        tb = time.perf_counter()
        blocks[k] = cls(st.shape, hp).fit(st)
        times[k] = time.perf_counter() - tb
    fit_time = time.perf_counter() - t0
    nbytes = sum(b.nbytes for b in blocks.values())
    return blocks, (lambda mats, lam: {k: blocks[k].solve(v, lam) for k, v in mats.items()}), nbytes, times, fit_time


def _floors(block: ExactBlock, ranks: Sequence[int], cc: float) -> dict[int, float]:
    try:
        return kronecker_floor(block, ranks, cc)
    except ImportError:  # tensorcurv.linalg.rearrange not available
        return {}


def evaluate(stats: Mapping[str, LayerStats], grads: Mapping[str, Tensor], variants: Sequence[Variant], *,
             damping_rel: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0), floor_ranks: Sequence[int] = (1, 2, 3, 4),
             spectral: bool = True, spectral_max_iter: int = 60, spectral_tol: float = 1e-6,
             spectrum: bool = True, spectrum_layer: str | None = None, spectrum_k: int = 60, chunk: int = 128,
             solve_repeats: int = 1,
             log: Callable[[str], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """All metrics of every variant on one capture (one checkpoint, one curvature kind).

    Returns ``{"metrics": rows, "floor": rows, "spectra": rows}``. ``metrics`` has one row per
    (variant, layer) plus one ``layer="(model)"`` row: ``fro_rel`` = the block-diagonal error
    ``sqrt(Σ_l ‖C_ll − Ĉ_l‖² / Σ_l ‖C_ll‖²)``, ``fro_rel_full`` = the error against the full
    covered-parameter curvature (cross-layer blocks included: ``‖C − Ĉ‖² = Σ_l ‖C_ll − Ĉ_l‖² +
    ‖C_offdiag‖²``, ``offdiag_share`` = ``‖C_offdiag‖/‖C‖``), and the inverse quality of the whole-model
    solve against the full ``(C + λI)⁻¹g`` (where ``two_level``'s coarse space can help).
    """
    log = log or (lambda msg: None)
    blocks = {k: ExactBlock(st, chunk=chunk) for k, st in stats.items()}
    model = ExactModel(blocks)
    cc = {k: b.frobenius_sq() for k, b in blocks.items()}
    cc_model = model.frobenius_sq()
    offdiag_sq = max(cc_model - sum(cc.values()), 0.0)
    exact = {k: exact_directions(b, grads[k], damping_rel) for k, b in blocks.items()}
    base_model = model.trace() / model.dim
    exact_model = {float(r): (float(r) * base_model, *model.solve(grads, float(r) * base_model)) for r in damping_rel}

    floor_rows = []
    for k, b in blocks.items():
        for r, f in _floors(b, floor_ranks, cc[k]).items():
            floor_rows.append({"layer": k, "m": b.m, "n": b.n, "rank": r, "floor": f})

    spectrum_layer = spectrum_layer if spectrum_layer in blocks else next(iter(blocks))
    sb = blocks[spectrum_layer]
    spectra = [{"layer": spectrum_layer, "structure": "exact", "index": i, "eigenvalue": float(v)}
               for i, v in enumerate(sb.eigenvalues()[:spectrum_k])] if spectrum else []

    rows = []
    for var in variants:
        try:
            fitted, model_solve, nbytes_total, fit_times, fit_total = _fit_variant(var, stats)
        except (ValueError, RuntimeError, NotImplementedError) as err:
            log(f"  {var.label}: skipped ({err})")
            rows.append({"layer": "(model)", "structure": var.structure, "variant": var.label,
                         "hparams": json.dumps(var.hparams, sort_keys=True), **_swept(var), "skipped": str(err)})
            continue
        err_sq_total = offdiag_sq
        for k, b in blocks.items():
            S = fitted[k]
            row = {"layer": k, "m": b.m, "n": b.n, "T": b.stats.T, "structure": var.structure, "variant": var.label,
                   "hparams": json.dumps(var.hparams, sort_keys=True), **_swept(var), "nbytes": S.nbytes,
                   "fit_time": fit_times[k], "c_frob": math.sqrt(cc[k])}
            fe = frobenius_error(S, b, cc[k])
            err_sq_total += fe["fro_abs"] ** 2
            row.update(fro_rel=fe["fro_rel"], fro_abs=fe["fro_abs"])
            if spectral:
                se = spectral_error(S, b, max_iter=spectral_max_iter, tol=spectral_tol)
                row.update(spec_rel=se["spec_rel"], spec_abs=se["spec_abs"], asym=se["asym"])
            iq = inverse_quality(S, b, grads[k], damping_rel, exact=exact[k], repeats=solve_repeats)
            row.update(_inverse_columns(iq))
            rows.append(row)
            if spectrum and k == spectrum_layer:
                ev = _structure_spectrum(S, spectrum_k)
                spectra += [{"layer": k, "structure": var.label, "index": i, "eigenvalue": float(v)}
                            for i, v in enumerate(ev)]
        mrow = {"layer": "(model)", "m": None, "n": None, "T": None, "structure": var.structure, "variant": var.label,
                "hparams": json.dumps(var.hparams, sort_keys=True), **_swept(var), "nbytes": nbytes_total,
                "fit_time": fit_total, "c_frob": math.sqrt(sum(cc.values())),
                "fro_rel": math.sqrt((err_sq_total - offdiag_sq) / sum(cc.values())),
                "fro_abs": math.sqrt(err_sq_total - offdiag_sq),
                "fro_rel_full": math.sqrt(err_sq_total / cc_model), "offdiag_share": math.sqrt(offdiag_sq / cc_model)}
        iq = []
        for rho in damping_rel:
            lam, x, _ = exact_model[float(rho)]
            t0 = time.perf_counter()
            xh = model_solve(dict(grads), lam)
            iq.append({"damping_rel": float(rho), **model_direction_quality(x, xh),
                       "solve_time": time.perf_counter() - t0})
        mrow.update(_inverse_columns(iq))
        rows.append(mrow)
        log(f"  {var.label:<28s} model fro_rel={mrow['fro_rel']:.4f} nbytes={nbytes_total}")
    return {"metrics": rows, "floor": floor_rows, "spectra": spectra}


def _swept(var: Variant) -> dict[str, Any]:
    rank = var.hparams.get("rank", var.hparams.get("ranks", ""))
    return {"rank": _fmt(rank) if rank != "" else "",
            "swept": json.dumps(var.swept, sort_keys=True) if var.swept else ""}


def _inverse_columns(iq: Sequence[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in iq:
        tag = f"{r['damping_rel']:g}"
        out[f"cos@{tag}"] = r["cos"]
        out[f"relerr@{tag}"] = r["rel_err"]
    out["solve_time"] = statistics.median(r["solve_time"] for r in iq)
    return out


def _structure_spectrum(S: Structure, k: int, dense_max_dim: int = 8192) -> Tensor:
    """Leading ``k`` eigenvalues of ``Ĉ`` (descending): dense ``eigvalsh`` up to ``dense_max_dim``, else
    Lanczos keeping only the Ritz values whose residual is below ``1e-6·max|θ|`` (converged)."""
    m, n = S.shape
    if m * n <= dense_max_dim:
        return torch.linalg.eigvalsh(S.to_dense()).flip(0)[:k]
    theta, resid = lanczos(lambda v: vec(S.mv(unvec(v, m, n))), m * n, max_iter=3 * k + 20, tol=0.0,
                           return_residuals=True)
    keep = resid <= 1e-6 * theta.abs().max()
    return theta[keep].flip(0)[:k]


# ------------------------------------------------------------------------------- over training
KINDS = ("empirical", "mc", "ggn")


def checkpoint_steps(total: int, fractions: Sequence[float]) -> list[int]:
    """Training steps at which the metrics are taken, e.g. ``(0, 0.1, 0.5, 1)`` of ``total``."""
    return sorted({int(round(float(f) * total)) for f in fractions})


def _build_model_and_data(cfg: Mapping[str, Any], dtype: torch.dtype):
    from tensorcurv.experiments import data as tc_data
    from tensorcurv.experiments import models as tc_models

    dcfg = dict(cfg.get("data") or {})
    splits = tc_data.load(dcfg.pop("name", "digits"), dtype=dtype, seed=int(cfg.get("seed", 0)), **dcfg)
    mcfg = dict(cfg.get("model") or {})
    with torch.random.fork_rng(devices=[]):  # seeded init (torch.nn draws from the global generator), restored after
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = tc_models.build(mcfg.pop("name", "mlp"), splits.input_shape, splits.num_classes, **mcfg).to(dtype)
    return splits, model


def _val_accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


def run_study(cfg: Mapping[str, Any], log: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    """Train a model (Adam on the mean cross-entropy) and evaluate :func:`evaluate` at checkpoints,
    for every curvature kind. ``cfg``: ``seed, dtype, data{name,..}, model{name,..}, loss,
    train{steps, batch_size, lr}, study{kinds, mc_samples, batch_size, checkpoints, structures,
    hparams, sweeps, damping_rel, floor_ranks, spectral, spectral_max_iter, spectral_tol,
    spectrum_layer, spectrum_k, chunk, solve_repeats}``. Returns the raw tables (``metrics``, ``floor``,
    ``spectra``, ``training``); every row carries ``step`` and ``kind``."""
    dtype = getattr(torch, str(cfg.get("dtype", "float64")))
    scfg, tcfg = dict(cfg.get("study") or {}), dict(cfg.get("train") or {})
    splits, model = _build_model_and_data(cfg, dtype)
    loss_name = str(cfg.get("loss", "cross_entropy"))
    loss = as_loss_spec(loss_name)
    variants = make_variants(scfg.get("structures", "all"), scfg.get("hparams"), scfg.get("sweeps"))
    kinds = list(scfg.get("kinds", KINDS))
    for kd in kinds:
        check_kind(kd, int(scfg.get("mc_samples", 1)))
    Xtr, ytr = splits.train
    nb = min(int(scfg.get("batch_size", 128)), Xtr.shape[0])
    Xs, ys = Xtr[:nb], ytr[:nb]
    steps = int(tcfg.get("steps", 200))
    checkpoints = checkpoint_steps(steps, scfg.get("checkpoints", (0, 0.1, 0.5, 1.0)))
    opt = torch.optim.Adam(model.parameters(), lr=float(tcfg.get("lr", 1e-3)))
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    bs = int(tcfg.get("batch_size", 64))
    ev_kw = {k: scfg[k] for k in ("damping_rel", "floor_ranks", "spectral", "spectral_max_iter", "spectral_tol",
                                  "spectrum_layer", "spectrum_k", "chunk", "solve_repeats")
             if k in scfg and scfg[k] is not None}
    out: dict[str, list[dict[str, Any]]] = {"metrics": [], "floor": [], "spectra": [], "training": []}
    log(f"study: {len(variants)} variants x {len(kinds)} kinds at steps {checkpoints}; "
        f"structures {sorted({v.structure for v in variants})}")
    train_loss = float("nan")
    for step in range(steps + 1):
        if step in checkpoints:
            model.eval()
            acc = _val_accuracy(model, *splits.val) if splits.val[0].shape[0] else float("nan")
            out["training"].append({"step": step, "train_loss": train_loss, "val_accuracy": acc})
            log(f"step {step}: train loss {train_loss:.4f}, val accuracy {acc:.3f}")
            grads_curv = Curvature(model, "diagonal", "empirical")
            grads = {k: ExactBlock(st).gradient_sum() for k, st in grads_curv.capture(Xs, ys, loss).stats.items()}
            for kd in kinds:
                log(f" kind {kd}")
                curv = Curvature(model, "diagonal", kd, mc_samples=int(scfg.get("mc_samples", 1)),
                                 seed=int(cfg.get("seed", 0)) + step)
                stats = curv.capture(Xs, ys, loss).stats
                res = evaluate(stats, grads, variants, log=log, spectrum=step == checkpoints[-1], **ev_kw)
                for table, rows in res.items():
                    out[table] += [{"step": step, "kind": kd, **r} for r in rows]
            model.train()
        if step == steps:
            break
        idx = torch.randint(0, Xtr.shape[0], (bs,), generator=gen)
        opt.zero_grad()
        value = loss(model(Xtr[idx]), ytr[idx])
        value.backward()
        opt.step()
        train_loss = float(value.detach())
    return out
