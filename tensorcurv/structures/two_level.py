"""``two_level``: a block-diagonal base plus a coarse-space correction that couples the layers.

Two-level K-FAC (Tselepidis, Kohler & Orvieto 2020; Koroko et al. 2023), borrowed from two-level
domain-decomposition preconditioners. Notation (one model, layers ``l`` in the order of the
``shapes`` dict; the global vector is the concatenation of the layers' column-major ``vec([W, b])``,
total length ``D``):

* ``C`` — the exact model curvature ``scale Σ_{s,k} vec(G_sk) vec(G_sk)ᵀ``, *including* the
  cross-layer blocks; ``A = C + λI``.
* ``B = diag(B_l)`` — any registered layer-scope structure (``base``, default ``kfac``), one per
  layer; the fine level is ``M^{-1} = (B + λI)^{-1}``, applied block by block through each base's
  own ``solve`` (so its damping variant, e.g. kfac's ``pi``, is the base's choice).
* ``Z = R0ᵀ`` (``D x q``) — coarse vectors, each supported on one layer and stored per layer as
  ``(q_l, m, n)`` matrices ``V_j``; their columns are orthonormal, so ``R0 R0ᵀ = I`` and
  ``E = R0 A R0ᵀ = C0 + λI`` exactly.

  - ``nicolaides``: one vector per layer, the layer's indicator ``1_{m x n} / sqrt(m n)``
    (the "one vector per subdomain" coarse space of Nicolaides, as Tselepidis et al.).
  - ``spectral``: the ``coarse_vectors_per_layer`` leading eigenvectors of each base block
    ``B_l`` (Koroko et al.'s spectral coarse space). For ``kfac`` they are ``q_G q_Aᵀ`` for the
    largest products ``λ_G λ_A`` of factor eigenpairs and for ``ekfac`` the largest core entries
    (no ``to_dense``); ``diagonal``: the largest entries; other bases: ``eigh(to_dense())`` for
    ``mn <= 4096``, else subspace iteration with the base's ``mv``.

* ``C0 = R0 C R0ᵀ`` from per-sample projections, never from ``C``:
  ``p_sk[j] = <V_j, G_sk> = Σ_t g_sktᵀ V_j a_st``, ``C0 = scale Σ_{s,k} p_sk p_skᵀ``, and the
  products with ``C`` the balanced variant needs, ``U = C Z = scale Σ_{s,k} vec(G_sk) p_skᵀ``
  (stored per layer as ``(q, m, n)``; ``C0 = Zᵀ U``).

Preconditioners (``variant``; Tang, Nabben, Vuik & Erlangga 2009 give both in this notation):

* ``additive`` (Tselepidis et al. 2020): ``P^{-1} = M^{-1} + Z E^{-1} Zᵀ``.
* ``balanced`` (balancing Neumann–Neumann, the deflated form Koroko et al. 2023 compare):
  ``P^{-1} = (I − Z E^{-1} Zᵀ A) M^{-1} (I − A Z E^{-1} Zᵀ) + Z E^{-1} Zᵀ`` with ``A Z = U + λZ``.
  It is exact on the coarse space (``P^{-1} A Z = Z``) and symmetric.

Both are symmetric positive definite for ``λ > 0``. ``solve(mats, λ)`` applies ``P^{-1}`` (this
is a preconditioner, not the inverse of some ``Ĉ + λI``: ``exact_solve = False``);
``dense_preconditioner(λ)`` returns it as a ``D x D`` matrix for small models. ``mv`` and
``to_dense`` are those of the block-diagonal base ``B`` (the coarse level only enters the solve).

Running average (``update(stats, decay)``): each base block averages its own statistics; the coarse
space is rebuilt from the averaged base blocks and ``U ← decay·U_old (Z_oldᵀ Z) + (1−decay)·U_batch``,
``C0 ← decay·sym(Zᵀ U_old Z_oldᵀ Z) + (1−decay)·C0_batch``. This is the exact moving average of
``C Z`` and ``Zᵀ C Z`` whenever the coarse space does not change (always for ``nicolaides``; for
``spectral`` up to signs/rotations within an unchanged span); otherwise the old average is
carried through the projection onto the old coarse space (``C_old Z ≈ C_old Z_old Z_oldᵀ Z``)
and ``C0``'s eigenvalues are clamped at 0.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import unvec, vec
from tensorcurv.structures import base as _base
from tensorcurv.structures.base import (
    NOT_FITTED,
    NotFittedError,
    Structure,
    check_damping,
    check_decay,
    fit_blocks,
    register,
    sym_eig,
)
from tensorcurv.structures.diagonal import Diagonal
from tensorcurv.structures.ekfac import EKFAC
from tensorcurv.structures.kfac import KFAC

VARIANTS = ("additive", "balanced")
COARSE_SPACES = ("nicolaides", "spectral")
DENSE_EIGH_MAX = 4096  # generic spectral vectors: eigh(to_dense()) up to this block dimension


def layer_scope_names() -> list[str]:
    """Registered structures that can serve as the block-diagonal base (one instance per layer)."""
    return [n for n in _base.names() if _base.get(n).scope == "layer"]


@dataclass
class TwoLevelHparams:
    base: str = "kfac"
    """Layer-scope structure of the diagonal blocks ``B_l`` (``kfac``, ``ekfac``, ``dense``, ...)."""
    base_hparams: dict = field(default_factory=dict)
    """Hyper-parameters passed to every base block (validated by the base's own ``Hparams``)."""
    coarse_space: str = "nicolaides"
    """``nicolaides``: one normalized indicator per layer; ``spectral``: leading eigenvectors of ``B_l``."""
    coarse_vectors_per_layer: int = 1
    """Coarse vectors per layer (``spectral``; ``nicolaides`` has exactly 1)."""
    variant: str = "additive"
    """``additive``: ``M^{-1} + Z E^{-1} Zᵀ``; ``balanced``: balancing Neumann–Neumann (deflated) form."""

    def __post_init__(self) -> None:
        valid = layer_scope_names()
        if self.base not in valid:
            raise ValueError(f"two_level.base={self.base!r} is not a layer-scope structure; valid: {valid}")
        self.base_hparams = dict(self.base_hparams or {})
        try:
            _base.make_hparams(self.base, **self.base_hparams)
        except (ValueError, TypeError) as e:
            raise ValueError(f"two_level.base_hparams: {e}") from None
        if self.coarse_space not in COARSE_SPACES:
            raise ValueError(f"two_level.coarse_space={self.coarse_space!r} is not one of {list(COARSE_SPACES)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"two_level.variant={self.variant!r} is not one of {list(VARIANTS)}")
        k = self.coarse_vectors_per_layer
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"two_level.coarse_vectors_per_layer must be an integer >= 1, got {k!r}")
        if self.coarse_space == "nicolaides" and k != 1:
            raise ValueError(
                f"two_level.coarse_vectors_per_layer={k} needs coarse_space='spectral'; "
                "the nicolaides coarse space has exactly one vector per layer"
            )

    def make_base_hparams(self) -> Any:
        return _base.make_hparams(self.base, **self.base_hparams)


# ---------------------------------------------------------------------- coarse vectors
def _top_entries(vals: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Values and (row, column) indices of the ``k`` largest entries of an ``(m, n)`` matrix."""
    top, idx = torch.topk(vals.reshape(-1), k)
    return top, idx // vals.shape[1], idx % vals.shape[1]


def _subspace_iteration(block: Structure, k: int, ref: Tensor, maxiter: int = 200,
                        rtol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Leading ``k`` eigenpairs of a PSD block through its ``mv`` (block power method + Rayleigh–Ritz)."""
    m, n = block.shape
    d, p = m * n, min(m * n, k + 8)
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, p, generator=gen, dtype=ref.dtype).to(ref.device))
    prev = None

    def apply(X):
        return torch.stack([vec(block.mv(unvec(x, m, n))) for x in X.T], dim=1)

    for _ in range(maxiter):
        Y = apply(Q)
        evals, W = torch.linalg.eigh(0.5 * ((Q.T @ Y) + (Q.T @ Y).T))
        top = evals.flip(0)[:k]
        if prev is not None and (top - prev).abs().max() <= rtol * top.abs().max().clamp_min(1e-300):
            break
        prev = top
        Q, _ = torch.linalg.qr(Y)
    vecs = (Q @ W).flip(1)[:, :k]
    return top, unvec(vecs.T, m, n)


