"""``exact_batch``: the exact mini-batch curvature of all covered layers, solved by Woodbury.

The model curvature of one capture is ``C = c PᵀP`` (``D x D``, cross-layer blocks included) with ``P``
(``J x D``, ``J = N K``) the stacked per-sample gradients ``u_j = [vec(G_{1,j}); …; vec(G_{L,j})]``,
``G_{l,j} = Σ_t g_{l,jt} a_{l,st}ᵀ`` (column-major ``vec`` of each layer's ``[W, b]``; ``K`` = the columns of
the capture: 10 for the GGN of a 10-class cross-entropy, 1 for the empirical Fisher). ``P`` is never formed
(:class:`~tensorcurv.core.exact.ExactModel` works on the factors ``a``, ``g``); the damped solve is exact:

    (C + λI)⁻¹ v = (v − Pᵀ (λ/c I + P Pᵀ)⁻¹ P v) / λ,    P Pᵀ = Σ_l Gram_l   (J x J),

with the Gram matrix of linear layers (``T = 1``) formed as ``(a aᵀ) ∘ (g gᵀ)`` and one Cholesky factorization
of ``λ/c I + P Pᵀ`` per damping. Cost of a fit + solve: ``O(J² Σ_l m_l)`` for linear layers (``O(J² Σ_l
m_l n_l)`` with weight sharing) for the Gram matrix, ``J³/3`` for the factorization, ``O(J Σ_l T_l m_l n_l)``
per solve; memory the factors plus two ``J x J`` matrices. This is the subsampled (Woodbury) natural gradient
of Ren & Goldfarb (2019) and SENG (Yang et al. 2022): exact for the mini-batch curvature, not a structure of
it, and affordable while ``J`` is small (``J > max_terms`` is refused before any work).

Running average over a window: ``update(stats, decay)`` keeps the last ``window`` captures and
``C = Σ_b w_b C_b`` with ``w_b ∝ decay^age_b`` (age 0 = this batch), normalized to ``Σ_b w_b = 1``;
``sqrt(w_b c_b)`` is folded into each capture's ``g`` so all of them stack into one ``ExactModel``
(``J = Σ_b N_b K``, scale 1). ``window = 1`` (default): ``C`` is this batch's. ``blocks``: per-layer views of the
diagonal blocks ``C_ll`` (studies, coverage), which hold no tensors of their own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.exact import ExactBlock, ExactModel
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import vec
from tensorcurv.structures.base import NOT_FITTED, NotFittedError, Structure, check_damping, check_decay, register
from tensorcurv.structures.model import ModelStructure


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"exact_batch.{name} must be an integer >= 1, got {value!r}")


@dataclass
class ExactBatchHparams:
    window: int = 1
    """Captures kept in the running average ``Σ_b w_b C_b`` (1: this batch's curvature only)."""
    max_terms: int = 4096
    """Refuse more than ``max_terms`` per-sample gradient terms ``J = Σ_b N_b K`` (a ``J x J`` factorization)."""
    chunk: int = 256
    """Samples per chunk where the per-sample gradients of weight-sharing layers are formed (Gram rows)."""
    solve_dtype: str = "float64"
    """``float64``: the factors are cast once per fit and the Gram matrix, its factorization and the Woodbury
    update run in float64 (the result is cast back); ``stats``: in the statistics' dtype (float32 loses the
    direction where ``c‖Gram‖/λ`` nears ``1/ε``: the Woodbury update subtracts nearly equal vectors)."""

    def __post_init__(self) -> None:
        for name in ("window", "max_terms", "chunk"):
            _positive_int(name, getattr(self, name))
        if self.solve_dtype not in ("float64", "stats"):
            raise ValueError(f"exact_batch.solve_dtype must be 'float64' or 'stats', got {self.solve_dtype!r}")


class ExactLayerView(Structure):
    """The diagonal block ``C_ll`` of an ``exact_batch`` curvature (an unregistered layer view; its
    tensors belong to the model structure). Fitted alone it is the layer's exact batch block."""

    name = "exact_batch"

    def __init__(self, shape: tuple[int, int], chunk: int = 256) -> None:
        super().__init__(shape)
        self.chunk = chunk
        self.fitted = False

    def attach(self, block: ExactBlock) -> None:
        self.exact, self.fitted = block, True

    def fit(self, stats: LayerStats) -> ExactLayerView:
        self._check_stats(stats)
        self.attach(ExactBlock(stats, self.chunk))
        return self

    def mv(self, V: Tensor) -> Tensor:
        self._check(V)
        return self.exact.mv(V)

    def solve(self, V: Tensor, damping: float) -> Tensor:
        self._check(V, damping)
        x, info = self.exact.solve(V, damping)
        self.last_solve = {"method": info["method"], "damping": "tikhonov"}
        return x

    def to_dense(self) -> Tensor:
        if not self.fitted:
            raise NotFittedError(f"exact_batch: {NOT_FITTED}")
        return self.exact.to_dense()

    def tensors(self) -> dict[str, Tensor]:
        return {}


@register("exact_batch")
class ExactBatch(ModelStructure):
    """The exact mini-batch curvature ``c PᵀP`` of all covered layers; exact damped solve by Woodbury."""

    Hparams = ExactBatchHparams

    def __init__(self, shapes: Mapping[str, tuple[int, int]], hparams: ExactBatchHparams | None = None) -> None:
        super().__init__(shapes, hparams)
        self.dim = sum(m * n for m, n in self.shapes.values())
        self.blocks = {nm: ExactLayerView(shape, self.hparams.chunk) for nm, shape in self.shapes.items()}
        #: the kept captures, newest first, and their weights ``w_b`` (sum 1)
        self.captures: list[dict[str, LayerStats]] = []
        self.weights: list[float] = []
        self.op: ExactModel | None = None

    @property
    def fitted(self) -> bool:
        return self.op is not None

    # ------------------------------------------------------------------ fitting
    def _check_stats(self, stats: Mapping[str, LayerStats], kept: list[dict[str, LayerStats]]) -> None:
        """Shapes, the term budget (before any work) and finiteness of a new capture."""
        ref = self.check_one_capture(stats)
        first = next(iter(self.shapes))
        J = ref.N * ref.K + sum(c[first].N * c[first].K for c in kept)
        if J > self.hparams.max_terms:
            raise ValueError(
                f"exact_batch.max_terms={self.hparams.max_terms} is below the J = {J} per-sample gradient terms "
                f"(N = {ref.N} samples x K = {ref.K} columns, {len(kept) + 1} capture(s)): the J x J factorization "
                "costs J³/3; use a smaller batch, window or kind=empirical (K = 1), or raise exact_batch.max_terms"
            )
        for st in stats.values():
            st.check_finite()
        for c in kept:
            if c[first].K != ref.K:
                raise ValueError(f"exact_batch: captures of K = {c[first].K} and {ref.K} columns cannot share a window")

    def _set(self, captures: list[dict[str, LayerStats]], weights: list[float]) -> None:
        t0 = time.perf_counter()
        dtype = torch.float64 if self.hparams.solve_dtype == "float64" else None
        op = _stacked_operator(captures, weights, list(self.shapes), self.hparams.chunk, dtype)
        op.gram()  # the damping-independent part of the solve's work belongs to the fit
        self.op, self.captures, self.weights = op, captures, weights
        for nm, view in self.blocks.items():
            view.attach(self.op.blocks[nm])
        self.fit_time = time.perf_counter() - t0

    def fit(self, stats: Mapping[str, LayerStats]) -> ExactBatch:
        """``C`` of this capture alone (the window restarts)."""
        self._check_stats(stats, [])
        self._set([dict(stats)], [1.0])
        return self

    def update(self, stats: Mapping[str, LayerStats], decay: float) -> ExactBatch:
        """This capture joins the window (the oldest leaves); weights ``∝ decay^age``, sum 1 (``decay = 0``
        or ``window = 1``: this capture alone)."""
        check_decay(decay)
        kept = self.captures[: self.hparams.window - 1] if decay > 0 else []
        self._check_stats(stats, kept)
        raw = [decay**age for age in range(len(kept) + 1)]
        self._set([dict(stats), *kept], [w / sum(raw) for w in raw])
        return self

    # ------------------------------------------------------------------ operator
    def _operator(self, mats: Mapping[str, Tensor]) -> ExactModel:
        if self.op is None:
            raise NotFittedError(f"exact_batch: {NOT_FITTED}")
        self.check_layer_mats(mats)
        return self.op

    def _in(self, op: ExactModel, mats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        dtype = next(iter(op.blocks.values())).a.dtype
        return {nm: mats[nm].to(dtype) for nm in self.shapes}

    def mv(self, mats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``C v = c Pᵀ (P v)`` (cross-layer blocks included), in the dtype of ``v``."""
        op = self._operator(mats)
        return {nm: x.to(mats[nm].dtype) for nm, x in op.mv(self._in(op, mats)).items()}

    def solve(self, mats: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
        """``(C + λI)⁻¹ v`` exactly (Woodbury, Cholesky of ``λ/c I + P Pᵀ`` cached for this damping), in the
        dtype of ``v``."""
        op = self._operator(mats)
        check_damping(damping)
        x, _ = op.solve(self._in(op, mats), float(damping), method="cholesky")
        self.last_solve = {
            "method": "woodbury-cholesky",
            "damping": "tikhonov",
            "coupling": "full",
            "terms": self.terms,
        }
        return {nm: t.to(mats[nm].dtype) for nm, t in x.items()}

    def refresh(self, damping: float) -> None:
        """Factor ``λ/c I + P Pᵀ`` for ``damping`` now (the first solve would otherwise)."""
        if self.op is not None:
            self.op.gram_cholesky(float(damping))

    @property
    def terms(self) -> int:
        """Per-sample gradient terms of the fitted curvature (rows of ``P``)."""
        if self.op is None:
            return 0
        first = next(iter(self.op.blocks.values()))
        return first.J

    def to_dense(self) -> Tensor:
        """``C = c PᵀP`` as a ``D x D`` matrix (small models only)."""
        if self.op is None:
            raise NotFittedError(f"exact_batch: {NOT_FITTED}")
        P = torch.cat([vec(b.stats.per_sample_grads()) for b in self.op.blocks.values()], dim=1)
        return self.op.scale * (P.T @ P)

    def tensors(self) -> dict[str, Tensor]:
        """The kept per-sample factors (``a`` and the weighted ``g`` of every capture and layer)."""
        if self.op is None:
            return {}
        return {f"{nm}.{t}": getattr(b.stats, t) for nm, b in self.op.blocks.items() for t in ("a", "g")}

    @property
    def nbytes(self) -> int:
        """The factors plus the ``J x J`` Gram matrix and its Cholesky factor a solve needs."""
        tensors = self.tensors()
        if not tensors:
            return 0
        size = next(iter(tensors.values())).element_size()
        return sum(t.numel() * t.element_size() for t in tensors.values()) + 2 * self.terms**2 * size

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # "blocks": the layer names (Curvature checks them); the views are rebuilt on load
        return {
            "captures": [
                {nm: {"a": st.a.clone(), "g": st.g.clone(), "scale": st.scale} for nm, st in c.items()}
                for c in self.captures
            ],
            "weights": list(self.weights),
            "fitted": self.fitted,
            "blocks": dict.fromkeys(self.shapes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state["fitted"]:
            self.captures, self.weights, self.op = [], [], None
            for view in self.blocks.values():
                view.fitted = False
            return
        captures = [
            {nm: LayerStats(s["a"].clone(), s["g"].clone(), float(s["scale"]), name=nm) for nm, s in c.items()}
            for c in state["captures"]
        ]
        for c in captures:
            if {nm: st.shape for nm, st in c.items()} != self.shapes:
                raise ValueError(f"exact_batch: state for layers {sorted(c)} of other shapes than {self.shapes}")
        self._set(captures, [float(w) for w in state["weights"]])

    def __repr__(self) -> str:
        return f"ExactBatch(layers={list(self.shapes)}, D={self.dim}, window={self.hparams.window})"


def _stacked_operator(
    captures: list[dict[str, LayerStats]],
    weights: list[float],
    layers: list[str],
    chunk: int,
    dtype: torch.dtype | None,
) -> ExactModel:
    """One :class:`ExactModel` of ``Σ_b w_b C_b`` in ``dtype`` (``None``: the statistics'): a single capture as it
    is (scale ``c``); several stacked along the samples with ``sqrt(w_b c_b)`` folded into ``g`` (scale 1)."""
    stats = {}

    def cast(t: Tensor) -> Tensor:
        return t if dtype is None else t.to(dtype)

    for nm in layers:
        if len(captures) == 1:
            st = captures[0][nm]
            if dtype is None or st.a.dtype == dtype:
                stats[nm] = st
                continue
            stats[nm] = LayerStats(cast(st.a), cast(st.g), st.scale, name=nm)
        else:
            parts = [(c[nm], math.sqrt(w * c[nm].scale)) for c, w in zip(captures, weights)]
            a = torch.cat([cast(st.a) for st, _ in parts])
            g = torch.cat([cast(st.g) * f for st, f in parts])
            stats[nm] = LayerStats(a, g, 1.0, name=nm)
        stats[nm].mark_finite()  # every capture was checked when it joined the window
    return ExactModel.from_stats(stats, "full", chunk, cache_layer_grams=False)
