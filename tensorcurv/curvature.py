"""Model-level curvature: capture, one model structure over the covered layers, and the whole-model solve.

``curv.model_structure`` is the registry entry's model-level operator
(:mod:`tensorcurv.structures.model`): the layer structures side by side (``BlockDiagonal``), or a
structure that couples them (``two_level``); ``curv.blocks`` are its layer blocks either way.

    curv = Curvature(model, structure="kfac", kind="ggn", **structure_hparams)
    curv.update(inputs, targets, loss_fn)    # capture + fit (or running average) every block
    curv.blocks["0"].to_dense()              # (mn, mn), column-major vec of [W, b]
    curv.solve(grads, damping=1e-3)          # (C + λI)^{-1} g for every covered layer

Scaling: ``C = c Σ_s J_sᵀ H_s J_s`` is the GGN/Fisher of exactly the loss passed in
(``c = 1/N`` for ``reduction="mean"``, ``1`` for ``"sum"``; MSE keeps its factor 2; see
``losses.py``). Bias folded as the last input column; conv weights as
``weight.reshape(out_channels, -1)`` (unfold order in_channel, kernel row, kernel column).

Parameters of layers without a Kronecker adapter (BatchNorm, LayerNorm, Embedding, a
ConvTranspose2d bias, ...) get the ``fallback``: ``identity`` (the gradient passes through
unchanged, the default) or ``diagonal`` (the exact diagonal of their block from per-sample
gradients, ``torch.func``). ``coverage_table()`` prints which parameter is handled by what.
A parameter shared by several modules (tied weights), or a module registered under two names,
is not covered either: each use would get its own block and the curvature would count it twice.

Bad input fails before any work, with one line: a model on the ``meta`` device or in a dtype
other than float32/float64, an empty batch, ``damping <= 0``. An update is all-or-nothing: if the
statistics, the model outputs or the *fitted* state of any block (e.g. ``A = aᵀa`` overflowing
in float32) are non-finite, :class:`~tensorcurv.core.stats.NonFiniteError` (a ``ValueError``) names the
layer and every block is left bit-identical to before. ``solve`` raises the same error, naming
the layer, instead of returning NaN/Inf.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from tensorcurv import structures
from tensorcurv.core.capture import CaptureResult, capture, check_kind
from tensorcurv.core.losses import LossSpec, as_loss_spec
from tensorcurv.core.options import Option
from tensorcurv.core.parameters import (
    assign_parameters,
    check_dtypes,
    check_model,
    coverage_table,
    gradient_list,
)
from tensorcurv.core.routing import ParameterRouting
from tensorcurv.core.stats import NonFiniteError
from tensorcurv.structures.base import NOT_FITTED, NotFittedError, check_damping, check_decay, nonfinite
from tensorcurv.structures.model import ModelStructure


class Fallback(Option):
    """Parameters without a Kronecker adapter: ``identity`` (raw gradient) or ``diagonal`` (exact diagonal block)."""

    IDENTITY = "identity"
    DIAGONAL = "diagonal"


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class CoupledSamplesWarning(UserWarning):
    """A layer mixes the samples of a batch (BatchNorm in training mode): the captured per-sample
    statistics, hence every block, are not the GGN/Fisher of the model."""


class Curvature:
    """Curvature of a model: a :class:`~tensorcurv.structures.model.ModelStructure` over its covered
    layers (one :class:`~tensorcurv.structures.Structure` per layer in ``blocks``) plus the fallback."""

    def __init__(
        self,
        model: nn.Module,
        structure: str = "kfac",
        kind: str = "ggn",
        *,
        mc_samples: int = 1,
        fallback: str = "identity",
        exclude: Sequence[str] = (),
        seed: int | None = None,
        **structure_hparams: Any,
    ) -> None:
        check_kind(kind, mc_samples)
        check_model(model)
        if fallback not in Fallback.values():
            raise ValueError(f"unknown fallback {fallback!r}; valid: {Fallback.values()}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        cls = structures.get(structure)
        hparams = structures.make_hparams(structure, **structure_hparams)
        self.model, self.structure, self.kind = model, structure, kind
        self.mc_samples, self.fallback = mc_samples, fallback
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

        self.adapters, self._coverage, covered = assign_parameters(model, structure, fallback, exclude)

        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self._uncovered = [(n, p) for n, p in self.named_params if id(p) not in covered]
        shapes = {name: a.shape() for name, a in self.adapters.items()}
        #: the model-level operator: the layer blocks side by side (``BlockDiagonal``), or a structure
        #: that couples them (``two_level``)
        self.model_structure: ModelStructure = cls.for_model(shapes, hparams)
        self.blocks: dict[str, structures.Structure] = self.model_structure.blocks
        #: how ``solve``/``mv`` reach every parameter: covered layers through the model structure, the rest
        #: through the fallback
        self.routing = ParameterRouting(self.named_params, self.adapters, self._uncovered, self.model_structure)
        self.fallback_diag: dict[str, Tensor] = {}
        self._batch_norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
        self.last_capture_time = 0.0
        self.last_fit_time = 0.0
        self.num_updates = 0
        self._transaction_depth = 0

    @property
    def fitted(self) -> bool:
        """True once an update has fitted every block (solve, mv and the block operators work)."""
        return self.num_updates > 0 or (bool(self.blocks) and all(b.fitted for b in self.blocks.values()))

    # ------------------------------------------------------------------ coverage
    def coverage(self) -> list[dict[str, str]]:
        """One row per trainable parameter: which structure or fallback handles it, and why."""
        return [dict(r) for r in self._coverage]

    def coverage_table(self) -> str:
        """:meth:`coverage` as an aligned text table."""
        return coverage_table(self.coverage())

    # ------------------------------------------------------------------ statistics
    def capture(
        self, inputs: Tensor, targets: Tensor, loss_fn: LossSpec | nn.Module | str, accumulate_grad: bool = False
    ) -> CaptureResult:
        """Forward + backward; statistics of every covered layer (no fitting)."""
        spec = as_loss_spec(loss_fn)
        check_dtypes(self.named_params)  # (the model may have been converted since construction)
        if any(m.training for m in self._batch_norms):
            warnings.warn(
                "BatchNorm in training mode couples the samples of a batch: the per-sample statistics, "
                "and every block, are not the model's GGN/Fisher (capture in eval mode, or use GroupNorm)",
                CoupledSamplesWarning,
                stacklevel=3,
            )
        t0 = time.perf_counter()
        res = capture(
            self.model,
            self.adapters,
            inputs,
            targets,
            spec,
            self.kind,
            self.mc_samples,
            self.generator,
            grad_params=self.params if accumulate_grad else None,
        )
        self._batch_scale = spec.batch_scale(inputs.shape[0])
        if accumulate_grad:
            assert res.grads is not None  # capture was given grad_params
            for p, g in zip(self.params, res.grads):
                p.grad = g if p.grad is None else p.grad + g
        self.last_capture_time = time.perf_counter() - t0
        return res

    def update(
        self,
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossSpec | nn.Module | str,
        decay: float | None = None,
        accumulate_grad: bool = False,
    ) -> Tensor:
        """Capture one batch and fit every block (``decay=None``) or update its running average.

        With ``accumulate_grad=True`` the gradient of the loss is also added to ``p.grad`` (for
        ``kind="empirical"`` from the same backward pass). Returns the loss (detached).
        Non-finite model outputs, statistics or fitted state raise :class:`NonFiniteError` (a
        ``ValueError``) naming the layer; every block and the sampling generator are then unchanged.
        """
        if decay is not None:
            check_decay(decay)
        gen_state = self.generator.get_state() if self.generator is not None else None
        res = self.capture(inputs, targets, loss_fn, accumulate_grad)
        try:
            self.fit_capture(inputs, res, decay)
        except NonFiniteError:
            if gen_state is not None:
                assert self.generator is not None  # gen_state was taken from it
                self.generator.set_state(gen_state)
            raise
        return res.loss

    def fit_capture(self, inputs: Tensor, res: CaptureResult, decay: float | None = None) -> None:
        """Second half of :meth:`update`: fit every block (and the diagonal fallback) from a
        :meth:`capture` of ``inputs`` and count one update. Lets a caller inspect the loss and
        gradients of the capture (e.g. skip a non-finite step) before any block changes."""
        if decay is not None:
            check_decay(decay)
        if nonfinite([("outputs", res.outputs)]):
            raise NonFiniteError("non-finite model outputs (NaN/Inf) on this batch; no block was changed")
        with self._all_or_nothing():
            self.fit_stats(res.stats, decay)
            if self.fallback == "diagonal" and self._uncovered:
                self._fit_fallback(inputs, res, decay)
        self.num_updates += 1

    def fit_stats(self, stats: Mapping[str, Any], decay: float | None = None) -> None:
        """Fit (or average into) every block from already captured statistics (all-or-nothing)."""
        for st in stats.values():
            st.check_finite()  # all layers checked before any block changes
        t0 = time.perf_counter()
        with self._all_or_nothing():
            if decay is None:
                self.model_structure.fit(stats)
            else:
                self.model_structure.update(stats, decay)
        self.last_fit_time = time.perf_counter() - t0

    @contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Run a fit of all blocks (and the diagonal fallback) as one transaction: if it raises, or
        leaves any block's state non-finite (:class:`NonFiniteError` naming the layer), every block
        is restored to its state before, bit for bit (nested uses: the outermost one decides). A failed
        decomposition (``LinAlgError``, e.g. an ``eigh`` that does not converge on overflowing statistics)
        becomes a :class:`NonFiniteError`, which an optimizer answers by skipping the step."""
        if self._transaction_depth:
            yield
            return
        snap = self.model_structure.snapshot()
        fallback_diag = dict(self.fallback_diag)
        self._transaction_depth += 1
        try:
            yield
            self.model_structure.check_finite()
            bad = nonfinite(self.fallback_diag.items())
            if bad:
                raise NonFiniteError(f"the fallback diagonal of {bad} is non-finite; the update was undone")
        except (torch.linalg.LinAlgError, np.linalg.LinAlgError) as e:  # e.g. eigh on overflowing statistics
            self.model_structure.restore(snap)
            self.fallback_diag = fallback_diag
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise NonFiniteError(f"a decomposition of the fit failed ({why}); no block was changed") from e
        except BaseException:
            self.model_structure.restore(snap)
            self.fallback_diag = fallback_diag
            raise
        finally:
            self._transaction_depth -= 1

    def _fit_fallback(self, inputs: Tensor, res: CaptureResult, decay: float | None) -> None:
        """Exact diagonal ``c Σ_{s,k} (J_sᵀ v_sk)²`` for uncovered parameters, via ``torch.func``."""
        fixed = {n: p.detach() for n, p in self.model.named_parameters()}
        fixed.update({n: b for n, b in self.model.named_buffers()})
        free = {n: p.detach() for n, p in self._uncovered}
        V = res.cotangents.to(inputs.dtype)  # (K, N, C)
        c = self._batch_scale

        def inner(p, x, v):
            out = functional_call(self.model, {**fixed, **p}, (x.unsqueeze(0),)).flatten(1)[0]
            return (out * v).sum()

        per_sample = vmap(vmap(grad(inner), in_dims=(None, None, 0)), in_dims=(None, 0, 1))
        g = per_sample(free, inputs, V)  # each (N, K, *shape)
        for n, t in g.items():
            D = t.pow(2).sum((0, 1)) * c
            if decay is None or n not in self.fallback_diag:
                self.fallback_diag[n] = D
            else:
                self.fallback_diag[n] = decay * self.fallback_diag[n] + (1 - decay) * D

    # ------------------------------------------------------------------ operators
    def _as_list(self, grads) -> list[Tensor]:
        return gradient_list(self.named_params, grads)

    #: blocks with ``has_split_solve`` (kfac) read ``W``/``b`` and write the result without the ``[W, b]``
    #: copies; False forces the concatenated path (same values up to rounding)
    split_solve = True

    def solve(self, grads=None, damping: float = 1e-3, out=None):
        """``(C + λI)^{-1} g`` for every covered layer; uncovered parameters get the fallback.

        ``grads``: a sequence aligned with ``curv.params`` (as ``torch.autograd.grad`` returns),
        a dict ``{param name: tensor}``, or ``None`` to read ``p.grad``. Same type returned.
        ``out``: tensors of the same layout to write the result into (returned); they may be the
        ``grads`` themselves (an in-place solve, e.g. on ``p.grad``).
        ``damping`` must be > 0 (blocks are often singular). A non-finite result raises
        :class:`NonFiniteError` naming the layers (an in-place solve has then overwritten ``out``).
        """
        check_damping(damping)
        damping = float(damping)  # (a NumPy scalar is fine)
        self._check_fitted()

        def fb(n, v):
            if self.fallback == "diagonal":
                return v / (self.fallback_diag[n] + damping)
            return v

        self.model_structure.refresh(damping)  # e.g. all stale decompositions at once (batched by factor size)
        split = (lambda fn, W, b, oW, ob: fn(W, b, damping, oW, ob, False)) if self.split_solve else None
        res = self.routing.apply(grads, fb, lambda mats: self.model_structure.solve(mats, damping), split, out)
        vals = list(res.values()) if isinstance(res, Mapping) else res
        bad = nonfinite(enumerate(vals))
        if bad:
            self._raise_nonfinite_solve(bad, grads if out is None else None, damping)
        return res

    def _raise_nonfinite_solve(self, bad: list[int], grads, damping: float) -> None:
        layers, uncovered = self.routing.layout()
        where = {i: name for name, _, idx in layers for i in idx} | {i: f"{n} (fallback)" for n, i in uncovered}
        names = list(dict.fromkeys(where[i] for i in bad))
        why = "non-finite gradients, or a block that is not positive definite at this damping"
        if grads is not None:  # not in place: the input tells which
            bad_in = {where[i] for i in nonfinite(enumerate(self._as_list(grads)))}
            why = (
                "their gradients are non-finite"
                if set(names) <= bad_in
                else "the damped block is not invertible (an indefinite structure?); raise the damping"
            )
        raise NonFiniteError(f"solve(damping={damping:g}) is non-finite for layer(s) {names}: {why}")

    def mv(self, vectors):
        """``C v`` for every covered layer (uncovered: identity or the fallback diagonal)."""
        self._check_fitted()

        def fb(n, v):
            return self.fallback_diag[n] * v if self.fallback == "diagonal" else v

        return self.routing.apply(vectors, fb, self.model_structure.mv)

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise NotFittedError(f"curvature: {NOT_FITTED} (curv.update(inputs, targets, loss_fn))")

    # ------------------------------------------------------------------ cost & state
    @property
    def nbytes(self) -> int:
        return self.model_structure.nbytes

    def state_dict(self) -> dict[str, Any]:
        return {
            "structure": self.structure,
            "kind": self.kind,
            "num_updates": self.num_updates,
            "fallback_diag": {k: v.clone() for k, v in self.fallback_diag.items()},
            "generator": self.generator.get_state() if self.generator is not None else None,
            "model_structure": self.model_structure.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = ("structure", "kind", "num_updates", "fallback_diag", "generator", "model_structure")
        missing = [k for k in keys if not isinstance(state, Mapping) or k not in state]
        if missing:
            raise ValueError(f"not a Curvature.state_dict(): missing {missing}")
        if set(state["model_structure"].get("blocks", {})) != set(self.blocks):
            raise ValueError(
                f"state is for the layers {sorted(state['model_structure'].get('blocks', {}))}; "
                f"this curvature covers {sorted(self.blocks)} (another model?)"
            )
        if state["structure"] != self.structure or state["kind"] != self.kind:
            raise ValueError(
                f"state is for structure={state['structure']!r}, kind={state['kind']!r}; "
                f"this curvature is {self.structure!r}, {self.kind!r}"
            )
        self.num_updates = state["num_updates"]
        self.fallback_diag = {k: v.clone() for k, v in state["fallback_diag"].items()}
        if state["generator"] is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        self.model_structure.load_state_dict(state["model_structure"])

    def __repr__(self) -> str:
        return (
            f"Curvature(structure={self.structure!r}, kind={self.kind!r}, "
            f"blocks={list(self.blocks)}, uncovered={[n for n, _ in self._uncovered]})"
        )
