"""``two_level``: a block-diagonal base plus a coarse-space correction that couples the layers.

Two-level K-FAC (Tselepidis, Kohler & Orvieto 2020; Koroko et al. 2023). With ``A = C + λI`` (``C`` the
exact model curvature, cross-layer blocks included), ``M^{-1} = (B + λI)^{-1}`` the block-diagonal base
(any layer structure, default ``kfac``), orthonormal coarse vectors ``Z = R0ᵀ`` (``D x q``, each on one
layer; :mod:`tensorcurv.structures.coarse_space`) and ``E = Zᵀ A Z = C0 + λI`` (``C0`` from per-sample
projections, never from ``C``), for a right-hand side ``g`` with fine solve ``x_f = M^{-1} g``:

* ``additive``: ``P^{-1} g = x_f + Z E^{-1} Zᵀ g``;
* ``multiplicative`` (the thesis's two-level K-FAC): ``P^{-1} g = x_f + Z E^{-1} Zᵀ (g − A x_f)``;
* ``balanced``: ``P^{-1} = (I − Z E^{-1} Zᵀ A) M^{-1} (I − A Z E^{-1} Zᵀ) + Z E^{-1} Zᵀ``.

Additive and balanced are SPD for ``λ > 0``; ``solve`` applies ``P^{-1}`` (``exact_solve = False``);
``mv``/``to_dense`` are those of ``B``, a :class:`~tensorcurv.structures.model.BlockDiagonal` of
layer structures; spectral coarse vectors are each block's ``leading_eigenpairs``. The mathematics
and the running average: docs/structures/two_level.md.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.options import Option, plain_options
from tensorcurv.core.stats import LayerStats
from tensorcurv.structures import registry
from tensorcurv.structures.base import (
    NOT_FITTED,
    NotFittedError,
    check_damping,
    check_decay,
    register,
    restore_attributes,
    snapshot_attributes,
    sym_eig,
)
from tensorcurv.structures.coarse_space import (
    SOLVE_TIME_SPACES,
    CoarseMatrix,
    CoarseSpace,
    carried,
    check_coarse_options,
    coarse_level,
    kronecker_coarse_matrix,
    nicolaides,
    solve_time_vectors,
    vectors_per_layer,
)
from tensorcurv.structures.model import ModelStructure


class Variant(Option):
    """How the coarse correction combines with the block solve: ``additive``, ``multiplicative`` or ``balanced``."""

    ADDITIVE = "additive"
    MULTIPLICATIVE = "multiplicative"
    BALANCED = "balanced"


@dataclass
class TwoLevelHparams:
    base: str = "kfac"
    """Layer structure of the diagonal blocks ``B_l`` (``kfac``, ``ekfac``, ``dense``, ...)."""
    base_hparams: dict = field(default_factory=dict)
    """Hyper-parameters passed to every base block (validated by the base's own ``Hparams``)."""
    coarse_space: str = CoarseSpace.NICOLAIDES
    """``nicolaides``, ``spectral``, ``residual``, ``krylov_nicolaides`` or ``krylov_residual``
    (:mod:`tensorcurv.structures.coarse_space`)."""
    coarse_vectors_per_layer: int = 1
    """Coarse vectors per layer (``spectral`` only; the Krylov spaces have 2, the others 1)."""
    variant: str = Variant.ADDITIVE
    """``additive``: ``M^{-1} + Z E^{-1} Zᵀ``; ``multiplicative``: ``x_f + Z E^{-1} Zᵀ(g − A x_f)``;
    ``balanced``: balancing Neumann–Neumann (deflated) form."""
    coarse_matrix: str = CoarseMatrix.EXACT
    """``exact``: ``Zᵀ C Z``; ``kronecker``: cross-layer K-FAC blocks (Tselepidis et al.; nicolaides, additive)."""

    def __post_init__(self) -> None:
        valid = registry.layer_names()
        if self.base not in valid:
            raise ValueError(f"two_level.base={self.base!r} is not a layer structure; valid: {valid}")
        self.base_hparams = dict(self.base_hparams or {})
        try:
            registry.make_hparams(self.base, **self.base_hparams)
        except (ValueError, TypeError) as e:
            raise ValueError(f"two_level.base_hparams: {e}") from None
        self.variant = Variant.parse(self.variant, "two_level.variant")
        self.coarse_space, self.coarse_matrix = check_coarse_options(
            self.coarse_space, self.coarse_vectors_per_layer, self.coarse_matrix, self.variant
        )

    def make_base_hparams(self) -> Any:
        return registry.make_hparams(self.base, **self.base_hparams)


# ---------------------------------------------------------------------- the structure
@register("two_level")
class TwoLevel(ModelStructure):
    """Block-diagonal base ``B`` plus coarse correction; one instance for the whole model."""

    Hparams = TwoLevelHparams
    fitted: bool = False  # a plain attribute here (set by fit/load_state_dict), the base's property

    def __init__(self, shapes: Mapping[str, tuple[int, int]], hparams: TwoLevelHparams | None = None) -> None:
        super().__init__(shapes, hparams)
        if len(self.shapes) == 0:
            raise ValueError("two_level needs at least one covered layer: the coarse space would have dimension 0")
        hp = self.hparams
        for name, (m, n) in self.shapes.items():
            if hp.coarse_vectors_per_layer > m * n:
                raise ValueError(
                    f"two_level.coarse_vectors_per_layer={hp.coarse_vectors_per_layer} exceeds the "
                    f"{m * n} parameters of layer {name!r}"
                )
        self.base = registry.get(hp.base).for_model(self.shapes, hp.make_base_hparams())  # B = diag(B_l)
        self.blocks = self.base.blocks
        self.fitted = False
        self.fit_time = 0.0  # whole fit (base blocks + coarse level), seconds
        self.coarse_fit_time = 0.0  # coarse level only: coarse vectors, projections, C0, U
        self.Z: dict[str, Tensor] = {}  # coarse vectors restricted to each layer, (q_l, m, n)
        self.U: dict[str, Tensor] = {}  # (C Z) restricted to each layer, (q, m, n)
        self.C0: Tensor | None = None  # (q, q) = R0 C R0ᵀ
        self._eig: tuple[Tensor, Tensor] | None = None

    @property
    def exact_solve(self) -> bool:
        """False: :meth:`solve` applies the preconditioner ``P^{-1}``, not the inverse of some ``Ĉ + λI``."""
        return False

    # ------------------------------------------------------------------ sizes
    @property
    def dim(self) -> int:
        """``D``: number of parameters in the covered layers."""
        return sum(m * n for m, n in self.shapes.values())

    @property
    def coarse_dim(self) -> int:
        """``q``: number of coarse vectors (rows of ``R0``)."""
        if self.Z:  # (a solve-time coarse space drops dependent vectors: count them)
            return sum(V.shape[0] for V in self.Z.values())
        return vectors_per_layer(self.hparams.coarse_space, self.hparams.coarse_vectors_per_layer) * len(self.shapes)

    @property
    def _at_solve(self) -> bool:
        """True for the coarse spaces built at solve time (``residual``, ``krylov_*``)."""
        return self.hparams.coarse_space in SOLVE_TIME_SPACES

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
                raise ValueError(
                    "two_level: layers disagree on samples N, backward columns K or scale; "
                    "the coarse level needs statistics from one capture"
                )
            st.check_finite()

    def _coarse_vectors(self, like: Tensor) -> dict[str, Tensor]:
        if self.hparams.coarse_space == "nicolaides":
            return nicolaides(self.shapes, like)
        k = self.hparams.coarse_vectors_per_layer
        return {name: self.blocks[name].leading_eigenpairs(k)[1].to(like) for name in self.shapes}

    def _batch_coarse(self, stats, Z):
        C0, U = coarse_level(stats, Z)
        if self.hparams.coarse_matrix == "kronecker":
            C0 = kronecker_coarse_matrix(stats, list(self.shapes))
        return C0, U

    def fit(self, stats: Mapping[str, LayerStats]) -> TwoLevel:
        """Fit every base block and the coarse level to one batch (replaces any previous state)."""
        self._check_stats_dict(stats)
        t0 = time.perf_counter()
        self.base.fit(stats)
        tc = time.perf_counter()
        self._eig, self.fitted = None, True
        if self._at_solve:  # built from the right-hand side of each solve, on this capture's samples
            self.stats, self.Z, self.U, self.C0 = dict(stats), {}, {}, None
        else:
            self.Z = self._coarse_vectors(stats[next(iter(self.shapes))].a)
            self.C0, self.U = self._batch_coarse(stats, self.Z)
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
        self.base.update(stats, decay)
        tc = time.perf_counter()
        if self._at_solve:  # the coarse level of the next solves: on the latest capture
            self.stats, self.Z, self.U, self.C0, self._eig = dict(stats), {}, {}, None, None
            self.fit_time = time.perf_counter() - t0
            return self
        like = stats[next(iter(self.shapes))].a
        Z = self._coarse_vectors(like)
        C0_b, U_b = self._batch_coarse(stats, Z)
        U_carry, C0_carry = carried(self.Z, self.U, Z)
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
            out[nm] = torch.einsum("jmn,j->mn", self.Z[nm], y[i : i + q])
            i += q
        return out

    def _coarse_solve(self, b: Tensor, damping: float) -> Tensor:
        """``E^{-1} b`` with ``E = C0 + λI = R0 (C + λI) R0ᵀ`` (eigenvalues of ``C0`` clamped at 0)."""
        if self._eig is None:
            assert self.C0 is not None  # set by fit/update/load_state_dict
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
        return self.base.mv({nm: mats[nm] for nm in self.shapes})

    def _solve_time_level(self, mats: Mapping[str, Tensor], fine: dict[str, Tensor], lam: float) -> None:
        """Coarse vectors of a solve-time space for the right-hand side ``mats`` (fine solve ``fine``), and
        their ``C0``, ``U`` on the samples of the last capture (``self.stats``)."""
        stats = getattr(self, "stats", None)
        if stats is None:
            raise NotFittedError(f"two_level: coarse_space={self.hparams.coarse_space!r} needs a fit or update first")
        self.Z = solve_time_vectors(
            self.hparams.coarse_space, stats, mats, fine, lambda r: self.base.solve(r, lam), lam
        )
        self.C0, self.U = coarse_level(stats, self.Z)
        self._eig = None

    def solve(self, mats: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
        """``P^{-1} r`` of the chosen ``variant`` (see the module docstring), per layer ``(m, n)``. For the
        solve-time coarse spaces ``Z`` depends on ``r`` (and on λ): the map is then not linear in ``r``."""
        self._check_mats(mats, damping)
        lam, variant = damping, self.hparams.variant
        rhs = {nm: mats[nm] for nm in self.shapes}
        fine = self.base.solve(rhs, lam) if variant != "balanced" or self._at_solve else {}
        if self._at_solve:
            self._solve_time_level(rhs, fine, lam)
        y1 = self._coarse_solve(self._restrict(rhs), lam)  # E^{-1} Zᵀ r
        if variant == "additive":
            coarse = self._prolong(y1)
            out = {nm: fine[nm] + coarse[nm] for nm in self.shapes}
        elif variant == "multiplicative":  # x_f + Z E^{-1} (Zᵀ r − Zᵀ A x_f), Zᵀ A x = Uᵀ x + λ Zᵀ x
            zAx = self._restrict_A(fine, lam)
            corr = self._prolong(y1 - self._coarse_solve(zAx, lam))
            out = {nm: fine[nm] + corr[nm] for nm in self.shapes}
        else:  # balanced: A Z y = U y + λ Z y, never forming C
            Zy1 = self._prolong(y1)
            w = {
                nm: mats[nm] - torch.einsum("jmn,j->mn", self.U[nm], y1) - lam * Zy1[nm] for nm in self.shapes
            }  # (I − A Z E^{-1} Zᵀ) r
            x = self.base.solve(w, lam)  # M^{-1} w
            corr = self._prolong(y1 - self._coarse_solve(self._restrict_A(x, lam), lam))
            out = {nm: x[nm] + corr[nm] for nm in self.shapes}
        self.last_solve = {
            "method": f"two-level-{variant}",
            "coarse_space": self.hparams.coarse_space,
            "coarse_dim": self.coarse_dim,
            "damping": "tikhonov (coarse); base as its own",
            "base": {nm: dict(b.last_solve) for nm, b in self.blocks.items()},
        }
        return out

    def _restrict_A(self, X: Mapping[str, Tensor], lam: float) -> Tensor:
        """``Zᵀ A x = Uᵀ x + λ Zᵀ x`` (``U = C Z``)."""
        return sum(torch.einsum("jmn,mn->j", self.U[nm], X[nm]) for nm in self.shapes) + lam * self._restrict(X)

    # ------------------------------------------------------------------ dense views (small models)
    def restriction(self) -> Tensor:
        """``R0`` as a dense ``(q, D)`` matrix (rows orthonormal)."""
        if not self.fitted:
            raise NotFittedError(f"two_level: {NOT_FITTED}")
        assert self.C0 is not None  # set by fit/update/load_state_dict
        eye = self.C0.new_zeros(self.coarse_dim, self.coarse_dim).fill_diagonal_(1.0)
        return torch.stack([self.to_vector(self._prolong(e)) for e in eye])

    def coarse_matrix(self) -> Tensor:
        """``C0 = R0 C R0ᵀ`` (``q x q``)."""
        if not self.fitted:
            raise NotFittedError(f"two_level: {NOT_FITTED}")
        assert self.C0 is not None  # set by fit/update/load_state_dict
        return self.C0.clone()

    def to_dense(self) -> Tensor:
        """Dense block-diagonal base ``B`` (``D x D``), matching :meth:`mv`."""
        return self.base.to_dense()

    def dense_preconditioner(self, damping: float) -> Tensor:
        """``P^{-1}`` as a dense ``D x D`` matrix: :meth:`solve` applied to every unit vector."""
        assert self.C0 is not None, "two_level: dense_preconditioner needs a fitted structure"
        eye = torch.eye(self.dim, dtype=self.C0.dtype, device=self.C0.device)
        return torch.stack([self.to_vector(self.solve(self.from_vector(e), damping)) for e in eye], dim=1)

    # ------------------------------------------------------------------ cost & state
    def tensors(self) -> dict[str, Tensor]:
        if not self.fitted:
            return {}
        out = {f"blocks.{nm}.{k}": v for nm, b in self.blocks.items() for k, v in b.tensors().items()}
        out.update({f"Z.{nm}": v for nm, v in self.Z.items()})
        out.update({f"U.{nm}": v for nm, v in self.U.items()})
        if self.C0 is not None:  # (None between a fit and the first solve of a solve-time coarse space)
            out["C0"] = self.C0
        return out

    def solve_flops(self) -> int:
        """Base solves plus the coarse level: ``Zᵀ``/``Z`` cost ``Σ q_l m_l n_l``, ``(A Z)ᵀ``/``A Z`` cost ``q D``."""
        q, D = self.coarse_dim, self.dim
        zd = 2 * sum(
            self.Z[nm].numel() if self.Z else (q // len(self.shapes)) * m * n for nm, (m, n) in self.shapes.items()
        )
        base = sum(b.solve_flops() for b in self.blocks.values())
        if self.hparams.variant == "additive":
            return base + 2 * zd + 4 * q * q + D
        return base + 2 * zd + 4 * q * D + 8 * q * q + 3 * D

    def state_dict(self) -> dict[str, Any]:
        return {
            "blocks": {nm: b.state_dict() for nm, b in self.blocks.items()},
            "Z": {k: v.clone() for k, v in self.Z.items()},
            "U": {k: v.clone() for k, v in self.U.items()},
            "C0": None if self.C0 is None else self.C0.clone(),
            "fitted": self.fitted,
            "hparams": plain_options(dataclasses.asdict(self.hparams)),
            # solve-time coarse spaces: the capture their coarse level is built on
            "stats": {nm: (st.a, st.g, st.scale) for nm, st in getattr(self, "stats", {}).items()},
        }

    def snapshot(self) -> dict[str, Any]:
        """This object's attributes (coarse level) and the base's snapshot (its blocks)."""
        return {"attrs": snapshot_attributes(self), "base": self.base.snapshot()}

    def restore(self, snap: dict[str, Any]) -> None:
        restore_attributes(self, snap["attrs"])
        self.base.restore(snap["base"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["blocks"]) != set(self.shapes):
            raise ValueError(f"two_level: state has layers {sorted(state['blocks'])}, this model {sorted(self.shapes)}")
        for nm, b in self.blocks.items():
            b.load_state_dict(state["blocks"][nm])
        self.Z = {k: v.clone() for k, v in state["Z"].items()}
        self.U = {k: v.clone() for k, v in state["U"].items()}
        self.C0 = None if state["C0"] is None else state["C0"].clone()
        self.fitted, self._eig = state["fitted"], None
        if state.get("stats"):
            self.stats = {nm: LayerStats(a=a, g=g, scale=c, name=nm) for nm, (a, g, c) in state["stats"].items()}

    def __repr__(self) -> str:
        return f"TwoLevel(layers={list(self.shapes)}, {self.hparams})"
