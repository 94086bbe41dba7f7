"""The model-level curvature operator: what ``Curvature`` fits, applies and solves.

The covered parameters of a model are the concatenation of its layers' column-major
``vec([W_l, b_l])`` (length ``D = Σ_l m_l n_l``). A :class:`ModelStructure` approximates the model
curvature on them and works on dicts ``{layer: (m_l, n_l) matrix}``:

    fit(stats) / update(stats, decay) / mv(mats) / solve(mats, damping) / to_dense() / nbytes

with ``stats`` a dict ``{layer: LayerStats}`` of one capture. Every model structure keeps its layer
blocks in ``blocks`` (per-layer views: studies, coverage, the unlearning cache).

* :class:`BlockDiagonal`: ``Ĉ = diag(Ĉ_1, ..., Ĉ_L)``, one layer
  :class:`~tensorcurv.structures.base.Structure` per layer; every operation acts on each layer
  alone (``block_diagonal = True``). ``Structure.for_model`` builds it for any layer structure.
* a coupled model structure (``two_level``: a ``BlockDiagonal`` base plus a coarse correction) is
  one registered :class:`ModelStructure` subclass whose ``solve`` mixes the layers
  (``block_diagonal = False``).

The fit contract of the layer structures holds here too (``λ > 0``; fits assign new tensors, so
:meth:`ModelStructure.snapshot` can undo a failed fit; reading before the first fit raises
:class:`~tensorcurv.structures.base.NotFittedError`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats, NonFiniteError
from tensorcurv.linalg import unvec, vec
from tensorcurv.structures.base import (
    NoHparams,
    Structure,
    check_state_finite,
    fit_blocks,
    nonfinite,
    restore_attributes,
    snapshot_attributes,
)


class ModelStructure(ABC):
    """Approximation of the curvature of all covered layers together (see the module docstring)."""

    name: ClassVar[str] = ""
    Hparams: ClassVar[type] = NoHparams
    #: True when fit, mv and solve act on every layer alone (the layers can be fitted and solved
    #: independently, e.g. by different ranks of a data-parallel run)
    block_diagonal: ClassVar[bool] = False
    blocks: dict[str, Structure]

    def __init__(self, shapes: Mapping[str, tuple[int, int]], hparams: Any = None) -> None:
        if not isinstance(shapes, Mapping):
            raise TypeError(
                f"{self.name or type(self).__name__}: pass the layer shapes as a dict "
                f"{{layer name: (m, n)}}, got {type(shapes).__name__}"
            )
        self.shapes = {name: (int(m), int(n)) for name, (m, n) in shapes.items()}
        self.hparams = hparams if hparams is not None else self.Hparams()
        self.last_solve: dict[str, Any] = {}
        self.fit_time = 0.0

    @property
    @abstractmethod
    def fitted(self) -> bool:
        """True once :meth:`fit` (or :meth:`load_state_dict`) has given every layer its state."""

    @property
    def exact_solve(self) -> bool:
        """True when :meth:`solve` is an exact inverse of ``Ĉ + λI``."""
        return True

    @classmethod
    def for_model(cls, shapes: Mapping[str, tuple[int, int]], hparams: Any = None) -> ModelStructure:
        """The registry's entry point (as ``Structure.for_model``): a model structure is its own operator."""
        return cls(shapes, hparams)

    # ------------------------------------------------------------------ fitting
    @abstractmethod
    def fit(self, stats: Mapping[str, LayerStats]) -> ModelStructure:
        """Fit to one capture (replaces any previous state)."""

    @abstractmethod
    def update(self, stats: Mapping[str, LayerStats], decay: float) -> ModelStructure:
        """Running average ``decay·old + (1−decay)·batch`` (what exactly is averaged: the subclass)."""

    # ------------------------------------------------------------------ operator
    @abstractmethod
    def mv(self, mats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``Ĉ v`` per layer, ``v`` given as ``{layer: (m, n)}``."""

    @abstractmethod
    def solve(self, mats: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
        """``(Ĉ + λI)^{-1} v`` per layer (or the structure's documented preconditioner)."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """``Ĉ`` as a ``D x D`` matrix (small models only), layers in the order of ``shapes``."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The tensors that define ``Ĉ`` (for ``nbytes`` and finiteness checks)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def check_one_capture(self, stats: Mapping[str, LayerStats]) -> LayerStats:
        """Statistics for every covered layer, of their shapes and from one capture (same ``N``, ``K`` and
        scale: the cross-layer blocks pair sample ``j`` of every layer); returns the first layer's."""
        missing = [nm for nm in self.shapes if nm not in stats]
        if missing:
            raise ValueError(f"{self.name}: no statistics for layers {missing}")
        ref = stats[next(iter(self.shapes))]
        for nm, shape in self.shapes.items():
            st = stats[nm]
            if st.shape != shape or (st.N, st.K, st.scale) != (ref.N, ref.K, ref.scale):
                raise ValueError(
                    f"{self.name}: statistics of layer {nm!r} do not match (shape {st.shape} vs {shape}, or another "
                    "capture's samples N, columns K or scale); the cross-layer blocks need one capture"
                )
        return ref

    def check_layer_mats(self, mats: Mapping[str, Tensor]) -> None:
        """One ``(m_l, n_l)`` matrix per covered layer."""
        for nm, shape in self.shapes.items():
            if nm not in mats or tuple(mats[nm].shape) != shape:
                got = None if nm not in mats else tuple(mats[nm].shape)
                raise ValueError(f"{self.name}: expected layer {nm!r} of shape {shape}, got {got}")

    def to_vector(self, mats: Mapping[str, Tensor]) -> Tensor:
        """The global vector ``[vec(V_1); …; vec(V_L)]`` (length ``D``) of per-layer matrices."""
        return torch.cat([vec(mats[name]) for name in self.shapes])

    def from_vector(self, v: Tensor) -> dict[str, Tensor]:
        """Per-layer ``(m, n)`` matrices of a global vector (inverse of :meth:`to_vector`)."""
        out, i = {}, 0
        for name, (m, n) in self.shapes.items():
            out[name] = unvec(v[i : i + m * n], m, n)
            i += m * n
        return out

    def refresh(self, damping: float) -> None:
        """Bring every solve cache up to date for ``damping`` before a :meth:`solve` (default: nothing;
        the blocks build their caches inside their own solves)."""

    def split_solvers(self) -> dict[str, Callable[..., None]]:
        """``{layer: block.solve_split}`` for the layers solved alone that can read ``W`` and ``b``
        separately (``Structure.has_split_solve``); empty when ``solve`` couples the layers."""
        return {}

    def layer_fit_times(self) -> dict[str, float]:
        """Seconds of the last fit attributable to each layer (NaN where the fit is shared)."""
        return {name: float("nan") for name in self.shapes}

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` naming the layers (then any shared part) whose fitted state
        holds NaN/±Inf."""
        check_state_finite(self.blocks)
        bad = nonfinite(self.tensors().items())
        if bad:
            raise NonFiniteError(
                f"the fitted {self.name} curvature shared by the layers is non-finite (in "
                f"{sorted(bad)}); the update was undone"
            )

    # ------------------------------------------------------------------ state
    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def snapshot(self) -> dict[str, Any]:
        """Everything :meth:`restore` needs to undo a later ``fit``/``update`` bit for bit: this
        object's attributes and every block's snapshot."""
        return {"attrs": snapshot_attributes(self), "blocks": {k: b.snapshot() for k, b in self.blocks.items()}}

    def restore(self, snap: dict[str, Any]) -> None:
        restore_attributes(self, snap["attrs"])
        for k, s in snap["blocks"].items():
            self.blocks[k].restore(s)


class BlockDiagonal(ModelStructure):
    """``Ĉ = diag(Ĉ_l)``: one layer structure per layer, each fitted, applied and solved alone."""

    block_diagonal = True

    def __init__(self, blocks: Mapping[str, Structure]) -> None:
        blocks = dict(blocks)
        first = next(iter(blocks.values()), None)
        super().__init__({k: b.shape for k, b in blocks.items()}, None if first is None else first.hparams)
        self.blocks = blocks

    @property
    def fitted(self) -> bool:
        return bool(self.blocks) and all(b.fitted for b in self.blocks.values())

    @property
    def exact_solve(self) -> bool:
        return all(b.exact_solve for b in self.blocks.values())

    # ------------------------------------------------------------------ fitting
    def fit(self, stats: Mapping[str, LayerStats]) -> BlockDiagonal:
        """Fit every block to its layer's statistics (each block's ``fit_time`` is measured)."""
        t0 = time.perf_counter()
        fit_blocks(self.blocks, stats, None)
        self.fit_time = time.perf_counter() - t0
        return self

    def update(self, stats: Mapping[str, LayerStats], decay: float) -> BlockDiagonal:
        """Every block's own running average (``Structure.update``)."""
        t0 = time.perf_counter()
        fit_blocks(self.blocks, stats, decay)
        self.fit_time = time.perf_counter() - t0
        return self

    def layer_fit_times(self) -> dict[str, float]:
        return {k: b.fit_time for k, b in self.blocks.items()}

    # ------------------------------------------------------------------ operator
    def mv(self, mats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``Ĉ_l V_l`` for every layer in ``mats`` (a subset of the layers is fine)."""
        blocks = self.blocks
        return {k: blocks[k].mv(M) for k, M in mats.items()}

    def solve(self, mats: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
        """``(Ĉ_l + λI)^{-1} V_l`` (each block's own solve) for every layer in ``mats``."""
        blocks = self.blocks
        return {k: blocks[k].solve(M, damping) for k, M in mats.items()}

    def refresh(self, damping: float) -> None:
        """The blocks' batched cache refresh (``Structure.refresh``: e.g. every K-FAC
        eigendecomposition of one size in one call)."""
        if self.blocks:
            type(next(iter(self.blocks.values()))).refresh(self.blocks.values(), damping)

    def split_solvers(self) -> dict[str, Callable[..., None]]:
        return {k: b.solve_split for k, b in self.blocks.items() if b.has_split_solve}

    def to_dense(self) -> Tensor:
        return torch.block_diag(*[b.to_dense() for b in self.blocks.values()])

    def tensors(self) -> dict[str, Tensor]:
        return {f"{k}.{name}": t for k, b in self.blocks.items() for name, t in b.tensors().items()}

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())

    def check_finite(self) -> None:
        check_state_finite(self.blocks)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"blocks": {k: b.state_dict() for k, b in self.blocks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["blocks"]) != set(self.blocks):
            raise ValueError(
                f"state is for the layers {sorted(state['blocks'])}; this curvature covers "
                f"{sorted(self.blocks)} (another model?)"
            )
        for k, b in self.blocks.items():
            b.load_state_dict(state["blocks"][k])

    def __repr__(self) -> str:
        kinds = sorted({b.name for b in self.blocks.values()})
        return f"BlockDiagonal({', '.join(kinds)}, layers={list(self.blocks)})"
