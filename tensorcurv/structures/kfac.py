"""``kfac``: ``Ĉ = A ⊗ G`` (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016).

``A`` (``n x n``) and ``G`` (``m x m``) from :meth:`LayerStats.kron_factors` (weight sharing ``expand`` or
``reduce``, Eschenhagen et al. 2023); column-major vec, ``Ĉ vec(V) = vec(G V A)``. Damping
(``damping_kind``):

* ``tikhonov`` (default, exact): ``(A ⊗ G + λI)^{-1} = Q_G [(Q_Gᵀ V Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ``;
* ``pi`` (factored): ``(A + π√λ I)^{-1} ⊗ (G + √λ/π I)^{-1}``, ``π = sqrt((tr A / n) / (tr G / m))``;
  this is *not* ``(Ĉ + λI)^{-1}``. ``inverse="cholesky"`` caches the two damped inverses (2 matmuls per solve).

Eigenvalues are clamped at 0 (``Ĉ`` PSD). :meth:`KFAC.refresh` builds the caches of many blocks in
batched calls. Details: docs/structures/kfac.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from tensorcurv.core.options import Option
from tensorcurv.core.stats import LayerStats, WeightSharing
from tensorcurv.structures.base import NOT_FITTED, NotFittedError, Structure, check_damping, register, sym_eig
from tensorcurv.structures.damping import DampingKind, factored_shifts, pi_ratio
from tensorcurv.structures.generic import per_sample_grad_chunks, top_entries
from tensorcurv.structures.inverse_fit import InverseFitHparams, apply_fit_target, fit_kronecker_inverse


class Inverse(Option):
    """How a kfac solve applies the damped inverse: eigenbasis (any damping kind) or explicit π-damped inverses."""

    EIGH = "eigh"
    CHOLESKY = "cholesky"


class _EigenSolveCache(NamedTuple):
    """Eigenbasis solve ``Q_G ((Q_Gᵀ V Q_A) / D) Q_Aᵀ`` for one (eigendecomposition, damping kind, λ)."""

    eigs: tuple
    kind: str
    damping: float
    D: Tensor  # λ_G λ_Aᵀ + λ (tikhonov) or (λ_G + √λ/π)(λ_A + π√λ)ᵀ (pi)
    QGt: Tensor
    QAt: Tensor
    info: dict
    QG: Tensor
    QA: Tensor
    QA_top: Tensor  # Q_A[:n-1], Q_A[n-1], Q_Aᵀ[:, :n-1]: row blocks for solve_split
    QA_last: Tensor
    QAt_left: Tensor


class _InverseCache(NamedTuple):
    """Explicit π-damped inverses for ``inverse="cholesky"`` at one λ."""

    damping: float
    Gi: Tensor  # (G + √λ/π I)^{-1}
    Ai: Tensor  # (A + π√λ I)^{-1}
    info: dict
    Ai_top: Tensor  # Ai[:n-1], Ai[n-1]: row blocks for solve_split
    Ai_last: Tensor


@dataclass
class KFACHparams(InverseFitHparams):
    damping_kind: str = DampingKind.TIKHONOV
    """``tikhonov``: exact (A⊗G + λI)^{-1}; ``pi``: factored (A + π√λI)^{-1} ⊗ (G + √λ/π I)^{-1}."""
    weight_sharing: str = WeightSharing.EXPAND
    """Conv / sequence layers: ``expand`` (positions as samples) or ``reduce`` (positions summed)."""
    inverse: str = Inverse.EIGH
    """``eigh`` (4 matmuls per solve) or ``cholesky`` (explicit π-damped inverses, 2 matmuls; needs ``pi``)."""

    def __post_init__(self) -> None:
        self.damping_kind = DampingKind.parse(self.damping_kind, "damping_kind")
        self.inverse = Inverse.parse(self.inverse, "inverse")
        if self.inverse == "cholesky" and self.damping_kind != "pi":
            raise ValueError(
                "inverse='cholesky' needs damping_kind='pi' (exact Tikhonov damping has no "
                "2-factor inverse; use inverse='eigh')"
            )
        self.weight_sharing = WeightSharing.parse(self.weight_sharing, "weight_sharing")
        self.check_inverse_fit("kfac", self.damping_kind)


@register("kfac")
class KFAC(Structure):
    """Kronecker product of the two marginal factors; exact eigen-based solve."""

    Hparams = KFACHparams
    has_split_solve = True

    def __init__(self, shape, hparams=None):
        super().__init__(shape, hparams)
        self._eigs: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._denom: _EigenSolveCache | None = None  # of the last eigenbasis solve
        self._inv: _InverseCache | None = None  # inverse="cholesky"

    def fit(self, stats: LayerStats):
        self._check_stats(stats)
        self.A, self.G = stats.kron_factors(self.hparams.weight_sharing)
        self.fitted, self._eigs, self._inv = True, None, None
        apply_fit_target(self, stats)
        return self

    def _update(self, stats, decay):
        self._check_stats(stats)
        A, G = stats.kron_factors(self.hparams.weight_sharing)
        # decay·old + (1 − decay)·new as one fused op: new + decay·(old − new)
        self.A = torch.lerp(A, self.A, decay)
        self.G = torch.lerp(G, self.G, decay)
        self._eigs = self._inv = None
        apply_fit_target(self, stats)  # fit_target=inverse: from the averaged factors, on this batch
        return self

    def kronecker_terms(self) -> tuple[Tensor, Tensor]:
        """``(A, G)`` as one-term stacks ``(1, n, n)``, ``(1, m, m)`` (the inverse fit's start)."""
        return self.A[None], self.G[None]

    def set_kronecker_terms(self, A: Tensor, G: Tensor) -> None:
        """Set ``A ⊗ G`` from one-term stacks (PSD factors: the inverse fit clips them)."""
        self.A, self.G = A[0], G[0]
        self._eigs = self._inv = None

    def fit_inverse(self, stats: LayerStats, damping: float, **options) -> dict:
        """``A ⊗ G`` adapted to ``(C + λI)⁻¹`` by alternating least squares over PSD factors
        (:func:`~tensorcurv.structures.inverse_fit.fit_kronecker_inverse`, ``project=True``)."""
        self._check_stats(stats)
        check_damping(damping)
        self.last_inverse_fit = fit_kronecker_inverse(self, stats, damping, project=True, **options)
        return self.last_inverse_fit

    def eigs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(λ_A, Q_A, λ_G, Q_G)``, cached until the factors change."""
        if self._eigs is None:
            KFAC._refresh_eigs([self])
        assert self._eigs is not None
        return self._eigs

    def mv(self, V):
        self._check(V)
        return self.G @ V @ self.A

    def solve(self, V, damping):
        self._check(V, damping)
        if self.hparams.inverse == "cholesky":
            Gi, Ai, self.last_solve = self._inverses(damping)
            return Gi @ V @ Ai
        D, QGt, QAt, self.last_solve = self._denominator(damping)
        _, QA, _, QG = self._eigs
        return QG @ (QGt @ V @ QA).div_(D) @ QAt

    def solve_split(
        self, W: Tensor, b: Tensor | None, damping: float, out_W: Tensor, out_b: Tensor | None, check: bool = True
    ) -> None:
        """:meth:`solve` of ``V = [W, b]`` (``W`` ``(m, n-1)``, ``b`` ``(m,)``; ``b=None``: ``V = W``)
        written into ``out_W``, ``out_b`` without forming ``V`` or splitting the result:
        ``V M = W M[:n-1] + b M[n-1]ᵀ`` (one matmul + one rank-1 update, on cached row blocks of the
        right factor ``M``), and the last product goes straight into ``out_W``/``out_b`` (``out=``).
        The outputs may alias ``W``/``b`` (both are read before the first write). ``check=False``
        skips the shape/damping checks (the caller guarantees them, as ``Curvature.solve`` does)."""
        if check:
            self._check_split(W, b, damping)
        if self.hparams.inverse == "cholesky":  # (G + √λ/π I)^{-1} V (A + π√λ I)^{-1}
            c = self._inv
            if c is None or c.damping != damping:
                self._inverses(damping)
                c = self._inv
                assert c is not None
            self.last_solve = c.info
            if b is None:
                torch.mm(c.Gi, torch.mm(W, c.Ai), out=out_W)
                return
            X = torch.mm(W, c.Ai_top)
            X.addr_(b, c.Ai_last)
            k = W.shape[1]
            torch.mm(c.Gi, X[:, :k], out=out_W)
            torch.mv(c.Gi, X[:, k], out=out_b)
            return
        e = self._denom  # Q_G ((Q_Gᵀ V Q_A) / D) Q_Aᵀ
        if e is None or e.eigs is not self._eigs or e.kind != self.hparams.damping_kind or e.damping != damping:
            self._denominator(damping)
            e = self._denom
            assert e is not None
        self.last_solve = e.info
        if b is None:
            torch.mm(e.QG @ (e.QGt @ W @ e.QA).div_(e.D), e.QAt, out=out_W)
            return
        X = torch.mm(W, e.QA_top)
        X.addr_(b, e.QA_last)
        Z = e.QG @ (e.QGt @ X).div_(e.D)
        torch.mm(Z, e.QAt_left, out=out_W)
        torch.mv(Z, e.QA_last, out=out_b)

    def _check_split(self, W: Tensor, b: Tensor | None, damping: float) -> None:
        m, n = self.shape
        if not self.fitted:
            raise NotFittedError(f"{self.name}: {NOT_FITTED}")
        if tuple(W.shape) != (m, n - (b is not None)) or (b is not None and tuple(b.shape) != (m,)):
            raise ValueError(
                f"{self.name}: solve_split W {tuple(W.shape)}, b "
                f"{None if b is None else tuple(b.shape)} do not split a ({m}, {n}) block"
            )
        check_damping(damping)

    def _denominator(self, damping: float) -> tuple[Tensor, Tensor, Tensor, dict]:
        """Eigenbasis scaling of the solve, cached per (eigendecomposition, λ): ``λ_G λ_Aᵀ + λ``
        (tikhonov) or ``(λ_G + √λ/π)(λ_A + π√λ)ᵀ`` (pi), with the views ``Q_Gᵀ``, ``Q_Aᵀ``.
        A fixed λ builds it once per refresh."""
        eigs, kind = self.eigs(), self.hparams.damping_kind
        c = self._denom
        if c is not None and c.eigs is eigs and c.kind == kind and c.damping == damping:
            return c.D, c.QGt, c.QAt, dict(c.info)
        lA, QA, lG, QG = eigs
        if kind == "pi":
            pi = self.pi()
            shift_A, shift_G = factored_shifts(pi, damping)
            D = (lG[:, None] + shift_G) * (lA[None, :] + shift_A)
            info = {"method": "kron-eigh", "damping": "pi", "pi": pi}
        else:
            D = lG[:, None] * lA[None, :] + damping
            info = {"method": "kron-eigh", "damping": "tikhonov"}
        self._denom = _EigenSolveCache(eigs, kind, damping, D, QG.T, QA.T, info, QG, QA, QA[:-1], QA[-1], QA.T[:, :-1])
        return D, QG.T, QA.T, dict(info)

    def _inverses(self, damping: float) -> tuple[Tensor, Tensor, dict]:
        """``(G + √λ/π I)^{-1}``, ``(A + π√λ I)^{-1}`` (Cholesky; eigen fallback), cached per (factors, λ)."""
        c = self._inv
        if c is None or c.damping != damping:
            KFAC._refresh_inverses([self], damping)
            c = self._inv
            assert c is not None
        return c.Gi, c.Ai, dict(c.info)

    def pi(self) -> float:
        """K-FAC's ``π`` of the current factors (:func:`~tensorcurv.structures.damping.pi_ratio`)."""
        return pi_ratio(float(torch.trace(self.A)), float(torch.trace(self.G)), self.shape)

    @staticmethod
    def refresh(blocks, damping: float) -> None:
        """Fill the solve caches of every stale ``KFAC`` block in ``blocks`` at once: the damped
        inverses (``inverse="cholesky"``) or the eigendecompositions (``eigh``). Factors of the same
        size, dtype and device are stacked into one batched ``cholesky_ex`` + ``cholesky_inverse``
        (or ``eigh``) call; the traces for π come from one host sync. Same values as the per-block
        :meth:`_inverses` / :meth:`eigs` (a factor that is not numerically PD takes the same eigen
        fallback). Non-KFAC, unfitted and up-to-date blocks are left alone."""
        chol, eig = [], []
        for b in blocks:
            if not isinstance(b, KFAC) or not b.fitted:
                continue
            if b.hparams.inverse == "cholesky":
                if b._inv is None or b._inv.damping != damping:
                    chol.append(b)
            elif b._eigs is None:
                eig.append(b)
        if chol:
            KFAC._refresh_inverses(chol, damping)
        if eig:
            KFAC._refresh_eigs(eig)

    @staticmethod
    def _groups(mats: list[Tensor]) -> dict[tuple, list[int]]:
        out: dict[tuple, list[int]] = {}
        for i, M in enumerate(mats):
            out.setdefault((M.shape[0], M.dtype, M.device), []).append(i)
        return out

    @staticmethod
    def _refresh_inverses(blocks: list[KFAC], damping: float) -> None:
        traces = torch.stack([torch.trace(M) for b in blocks for M in (b.A, b.G)]).tolist()  # one sync
        mats, shifts, pis = [], [], []
        for i, b in enumerate(blocks):
            pi = pi_ratio(traces[2 * i], traces[2 * i + 1], b.shape)
            pis.append(pi)
            shift_A, shift_G = factored_shifts(pi, damping)
            mats += [b.G, b.A]
            shifts += [shift_G, shift_A]
        inv: list[Tensor | None] = [None] * len(mats)
        failed: list[int] = []
        for idx in KFAC._groups(mats).values():
            S = mats[idx[0]].clone() if len(idx) == 1 else torch.stack([mats[i] for i in idx])
            for j, i in enumerate(idx):  # M + shift I
                (S if len(idx) == 1 else S[j]).diagonal().add_(shifts[i])
            L, bad = torch.linalg.cholesky_ex(S)
            Si = torch.cholesky_inverse(L)
            if len(idx) == 1:
                Si, bad = Si[None], bad[None]
            for j, (i, flag) in enumerate(zip(idx, bad.tolist())):
                if flag == 0:
                    inv[i] = Si[j]
                else:
                    failed.append(i)
        for i in failed:  # not numerically PD (rounding): clamp eigenvalues at 0 as the eigen path does
            lam, Q = sym_eig(mats[i])
            inv[i] = (Q / (lam + shifts[i])) @ Q.T
        for i, b in enumerate(blocks):
            method = "kron-cholesky+eigh-fallback" if (2 * i in failed or 2 * i + 1 in failed) else "kron-cholesky"
            Gi, Ai = inv[2 * i], inv[2 * i + 1]  # with Ai's row blocks [:n-1], [n-1] for solve_split
            assert Gi is not None and Ai is not None
            b._inv = _InverseCache(damping, Gi, Ai, {"method": method, "damping": "pi", "pi": pis[i]}, Ai[:-1], Ai[-1])

    @staticmethod
    def _refresh_eigs(blocks: list[KFAC]) -> None:
        mats = [M for b in blocks for M in (b.A, b.G)]
        res: list[tuple[Tensor, Tensor] | None] = [None] * len(mats)
        for idx in KFAC._groups(mats).values():
            S = mats[idx[0]][None] if len(idx) == 1 else torch.stack([mats[i] for i in idx])
            evals, evecs = torch.linalg.eigh(0.5 * (S + S.mT))  # as sym_eig, batched
            evals = evals.clamp_min(0.0)
            for j, i in enumerate(idx):
                res[i] = (evals[j], evecs[j])
        for i, b in enumerate(blocks):
            eig_A, eig_G = res[2 * i], res[2 * i + 1]
            assert eig_A is not None and eig_G is not None
            b._eigs = (*eig_A, *eig_G)

    def to_dense(self):
        return torch.kron(self.A, self.G)

    def inner_with_exact(self, stats: LayerStats, chunk: int = 128) -> float:
        """``⟨C, A ⊗ G⟩``; ``T = 1``: ``scale Σ_sk (a_sᵀ A a_s)(g_skᵀ G g_sk)``, else ``⟨G_j, G G_j A⟩``."""
        scale = float(stats.scale)
        if stats.T != 1:
            return scale * sum(float((G * (self.G @ G @ self.A)).sum()) for G in per_sample_grad_chunks(stats, chunk))
        a, g = stats.a[:, 0], stats.g[:, :, 0]
        qa = ((a @ self.A) * a).sum(1)
        qg = ((g @ self.G) * g).sum(2)
        return scale * float((qa[:, None] * qg).sum())

    def frobenius_sq(self, dense_max_dim: int = 0) -> float:
        """``‖A ⊗ G‖_F² = ‖A‖_F² ‖G‖_F²``."""
        return float(self.A.pow(2).sum() * self.G.pow(2).sum())

    def additive_statistics(self, stats: LayerStats, weight: float) -> dict[str, Tensor]:
        """``A`` (a per-sample mean: weighted) and ``G`` (a scaled sum)."""
        A, G = stats.kron_factors(self.hparams.weight_sharing)
        return {"A": A * weight, "G": G}

    def downdate(self, full: LayerStats, removed: LayerStats, added: LayerStats | None, corrected: LayerStats) -> KFAC:
        """``Σ aaᵀ − Σ_removed aaᵀ + Σ_added aaᵀ`` (``A`` is a mean over the rows), likewise for ``G``."""
        ws = self.hparams.weight_sharing
        t_eff = removed.T if (ws == "expand" or removed.T == 1) else 1
        A_old, G_old = removed.kron_factors(ws)
        SA = self.A * (full.N * t_eff) - A_old * (removed.N * t_eff)
        SG = self.G - G_old
        if added is not None:
            A_new, G_new = added.kron_factors(ws)
            SA, SG = SA + A_new * (added.N * t_eff), SG + G_new
        out = KFAC(self.shape, self.hparams)
        out.load_state_dict({"tensors": {"A": SA / (corrected.N * t_eff), "G": SG}, "fitted": True})
        return out

    def leading_eigenpairs(self, k: int) -> tuple[Tensor, Tensor]:
        """``(A ⊗ G)(q_A ⊗ q_G) = λ_A λ_G (q_A ⊗ q_G)`` and ``q_A ⊗ q_G = vec(q_G q_Aᵀ)``: the largest
        products of factor eigenvalues."""
        lA, QA, lG, QG = self.eigs()
        top, i, j = top_entries(lG[:, None] * lA[None, :], k)
        return top, QG[:, i].T[:, :, None] * QA[:, j].T[:, None, :]

    def tensors(self):
        return {"A": self.A, "G": self.G} if self.fitted else {}

    def solve_flops(self):
        m, n = self.shape
        return (2 if self.hparams.inverse == "cholesky" else 4) * (m * m * n + m * n * n)

    def _after_load(self):
        self._eigs = self._inv = None
