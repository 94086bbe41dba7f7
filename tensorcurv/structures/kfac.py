"""``kfac``: ``Ĉ = A ⊗ G`` (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016).

``A`` (``n x n``) and ``G`` (``m x m``) are the factors of :meth:`LayerStats.kron_factors` under the
chosen weight-sharing treatment (``expand`` or ``reduce``, Eschenhagen et al. 2023). With column-major
vec, ``Ĉ vec(V) = vec(G V A)``.

Damping (``damping_kind``):

* ``tikhonov`` (default, exact): ``(A ⊗ G + λI)^{-1}`` through the eigendecompositions
  ``A = Q_A Λ_A Q_Aᵀ``, ``G = Q_G Λ_G Q_Gᵀ``: ``Q_G [(Q_Gᵀ V Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ``.
* ``pi`` (factored, Martens & Grosse §6.3): ``(A + π√λ I)^{-1} ⊗ (G + √λ/π I)^{-1}`` with
  ``π = sqrt((tr A / n) / (tr G / m))``; this is *not* ``(Ĉ + λI)^{-1}``.

Inverse path (``inverse``):

* ``eigh`` (default): eigendecompositions of ``A`` and ``G`` once per factor change, then 4 matmuls
  per solve (both damping kinds).
* ``cholesky`` (only with ``damping_kind="pi"``): the explicit damped inverses
  ``(A + π√λ I)^{-1}``, ``(G + √λ/π I)^{-1}`` from Cholesky factors (``cholesky_inverse``; about 4×
  cheaper than ``eigh`` per refresh), cached per (factors, λ); a solve is 2 matmuls
  ``(G + √λ/π I)^{-1} V (A + π√λ I)^{-1}``. Same operator as ``eigh`` with ``pi``; a factor that
  is not numerically positive definite falls back to the eigen path (eigenvalues clamped at 0).

Eigenvalues are clamped at 0, so ``Ĉ`` is positive semi-definite and any ``λ > 0`` is safe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tensorcurv.stats import WEIGHT_SHARING, LayerStats
from tensorcurv.structures.base import Structure, register, sym_eig

DAMPING_KINDS = ("tikhonov", "pi")
INVERSES = ("eigh", "cholesky")


@dataclass
class KFACHparams:
    damping_kind: str = "tikhonov"
    """``tikhonov``: exact (A⊗G + λI)^{-1}; ``pi``: factored (A + π√λI)^{-1} ⊗ (G + √λ/π I)^{-1}."""
    weight_sharing: str = "expand"
    """Conv / sequence layers: ``expand`` (positions as samples) or ``reduce`` (positions summed)."""
    inverse: str = "eigh"
    """``eigh`` (4 matmuls per solve) or ``cholesky`` (explicit π-damped inverses, 2 matmuls; needs ``pi``)."""

    def __post_init__(self) -> None:
        if self.damping_kind not in DAMPING_KINDS:
            raise ValueError(f"damping_kind={self.damping_kind!r} is not one of {list(DAMPING_KINDS)}")
        if self.inverse not in INVERSES:
            raise ValueError(f"inverse={self.inverse!r} is not one of {list(INVERSES)}")
        if self.inverse == "cholesky" and self.damping_kind != "pi":
            raise ValueError("inverse='cholesky' needs damping_kind='pi' (exact Tikhonov damping has no "
                             "2-factor inverse; use inverse='eigh')")
        if self.weight_sharing not in WEIGHT_SHARING:
            raise ValueError(f"weight_sharing={self.weight_sharing!r} is not one of {list(WEIGHT_SHARING)}")


@register("kfac")
class KFAC(Structure):
    """Kronecker product of the two marginal factors; exact eigen-based solve."""

    Hparams = KFACHparams

    def __init__(self, shape, hparams=None):
        super().__init__(shape, hparams)
        self._eigs = None
        self._denom = None  # (eigs, damping_kind, λ, denominator, Q_Gᵀ, Q_Aᵀ, last_solve) of the last solve
        self._inv = None  # (λ, (G + √λ/π I)^{-1}, (A + π√λ I)^{-1}, last_solve) for inverse="cholesky"

    def fit(self, stats: LayerStats):
        self._check_stats(stats)
        self.A, self.G = stats.kron_factors(self.hparams.weight_sharing)
        self.fitted, self._eigs, self._inv = True, None, None
        return self

    def _update(self, stats, decay):
        self._check_stats(stats)
        A, G = stats.kron_factors(self.hparams.weight_sharing)
        self.A = decay * self.A + (1 - decay) * A
        self.G = decay * self.G + (1 - decay) * G
        self._eigs = self._inv = None
        return self

    def eigs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(λ_A, Q_A, λ_G, Q_G)``, cached until the factors change."""
        if self._eigs is None:
            self._eigs = (*sym_eig(self.A), *sym_eig(self.G))
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

    def _denominator(self, damping: float) -> tuple[Tensor, Tensor, Tensor, dict]:
        """Eigenbasis scaling of the solve, cached per (eigendecomposition, λ): ``λ_G λ_Aᵀ + λ``
        (tikhonov) or ``(λ_G + √λ/π)(λ_A + π√λ)ᵀ`` (pi), with the views ``Q_Gᵀ``, ``Q_Aᵀ``.
        A fixed λ builds it once per refresh."""
        eigs, kind = self.eigs(), self.hparams.damping_kind
        c = self._denom
        if c is not None and c[0] is eigs and c[1] == kind and c[2] == damping:
            return c[3], c[4], c[5], dict(c[6])
        lA, QA, lG, QG = eigs
        if kind == "pi":
            pi, sq = self.pi(), math.sqrt(damping)
            D = (lG[:, None] + sq / pi) * (lA[None, :] + pi * sq)
            info = {"method": "kron-eigh", "damping": "pi", "pi": pi}
        else:
            D = lG[:, None] * lA[None, :] + damping
            info = {"method": "kron-eigh", "damping": "tikhonov"}
        self._denom = (eigs, kind, damping, D, QG.T, QA.T, info)
        return D, QG.T, QA.T, dict(info)

    def _inverses(self, damping: float) -> tuple[Tensor, Tensor, dict]:
        """``(G + √λ/π I)^{-1}``, ``(A + π√λ I)^{-1}`` (Cholesky; eigen fallback), cached per (factors, λ)."""
        c = self._inv
        if c is not None and c[0] == damping:
            return c[1], c[2], dict(c[3])
        pi, sq = self.pi(), math.sqrt(damping)
        info = {"method": "kron-cholesky", "damping": "pi", "pi": pi}
        inv = []
        for M, shift in ((self.G, sq / pi), (self.A, pi * sq)):
            Ms = M + shift * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
            L, bad = torch.linalg.cholesky_ex(Ms)
            if int(bad) == 0:
                inv.append(torch.cholesky_inverse(L))
            else:  # not numerically PD (rounding): clamp eigenvalues at 0 as the eigen path does
                lam, Q = sym_eig(M)
                inv.append((Q / (lam + shift)) @ Q.T)
                info["method"] = "kron-cholesky+eigh-fallback"
        self._inv = (damping, inv[0], inv[1], info)
        return inv[0], inv[1], dict(info)

    def pi(self) -> float:
        m, n = self.shape
        trA, trG = float(torch.trace(self.A)) / n, float(torch.trace(self.G)) / m
        if trA <= 0 or trG <= 0:
            return 1.0
        return math.sqrt(trA / trG)

    def to_dense(self):
        return torch.kron(self.A, self.G)

    def tensors(self):
        return {"A": self.A, "G": self.G} if self.fitted else {}

    def solve_flops(self):
        m, n = self.shape
        return (2 if self.hparams.inverse == "cholesky" else 4) * (m * m * n + m * n * n)

    def _after_load(self):
        self._eigs = self._inv = None