def leading_eigenvectors(block: Structure, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` leading eigenpairs of a fitted base block: values ``(k,)``, vectors ``(k, m, n)``
    (orthonormal in the column-major ``vec`` inner product)."""
    m, n = block.shape
    if isinstance(block, KFAC):  # A⊗G (q_A⊗q_G) = λ_A λ_G (q_A⊗q_G), and q_A⊗q_G = vec(q_G q_Aᵀ)
        lA, QA, lG, QG = block.eigs()
        top, i, j = _top_entries(lG[:, None] * lA[None, :], k)
        return top, QG[:, i].T[:, :, None] * QA[:, j].T[:, None, :]
    if isinstance(block, EKFAC):  # eigenvalue S[i, j] for vec(QG[:, i] QA[:, j]ᵀ)
        top, i, j = _top_entries(block.S, k)
        return top, block.QG[:, i].T[:, :, None] * block.QA[:, j].T[:, None, :]
    if isinstance(block, Diagonal):  # unit matrices at the largest diagonal entries
        top, i, j = _top_entries(block.D, k)
        V = block.D.new_zeros(k, m, n)
        V[torch.arange(k, device=V.device), i, j] = 1.0
        return top, V
    if m * n <= DENSE_EIGH_MAX:
        evals, Q = torch.linalg.eigh(0.5 * (block.to_dense() + block.to_dense().T))
        return evals.flip(0)[:k], unvec(Q.flip(1)[:, :k].T, m, n)
    ref = next(iter(block.tensors().values()))
    return _subspace_iteration(block, k, ref)


# ---------------------------------------------------------------------- the structure
@register("two_level")
class TwoLevel(Structure):
    """Block-diagonal base ``B`` plus coarse correction; one instance for the whole model."""

    Hparams = TwoLevelHparams
    scope = "model"
    exact_solve = False  # solve applies the preconditioner P^{-1}, not the inverse of some Ĉ + λI

    def __init__(self, shapes: Mapping[str, tuple[int, int]], hparams: TwoLevelHparams | None = None) -> None:
        if not isinstance(shapes, Mapping):
            raise TypeError("two_level is a model-scope structure: pass {layer name: (m, n)} "
                            "(use tensorcurv.Curvature(model, structure='two_level', ...))")
        if len(shapes) == 0:
            raise ValueError("two_level needs at least one covered layer: the coarse space would have dimension 0")
        self.hparams = hparams if hparams is not None else TwoLevelHparams()
        hp = self.hparams
        self.shapes = {name: (int(m), int(n)) for name, (m, n) in shapes.items()}
        for name, (m, n) in self.shapes.items():
            if hp.coarse_vectors_per_layer > m * n:
                raise ValueError(
                    f"two_level.coarse_vectors_per_layer={hp.coarse_vectors_per_layer} exceeds the "
                    f"{m * n} parameters of layer {name!r}"
                )
        base_cls, base_hp = _base.get(hp.base), hp.make_base_hparams()
        self.blocks: dict[str, Structure] = {name: base_cls(shape, base_hp) for name, shape in self.shapes.items()}
        self.fitted = False
        self.last_solve: dict[str, Any] = {}
        self.fit_time = 0.0  # whole fit (base blocks + coarse level), seconds
        self.coarse_fit_time = 0.0  # coarse level only: coarse vectors, projections, C0, U
        self.Z: dict[str, Tensor] = {}  # coarse vectors restricted to each layer, (q_l, m, n)
        self.U: dict[str, Tensor] = {}  # (C Z) restricted to each layer, (q, m, n)
        self.C0: Tensor | None = None  # (q, q) = R0 C R0ᵀ
        self._eig: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def dim(self) -> int:
        """``D``: number of parameters in the covered layers."""
        return sum(m * n for m, n in self.shapes.values())

    @property
    def coarse_dim(self) -> int:
        """``q``: number of coarse vectors (rows of ``R0``)."""
        k = 1 if self.hparams.coarse_space == "nicolaides" else self.hparams.coarse_vectors_per_layer
        return k * len(self.shapes)

    # ------------------------------------------------------------------ fitting
    def _check_stats_dict(self, stats: Mapping[str, LayerStats]) -> None:
        missing = [n for n in self.shapes if n not in stats]
        if missing:
            raise ValueError(f"two_level: no statistics for layers {missing}")
        ref = stats[next(iter(self.shapes))]
        for name, shape in self.shapes.items():
            st = stats[name]
            if st.shape != shape:
                raise ValueError(f"two_level: statistics of shape {st.shape} for layer {name!r} of shape {shape}")
            if (st.N, st.K) != (ref.N, ref.K) or st.scale != ref.scale:
                raise ValueError("two_level: layers disagree on samples N, backward columns K or scale; "
                                 "the coarse level needs statistics from one capture")
            st.check_finite()

    def _coarse_vectors(self, like: Tensor) -> dict[str, Tensor]:
        if self.hparams.coarse_space == "nicolaides":
            return {name: like.new_full((1, m, n), 1.0 / math.sqrt(m * n)) for name, (m, n) in self.shapes.items()}
        k = self.hparams.coarse_vectors_per_layer
        return {name: leading_eigenvectors(self.blocks[name], k)[1].to(like) for name in self.shapes}

    @staticmethod
    def _projections(stats: Mapping[str, LayerStats], Z: Mapping[str, Tensor], chunk: int = 256) -> Tensor:
        """``P`` of shape ``(N K, q)``: ``P[(s,k), j] = <V_j, G_sk> = Σ_t g_sktᵀ V_j a_st``."""
        cols = []
        for name, V in Z.items():
            st = stats[name]
            parts = []
            for i in range(0, st.N, chunk):
                Va = torch.einsum("jmn,stn->stjm", V, st.a[i:i + chunk])
                parts.append(torch.einsum("sktm,stjm->skj", st.g[i:i + chunk], Va))
            cols.append(torch.cat(parts).reshape(-1, V.shape[0]))
        return torch.cat(cols, dim=1)

    @staticmethod
    def _times_samples(stats: LayerStats, P: Tensor, chunk: int = 256) -> Tensor:
        """``scale Σ_{s,k} G_sk ⊗ P[(s,k)]`` as ``(q, m, n)``: one layer's rows of ``C Z``."""
        W = P.reshape(stats.N, stats.K, -1)
        out = P.new_zeros(P.shape[1], stats.m, stats.n)
        for i in range(0, stats.N, chunk):
            h = torch.einsum("skj,sktm->jstm", W[i:i + chunk], stats.g[i:i + chunk])
            out += torch.einsum("jstm,stn->jmn", h, stats.a[i:i + chunk])
        return out * stats.scale

    def _batch_coarse(self, stats, Z):
        P = self._projections(stats, Z)
        scale = stats[next(iter(self.shapes))].scale
        C0 = (P.T @ P) * scale
        U = {name: self._times_samples(stats[name], P) for name in self.shapes}
        return C0, U

    def _fit_blocks(self, stats, decay):
        fit_blocks(self.blocks, stats, decay)

    def fit(self, stats: Mapping[str, LayerStats]) -> TwoLevel:
        """Fit every base block and the coarse level to one batch (replaces any previous state)."""
        self._check_stats_dict(stats)
        t0 = time.perf_counter()
        self._fit_blocks(stats, None)
        tc = time.perf_counter()
        like = stats[next(iter(self.shapes))].a
        self.Z = self._coarse_vectors(like)
        self.C0, self.U = self._batch_coarse(stats, self.Z)
        self._eig, self.fitted = None, True
        self.coarse_fit_time = time.perf_counter() - tc
        self.fit_time = time.perf_counter() - t0
        return self

    def update(self, stats: Mapping[str, LayerStats], decay: float) -> TwoLevel:
        """Running average: base blocks by their own ``update``; coarse level as in the module doc."""
        check_decay(decay)
        if not self.fitted:
            return self.fit(stats)
        self._check_stats_dict(stats)
        t0 = time.perf_counter()
        self._fit_blocks(stats, decay)
        tc = time.perf_counter()
        like = stats[next(iter(self.shapes))].a
        Z_old, U_old = self.Z, self.U
        Z = self._coarse_vectors(like)
        C0_b, U_b = self._batch_coarse(stats, Z)
        # overlap of old and new coarse spaces: block-diagonal (both are layer-supported), (q, q)
        Mo = torch.block_diag(*[torch.einsum("imn,jmn->ij", Z_old[nm], Z[nm]) for nm in self.shapes])
        U_carry = {nm: torch.einsum("imn,ij->jmn", U_old[nm], Mo) for nm in self.shapes}
        C0_carry = self._restrict(U_carry, Z)
        C0_carry = 0.5 * (C0_carry + C0_carry.T)
        self.Z = Z
        self.U = {nm: decay * U_carry[nm] + (1 - decay) * U_b[nm] for nm in self.shapes}
        self.C0 = decay * C0_carry + (1 - decay) * C0_b
        self._eig = None
        self.coarse_fit_time = time.perf_counter() - tc
        self.fit_time = time.perf_counter() - t0
        return self

    # ------------------------------------------------------------------ coarse operators
    def _restrict(self, X: Mapping[str, Tensor], Z: Mapping[str, Tensor] | None = None) -> Tensor:
        """``Zᵀ x`` for ``X`` given per layer either as ``(m, n)`` (→ ``(q,)``) or ``(r, m, n)`` (→ ``(q, r)``)."""
        Z = self.Z if Z is None else Z
        if next(iter(X.values())).dim() == 2:
            return torch.cat([torch.einsum("jmn,mn->j", Z[nm], X[nm]) for nm in self.shapes])
        return torch.cat([torch.einsum("jmn,rmn->jr", Z[nm], X[nm]) for nm in self.shapes])

    def _prolong(self, y: Tensor) -> dict[str, Tensor]:
        """``Z y`` per layer (each coarse vector lives on one layer)."""
        out, i = {}, 0
        for nm in self.shapes:
            q = self.Z[nm].shape[0]
            out[nm] = torch.einsum("jmn,j->mn", self.Z[nm], y[i:i + q])
            i += q
        return out

    def _coarse_solve(self, b: Tensor, damping: float) -> Tensor:
        """``E^{-1} b`` with ``E = C0 + λI = R0 (C + λI) R0ᵀ`` (eigenvalues of ``C0`` clamped at 0)."""
        if self._eig is None:
            self._eig = sym_eig(self.C0)
        evals, Q = self._eig
        return Q @ ((Q.T @ b) / (evals + damping))

    def _check_mats(self, mats: Mapping[str, Tensor], damping: float | None = None) -> None:
        if not self.fitted:
            raise NotFittedError(f"two_level: {NOT_FITTED}")
        for nm, shape in self.shapes.items():
            if nm not in mats:
                raise ValueError(f"two_level: no matrix for layer {nm!r}")
            if tuple(mats[nm].shape) != shape:
                raise ValueError(f"two_level: expected layer {nm!r} of shape {shape}, got {tuple(mats[nm].shape)}")
        if damping is not None:
            check_damping(damping)

    # ------------------------------------------------------------------ operator
    def mv(self, mats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``B v``: the block-diagonal base applied layer by layer (the coarse level is solve-only)."""
        self._check_mats(mats)
        return {nm: self.blocks[nm].mv(mats[nm]) for nm in self.shapes}

    def solve(self, mats: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
        """``P^{-1} r`` of the chosen ``variant`` (see the module docstring), per layer ``(m, n)``."""
        self._check_mats(mats, damping)
        lam = damping
        y1 = self._coarse_solve(self._restrict(mats), lam)  # E^{-1} Zᵀ r
        if self.hparams.variant == "additive":
            fine = {nm: self.blocks[nm].solve(mats[nm], lam) for nm in self.shapes}
            coarse = self._prolong(y1)
            out = {nm: fine[nm] + coarse[nm] for nm in self.shapes}
        else:  # balanced: A Z y = U y + λ Z y and Zᵀ A x = Uᵀ x + λ Zᵀ x, never forming C
            Zy1 = self._prolong(y1)
            w = {nm: mats[nm] - torch.einsum("jmn,j->mn", self.U[nm], y1) - lam * Zy1[nm]
                 for nm in self.shapes}  # (I − A Z E^{-1} Zᵀ) r
            x = {nm: self.blocks[nm].solve(w[nm], lam) for nm in self.shapes}  # M^{-1} w
            zAx = sum(torch.einsum("jmn,mn->j", self.U[nm], x[nm]) for nm in self.shapes) + lam * self._restrict(x)
            corr = self._prolong(y1 - self._coarse_solve(zAx, lam))
            out = {nm: x[nm] + corr[nm] for nm in self.shapes}
        self.last_solve = {"method": f"two-level-{self.hparams.variant}", "coarse_space": self.hparams.coarse_space,
                           "coarse_dim": self.coarse_dim, "damping": "tikhonov (coarse); base as its own",
                           "base": {nm: dict(b.last_solve) for nm, b in self.blocks.items()}}
        return out

    # ------------------------------------------------------------------ dense views (small models)
    def _global(self, mats: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([vec(mats[nm]) for nm in self.shapes])

    def _split(self, v: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for nm, (m, n) in self.shapes.items():
            out[nm] = unvec(v[i:i + m * n], m, n)
            i += m * n
        return out

    def restriction(self) -> Tensor:
        """``R0`` as a dense ``(q, D)`` matrix (rows orthonormal)."""
        if not self.fitted:
            raise NotFittedError(f"two_level: {NOT_FITTED}")
        eye = self.C0.new_zeros(self.coarse_dim, self.coarse_dim).fill_diagonal_(1.0)
        return torch.stack([self._global(self._prolong(e)) for e in eye])

    def coarse_matrix(self) -> Tensor:
        """``C0 = R0 C R0ᵀ`` (``q x q``)."""
        if not self.fitted:
            raise NotFittedError(f"two_level: {NOT_FITTED}")
        return self.C0.clone()

    def to_dense(self) -> Tensor:
        """Dense block-diagonal base ``B`` (``D x D``), matching :meth:`mv`."""
        return torch.block_diag(*[self.blocks[nm].to_dense() for nm in self.shapes])

    def dense_preconditioner(self, damping: float) -> Tensor:
        """``P^{-1}`` as a dense ``D x D`` matrix: :meth:`solve` applied to every unit vector."""
        eye = torch.eye(self.dim, dtype=self.C0.dtype, device=self.C0.device)
        return torch.stack([self._global(self.solve(self._split(e), damping)) for e in eye], dim=1)

    # ------------------------------------------------------------------ cost & state
    def tensors(self) -> dict[str, Tensor]:
        if not self.fitted:
            return {}
        out = {f"blocks.{nm}.{k}": v for nm, b in self.blocks.items() for k, v in b.tensors().items()}
        out.update({f"Z.{nm}": v for nm, v in self.Z.items()})
        out.update({f"U.{nm}": v for nm, v in self.U.items()})
        out["C0"] = self.C0
        return out

    def solve_flops(self) -> int:
        """Base solves plus the coarse level: ``Zᵀ``/``Z`` cost ``Σ q_l m_l n_l``, ``(A Z)ᵀ``/``A Z`` cost ``q D``."""
        q, D = self.coarse_dim, self.dim
        zd = 2 * sum(self.Z[nm].numel() if self.Z else (q // len(self.shapes)) * m * n
                     for nm, (m, n) in self.shapes.items())
        base = sum(b.solve_flops() for b in self.blocks.values())
        if self.hparams.variant == "additive":
            return base + 2 * zd + 4 * q * q + D
        return base + 2 * zd + 4 * q * D + 8 * q * q + 3 * D

    def state_dict(self) -> dict[str, Any]:
        return {"blocks": {nm: b.state_dict() for nm, b in self.blocks.items()},
                "Z": {k: v.clone() for k, v in self.Z.items()}, "U": {k: v.clone() for k, v in self.U.items()},
                "C0": None if self.C0 is None else self.C0.clone(), "fitted": self.fitted,
                "hparams": {"base": self.hparams.base, "base_hparams": dict(self.hparams.base_hparams),
                            "coarse_space": self.hparams.coarse_space,
                            "coarse_vectors_per_layer": self.hparams.coarse_vectors_per_layer,
                            "variant": self.hparams.variant}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["blocks"]) != set(self.shapes):
            raise ValueError(f"two_level: state has layers {sorted(state['blocks'])}, this model {sorted(self.shapes)}")
        for nm, b in self.blocks.items():
            b.load_state_dict(state["blocks"][nm])
        self.Z = {k: v.clone() for k, v in state["Z"].items()}
        self.U = {k: v.clone() for k, v in state["U"].items()}
        self.C0 = None if state["C0"] is None else state["C0"].clone()
        self.fitted, self._eig = state["fitted"], None

    def __repr__(self) -> str:
        return f"TwoLevel(layers={list(self.shapes)}, {self.hparams})"
