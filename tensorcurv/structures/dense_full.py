"""``dense_full``: the exact model curvature ``C`` (``D x D``, cross-layer blocks included): exact natural gradient.

With the covered layers' per-sample gradients ``G_{l,sk}`` (``(m_l, n_l)``, one capture) stacked as the rows
``j_sk = [vec(G_{1,sk}); …; vec(G_{L,sk})]`` of ``J`` (``NK x D``),

    C = scale Jᵀ J,         solve: (C + λI)^{-1} v by one symmetric eigendecomposition (exact Tikhonov).

The block-diagonal exact natural gradient is the layer structure ``dense`` (``diag(C_11, …, C_LL)``).
Small models only: ``D > max_dim`` is refused at construction (one ``D x D`` float64 matrix is ``8 D²`` bytes;
the default 4096 is 128 MiB). Running average: ``C ← decay·C + (1−decay)·C_batch``. ``blocks`` are
:class:`~tensorcurv.structures.dense.Dense` views of the diagonal blocks ``C_ll`` (studies, coverage).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import vec
from tensorcurv.structures.base import NOT_FITTED, NotFittedError, check_damping, check_decay, register, sym_eig
from tensorcurv.structures.dense import Dense, DenseHparams
from tensorcurv.structures.model import ModelStructure


@dataclass
class DenseFullHparams:
    max_dim: int = 4096
    """Refuse models with more than ``max_dim`` covered parameters ``D`` (memory ``8 D²`` bytes in float64)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_dim, bool) or not isinstance(self.max_dim, int) or self.max_dim < 1:
            raise ValueError(f"dense_full.max_dim must be an integer >= 1, got {self.max_dim!r}")


@register("dense_full")
class DenseFull(ModelStructure):
    """The whole ``D x D`` curvature of the covered layers; exact Tikhonov solve by ``eigh``."""

    Hparams = DenseFullHparams
    fitted: bool = False  # a plain attribute here (set by fit/load_state_dict)

    def __init__(self, shapes: Mapping[str, tuple[int, int]], hparams: DenseFullHparams | None = None) -> None:
        super().__init__(shapes, hparams)
        D = self.dim
        if D > self.hparams.max_dim:
            raise ValueError(
                f"dense_full: the model has D = {D} covered parameters, above max_dim={self.hparams.max_dim} "
                f"({D * D * 8 / 2**30:.1f} GiB in float64); use the block-diagonal 'dense' or raise max_dim"
            )
        block_hp = DenseHparams(max_dim=max(m * n for m, n in self.shapes.values()) if self.shapes else 1)
        self.blocks = {nm: Dense(shape, block_hp) for nm, shape in self.shapes.items()}
        self.fitted = False
        self._eig: tuple[Tensor, Tensor] | None = None

    @property
    def dim(self) -> int:
        """``D``: number of covered parameters."""
        return sum(m * n for m, n in self.shapes.values())

    # ------------------------------------------------------------------ fitting
    def _batch(self, stats: Mapping[str, LayerStats]) -> Tensor:
        ref = self.check_one_capture(stats)
        rows = []
        for nm in self.shapes:
            st = stats[nm]
            st.check_finite()
            rows.append(vec(st.per_sample_grads()))  # (N K, m n)
        J = torch.cat(rows, dim=1)
        return (J.T @ J) * ref.scale

    def _set(self, C: Tensor) -> None:
        self.C, self._eig, self.fitted = C, None, True
        i = 0
        for nm, (m, n) in self.shapes.items():
            d = m * n
            self.blocks[nm].load_state_dict({"tensors": {"C": C[i : i + d, i : i + d]}, "fitted": True})
            i += d

    def fit(self, stats: Mapping[str, LayerStats]) -> DenseFull:
        t0 = time.perf_counter()
        self._set(self._batch(stats))
        self.fit_time = time.perf_counter() - t0
        return self

    def update(self, stats: Mapping[str, LayerStats], decay: float) -> DenseFull:
        check_decay(decay)
        if not self.fitted:
            return self.fit(stats)
        t0 = time.perf_counter()
        self._set(torch.lerp(self._batch(stats), self.C, decay))
        self.fit_time = time.perf_counter() - t0
        return self

    # ------------------------------------------------------------------ operator
    def _global(self, mats: Mapping[str, Tensor]) -> Tensor:
        if not self.fitted:
            raise NotFittedError(f"dense_full: {NOT_FITTED}")
        self.check_layer_mats(mats)
        return self.to_vector(mats)

    def mv(self, mats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        v = self._global(mats)
        return self.from_vector(self.C @ v)

    def solve(self, mats: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
        """``(C + λI)^{-1} v`` (eigenvalues of ``C`` clamped at 0)."""
        v = self._global(mats)
        check_damping(damping)
        if self._eig is None:
            self._eig = sym_eig(self.C)
        evals, Q = self._eig
        self.last_solve = {"method": "eigh", "damping": "tikhonov", "coupling": "full"}
        return self.from_vector(Q @ ((Q.T @ v) / (evals + damping)))

    def to_dense(self) -> Tensor:
        if not self.fitted:
            raise NotFittedError(f"dense_full: {NOT_FITTED}")
        return self.C.clone()

    def tensors(self) -> dict[str, Tensor]:
        return {"C": self.C} if self.fitted else {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # "blocks": the layer names (Curvature checks them); their diagonal blocks are rebuilt from C on load
        return {
            "C": None if not self.fitted else self.C.clone(),
            "fitted": self.fitted,
            "blocks": dict.fromkeys(self.shapes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["C"] is None:
            self.fitted = False
            return
        if tuple(state["C"].shape) != (self.dim, self.dim):
            raise ValueError(f"dense_full: state of size {tuple(state['C'].shape)}, this model has D = {self.dim}")
        self._set(state["C"].clone())
        self.fitted = state["fitted"]

    def __repr__(self) -> str:
        return f"DenseFull(layers={list(self.shapes)}, D={self.dim})"
