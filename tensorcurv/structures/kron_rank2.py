"""``kron_rank2``: ``Ĉ = A_1 ⊗ G_1 + A_2 ⊗ G_2``, the rank-2 methods of Koroko et al. (2022, arXiv 2201.10285).

``A_k`` (n x n), ``G_k`` (m x m) symmetric; column-major vec, ``Ĉ vec(V) = vec(Σ_k G_k V A_k)``; ``R`` is
Van Loan's rearrangement, ``R(A ⊗ G) = vec(A) vec(G)ᵀ`` (:mod:`tensorcurv.linalg.rearrange`).

* ``leading="kpsvd"``: ``A_1 ⊗ G_1 = argmin ‖C − A ⊗ G‖_F`` (top singular pair of ``R(C)``), then
  ``A_2 ⊗ G_2 = argmin ‖C − A_1 ⊗ G_1 − A ⊗ G‖_F``: the thesis's **Deflation** (``fit="deflation"``) or
  **Lanczos** (``fit="lanczos"``: both pairs from one Golub–Kahan bidiagonalization of ``R(C)``). Both are
  the truncated rank-2 SVD of ``R(C)`` (Eckart–Young) computed two ways.
* ``leading="kfac"``: ``A_1 ⊗ G_1`` are K-FAC's factors (``E[aaᵀ] ⊗ E[ggᵀ]``,
  :meth:`~tensorcurv.core.stats.LayerStats.kron_factors`), ``A_2 ⊗ G_2`` the best Kronecker product of the
  residual ``C − A_1 ⊗ G_1``: the thesis's **K-FAC-corrected**.

Fits: ``deflation`` is the alternating power method on the (deflated) implicit operator, term ``k`` started
from the previous fit's ``G_k`` (warm start), else from K-FAC's ``G`` (stop: change of the unit right vector
≤ ``tol``); ``lanczos`` runs ``lanczos_steps`` steps
of :func:`tensorcurv.linalg.lanczos.golub_kahan`. ``R(C)`` is never formed (products from the per-sample
factors, :class:`~tensorcurv.linalg.rearrange.RearrangedOperator`).

Running average (``update``): the same fit applied to ``decay·Ĉ_old + (1−decay)·C_batch`` (an implicit
operator); for ``leading="kfac"`` K-FAC's factors are themselves averaged (as ``kfac``) and the
correction refitted to the residual of the averaged operator.

Solve (π-damping, as in the thesis): ``[(A_1 + π√λ I) ⊗ (G_1 + √λ/π I) + A_2 ⊗ G_2]^{-1}`` by
simultaneous diagonalization (``X_aᵀ(A_1+π√λ)X_a = I``, ``X_aᵀ A_2 X_a = diag(d_a)``, same for ``G``),
denominators ``1 + d_g d_a`` floored at ``min_denominator`` because ``A_2 ⊗ G_2`` is indefinite in
general: a preconditioner (``exact_solve = False``), always a descent direction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from tensorcurv.core.options import Option
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.lanczos import golub_kahan
from tensorcurv.linalg.rearrange import RearrangedOperator
from tensorcurv.structures.base import Structure, register
from tensorcurv.structures.damping import factored_shifts, pi_ratio
from tensorcurv.structures.kron_sum.certificates import gen_eig

Operator = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]  # (R x: m,m -> n,n ; Rᵀ y: n,n -> m,m)


class Leading(Option):
    """The first term: ``kpsvd`` (nearest Kronecker product of C) or ``kfac`` (K-FAC's factors)."""

    KPSVD = "kpsvd"
    KFAC = "kfac"


class Fit(Option):
    """How the Kronecker terms are computed: ``deflation`` (power method) or ``lanczos`` (Golub–Kahan)."""

    DEFLATION = "deflation"
    LANCZOS = "lanczos"


@dataclass
class KronRank2Hparams:
    leading: str = Leading.KPSVD
    """``kpsvd``: A_1⊗G_1 nearest to C (Deflation, Lanczos); ``kfac``: K-FAC's factors (K-FAC-corrected)."""
    fit: str = Fit.DEFLATION
    """``deflation``: one term at a time by the power method; ``lanczos``: Golub–Kahan bidiagonalization."""
    tol: float = 1e-6
    """Power method: stop when the unit right vector changes by at most ``tol`` (2-norm)."""
    max_iter: int = 100
    """Power method: maximum iterations per term."""
    lanczos_steps: int = 10
    """Golub–Kahan steps (capped at ``min(n², m²)``, where the fit is exact)."""
    min_denominator: float = 1e-3
    """Floor of the simultaneous-diagonalization denominators ``1 + d_g d_a`` of the π-damped solve."""

    def __post_init__(self) -> None:
        self.leading = Leading.parse(self.leading, "kron_rank2.leading")
        self.fit = Fit.parse(self.fit, "kron_rank2.fit")
        if not self.tol > 0 or not 0 < self.min_denominator <= 1:
            raise ValueError(
                f"kron_rank2.tol must be > 0 and min_denominator in (0, 1], got {self.tol}, {self.min_denominator}"
            )
        for key in ("max_iter", "lanczos_steps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"kron_rank2.{key} must be an integer >= 1, got {v!r}")


def _sym(X: Tensor) -> Tensor:
    return 0.5 * (X + X.transpose(-2, -1))


def nearest_kronecker_power(op: Operator, start: Tensor, tol: float, max_iter: int) -> tuple[Tensor, Tensor, int]:
    """``(A, G)`` with ``A ⊗ G`` the best Kronecker product of the operator ``R = op`` (top singular pair,
    ``A = σ u``, ``G = v`` unit), by alternating power iterations from ``G = start``."""
    mv, rmv = op
    G = start / start.norm()
    A = mv(G)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        u = A / A.norm().clamp_min(1e-300)
        G_new = rmv(u)
        G_new = G_new / G_new.norm().clamp_min(1e-300)
        change = float((G_new - G).norm())
        G = G_new
        A = mv(G)
        if change <= tol:
            break
    sign = -1.0 if float(torch.trace(A)) < 0 else 1.0
    return _sym(A) * sign, _sym(G) * sign, iterations


def kron_terms_lanczos(op: Operator, start: Tensor, rank: int, steps: int) -> tuple[Tensor, Tensor, int]:
    """Leading ``rank`` Kronecker terms of ``R = op`` from one Golub–Kahan bidiagonalization started at
    ``G = start``: ``A (r, n, n) = σ_k u_k``, ``G (r, m, m) = v_k``."""
    mv, rmv = op
    m, n = start.shape[0], mv(start).shape[0]
    res = golub_kahan(
        lambda x: mv(x.reshape(m, m)).reshape(-1), lambda y: rmv(y.reshape(n, n)).reshape(-1), start, rank, steps
    )
    A = (res.U * res.sigma).T.reshape(-1, n, n)
    G = res.V.T.reshape(-1, m, m)
    sign = torch.where(torch.diagonal(A, dim1=-2, dim2=-1).sum(-1) < 0, -1.0, 1.0).to(A.dtype)[:, None, None]
    return _sym(A) * sign, _sym(G) * sign, res.steps


def minus_terms(op: Operator, A: Tensor, G: Tensor, weight: float = 1.0) -> Operator:
    """``R − weight Σ_k vec(A_k) vec(G_k)ᵀ`` (terms stacked ``(r, ·, ·)``) as an implicit operator."""
    mv, rmv = op
    return (
        lambda X: mv(X) - weight * torch.einsum("k,kij->ij", torch.einsum("kij,ij->k", G, X), A),
        lambda Y: rmv(Y) - weight * torch.einsum("k,kij->ij", torch.einsum("kij,ij->k", A, Y), G),
    )


@register("kron_rank2")
class KronRank2(Structure):
    """Two Kronecker terms: Deflation, Lanczos (``leading=kpsvd``) or K-FAC-corrected (``leading=kfac``)."""

    Hparams = KronRank2Hparams
    exact_solve = False
    A: Tensor  # (2, n, n)
    G: Tensor  # (2, m, m)
    KA: Tensor  # leading="kfac": K-FAC's (averaged) factors
    KG: Tensor

    def __init__(self, shape, hparams=None):
        super().__init__(shape, hparams)
        self._cache: dict[float, tuple[Tensor, Tensor, Tensor, float]] = {}
        self.last_fit: dict[str, Any] = {}

    # ------------------------------------------------------------------ fitting
    def _operator(self, stats: LayerStats, decay: float | None) -> Operator:
        """``R(C_batch)``, or ``R(decay·Ĉ_old + (1−decay)·C_batch)`` for a running average."""
        R = RearrangedOperator(stats)
        if decay is None:
            return R.matvec, R.rmatvec
        w = 1.0 - decay
        return minus_terms((lambda X: w * R.matvec(X), lambda Y: w * R.rmatvec(Y)), self.A, self.G, -decay)

    def _fit_terms(self, stats: LayerStats, decay: float | None) -> None:
        hp = self.hparams
        op = self._operator(stats, decay)
        KA, KG = stats.kron_factors()
        if hp.leading == "kfac":  # K-FAC's factors (averaged as kfac does), then the residual's best term
            if decay is not None:
                KA, KG = torch.lerp(KA, self.KA, decay), torch.lerp(KG, self.KG, decay)
            self.KA, self.KG = KA, KG
            A, G, info = self._terms(minus_terms(op, KA[None], KG[None]), KG, 1)
            self._set(torch.cat([KA[None], A]), torch.cat([KG[None], G]), info)
        else:
            self._set(*self._terms(op, KG, 2))

    def _terms(self, op: Operator, start: Tensor, rank: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Leading ``rank`` Kronecker terms of ``op``: jointly (``lanczos``) or one after the other (``deflation``)."""
        hp = self.hparams
        if hp.fit == "lanczos":
            A, G, steps = kron_terms_lanczos(op, start, rank, hp.lanczos_steps)
            if A.shape[0] < rank:  # an exhausted Krylov space: the operator has lower rank
                z = rank - A.shape[0]
                A, G = torch.cat([A, A.new_zeros(z, *A.shape[1:])]), torch.cat([G, G.new_zeros(z, *G.shape[1:])])
            return A, G, {"fit": "lanczos", "steps": steps}
        As, Gs, its = [], [], []
        for _ in range(rank):
            A, G, it = nearest_kronecker_power(op, start, hp.tol, hp.max_iter)
            As.append(A)
            Gs.append(G)
            its.append(it)
            op = minus_terms(op, A[None], G[None])
        return torch.stack(As), torch.stack(Gs), {"fit": "deflation", "iterations": its}

    def _set(self, A: Tensor, G: Tensor, info: dict[str, Any]) -> None:
        self.A, self.G, self.fitted, self._cache, self.last_fit = A, G, True, {}, info

    def fit(self, stats: LayerStats) -> KronRank2:
        self._check_stats(stats)
        self._fit_terms(stats, None)
        return self

    def _update(self, stats, decay):
        self._check_stats(stats)
        self._fit_terms(stats, decay)
        return self

    # ------------------------------------------------------------------ operator
    def mv(self, V: Tensor) -> Tensor:
        self._check(V)
        return torch.einsum("kij,jl,knl->in", self.G, V, self.A)

    def _solver(self, damping: float) -> tuple[Tensor, Tensor, Tensor, float]:
        if damping not in self._cache:
            m, n = self.shape
            A1, G1 = self.A[0], self.G[0]
            sa, sg = factored_shifts(pi_ratio(float(torch.trace(A1)), float(torch.trace(G1)), (m, n)), damping)
            da, Xa = gen_eig(A1 + sa * torch.eye(n, dtype=A1.dtype, device=A1.device), self.A[1])
            dg, Xg = gen_eig(G1 + sg * torch.eye(m, dtype=G1.dtype, device=G1.device), self.G[1])
            den = 1.0 + dg[:, None] * da[None, :]
            self._cache = {damping: (Xa, Xg, den.clamp_min(self.hparams.min_denominator), float(den.min()))}
        return self._cache[damping]

    def solve(self, V: Tensor, damping: float) -> Tensor:
        """π-damped rank-2 inverse by simultaneous diagonalization (see the module docstring)."""
        self._check(V, damping)
        Xa, Xg, den, den_min = self._solver(damping)
        self.last_solve = {
            "method": "simultaneous-diagonalization",
            "damping": "pi",
            "exact": False,
            "min_eigen_denominator": den_min,
        }
        return Xg @ ((Xg.T @ V @ Xa) / den) @ Xa.T

    def to_dense(self) -> Tensor:
        return cast(Tensor, sum(torch.kron(a, g) for a, g in zip(self.A, self.G)))

    def frobenius_sq(self, dense_max_dim: int = 0) -> float:
        """``Σ_{k,q} ⟨A_k, A_q⟩ ⟨G_k, G_q⟩``."""
        A, G = self.A.flatten(1), self.G.flatten(1)
        return float(((A @ A.T) * (G @ G.T)).sum())

    def tensors(self) -> dict[str, Tensor]:
        if not self.fitted:
            return {}
        out = {"A": self.A, "G": self.G}
        if self.hparams.leading == "kfac":
            out.update(KA=self.KA, KG=self.KG)
        return out

    def solve_flops(self) -> int:
        m, n = self.shape
        return 4 * (m * m * n + m * n * n)

    def fit_flops(self) -> float:
        """Products with ``R(C)`` (two per power iteration or Golub–Kahan step, ``≈ 2 N (n² + m²)`` each)."""
        m, n = self.shape
        steps = self.hparams.lanczos_steps if self.hparams.fit == "lanczos" else 2 * self.hparams.max_iter
        return float(4 * steps * (n * n + m * m) * max(m, n))

    def _after_load(self) -> None:
        self._cache = {}
