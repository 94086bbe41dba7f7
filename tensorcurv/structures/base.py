"""The structure interface (its registry is ``registry.py``, re-exported here).

A *structure* approximates one layer's curvature block ``C`` (``mn x mn``, column-major vec of
the ``(m, n)`` weight matrix ``[W, b]``, see ``tensorcurv/core/stats.py``). Every structure offers

    fit(stats) / update(stats, decay) / mv(V) / solve(V, damping) / to_dense() / nbytes

with ``V`` shaped like the weight matrix. ``solve`` applies ``(Ĉ + λI)^{-1}`` (exact Tikhonov
damping) unless the structure documents another damping variant; ``last_solve`` names what ran.

Adding a structure = one file that subclasses :class:`Structure`, declares a nested
``Hparams`` dataclass (validated in ``__post_init__``) and is decorated with :func:`register`.
Everything else (``Curvature`` and the optimizers, studies, data-parallel fits, unlearning, coarse
spaces) reads a structure only through this interface; ``tests/test_conformance.py`` proves it with
a structure defined in the test alone. Capabilities with defaults (``generic.py``), which a
structure overrides where its own factors do better:

* ``inner_with_exact(stats)`` / ``frobenius_sq()``: ``⟨C, Ĉ⟩`` with the exact block of per-sample
  factors, and ``‖Ĉ‖_F²`` (studies);
* ``leading_eigenpairs(k)`` (spectral coarse spaces of ``two_level``);
* ``additive_statistics`` / ``shared_basis`` / ``additive_projection`` / ``load_reduced``:
  statistics that add up over the samples and their reduction (data-parallel fits), and
  ``fit_flops()`` (which rank fits which layer);
* ``downdate(full, removed, added, corrected)``: the block of a modified data set (unlearning);
* ``refresh(blocks, λ)`` / ``has_split_solve`` + ``solve_split``: batched cache refresh and a
  copy-free solve on ``W`` and ``b`` (``Curvature.solve``);
* ``fit_inverse(stats, λ, ...)``: adapt the fitted ``Ĉ`` to the action of ``(C + λI)⁻¹`` (hyper-parameter
  ``fit_target=inverse``; ``inverse_fit.py``); default: a one-line error naming the structures that have it.

The model-level operator (all layers together, ``two_level`` included) is ``model.py``.

Contract every structure keeps (relied on by ``Curvature``'s all-or-nothing fit):

* ``λ > 0``: ``check_damping`` rejects ``λ <= 0`` (blocks are often singular, e.g. the softmax null
  vector of a cross-entropy output layer, so ``λ = 0`` would divide by zero);
* ``fit``/``update`` *assign* new tensors to the state attributes and never write into a stored
  tensor in place, so :meth:`Structure.snapshot` (references, not copies) can undo a failed fit;
* before the first fit, reading the state (``to_dense``, ``mv``, ``solve``, ...) raises
  :class:`NotFittedError`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from tensorcurv.core.options import plain_options
from tensorcurv.core.stats import LayerStats, NonFiniteError
from tensorcurv.linalg import symmetric_eigh
from tensorcurv.structures import generic
from tensorcurv.structures.registry import (  # noqa: F401  (re-exported: structures register from here)
    create,
    get,
    layer_names,
    make_hparams,
    names,
    register,
    unregister,
)

NOT_FITTED = "no statistics yet: call update() first"


class NotFittedError(RuntimeError, AttributeError):
    """The curvature state was read before any ``update()``/``fit()``.

    Also an ``AttributeError`` (the state attribute does not exist yet), so ``hasattr`` and
    ``getattr(obj, name, default)`` keep working on an unfitted structure."""


@dataclasses.dataclass
class NoHparams:
    """This structure has no hyper-parameters."""


class Structure(ABC):
    """Approximation ``Ĉ`` of one layer's curvature block ``C`` of shape ``(mn, mn)``."""

    name: ClassVar[str] = ""
    #: True when :meth:`solve` is an exact inverse of ``Ĉ + λI`` (closed form, no iteration).
    exact_solve: bool = True  # a class default; some structures set it per instance
    Hparams: ClassVar[type] = NoHparams

    def __init__(self, shape: tuple[int, int], hparams: Any = None) -> None:
        m, n = shape
        if m < 1 or n < 1:
            raise ValueError(f"{self.name}: invalid block shape {shape}")
        self.shape = (int(m), int(n))
        self.hparams = hparams if hparams is not None else self.Hparams()
        self.fitted = False
        self.last_solve: dict[str, Any] = {}
        self.fit_time = 0.0

    def __getattr__(self, name: str) -> Any:
        # reached only when normal lookup fails: a state attribute (A, G, C, D, cores, ...) that
        # the first fit creates, read before any fit (e.g. to_dense() on a new block)
        if not name.startswith("__") and self.__dict__.get("fitted") is False:
            raise NotFittedError(f"{self.name}: {NOT_FITTED} (.{name} does not exist before the first fit)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ fitting
    @abstractmethod
    def fit(self, stats: LayerStats) -> Structure:
        """Fit ``Ĉ`` to the block of one batch (replaces any previous state)."""

    def update(self, stats: LayerStats, decay: float) -> Structure:
        """Running estimate: exponential moving average ``Ĉ ← decay·Ĉ + (1−decay)·Ĉ_batch``
        of the structure's statistics (subclasses say what exactly is averaged)."""
        check_decay(decay)
        if not self.fitted:
            return self.fit(stats)
        return self._update(stats, decay)

    def _update(self, stats: LayerStats, decay: float) -> Structure:
        raise NotImplementedError(f"{self.name} has no running average; call fit()")

    # ------------------------------------------------------------------ operator
    @abstractmethod
    def mv(self, V: Tensor) -> Tensor:
        """``Ĉ vec(V)`` reshaped like ``V`` (``(m, n)``)."""

    @abstractmethod
    def solve(self, V: Tensor, damping: float) -> Tensor:
        """``(Ĉ + λI)^{-1} vec(V)`` reshaped like ``V``."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """``Ĉ`` as an ``(mn, mn)`` matrix (small layers only)."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The tensors that define ``Ĉ`` (for ``nbytes`` and ``state_dict``)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def solve_flops(self) -> int:
        """Approximate floating-point operations of one :meth:`solve`."""
        return 0

    # ------------------------------------------------------------------ capabilities
    # what studies, coarse spaces, data-parallel runs and unlearning need from a block; the defaults
    # work through mv/to_dense (tensorcurv/structures/generic.py), a structure overrides what it can
    # do better from its own factors
    def inner_with_exact(self, stats: LayerStats, chunk: int = 128) -> float:
        """``⟨C, Ĉ⟩_F = scale Σ_j ⟨G_j, Ĉ G_j⟩`` with ``C`` the exact block of ``stats`` (per-sample
        gradients ``G_j``, ``j = (s, k)``, formed ``chunk`` samples at a time)."""
        return generic.inner_with_exact(self, stats, chunk)

    def frobenius_sq(self, dense_max_dim: int = generic.DENSE_MAX_DIM) -> float:
        """``‖Ĉ‖_F²`` (default: ``to_dense()`` up to ``mn = dense_max_dim``, else ``mn`` products)."""
        return generic.frobenius_sq(self, dense_max_dim)

    def leading_eigenpairs(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` largest eigenvalues ``(k,)`` of ``Ĉ`` and their eigenvectors ``(k, m, n)``,
        orthonormal in the column-major ``vec`` inner product (default: dense ``eigh`` on small
        blocks, else subspace iteration on ``mv``)."""
        return generic.leading_eigenpairs(self, k)

    def fit_flops(self) -> float:
        """Estimated flops of the per-layer work of one fit (its decompositions), which a data-parallel
        run assigns to one rank. Default: two eigendecompositions ``9(n³ + m³)``, times the structure's
        ``rank`` hyper-parameter where it has an integer one."""
        m, n = self.shape
        rank = getattr(self.hparams, "rank", 1)
        return 9.0 * (n**3 + m**3) * max(1, int(rank) if isinstance(rank, int) else 1)

    def fit_inverse(self, stats: LayerStats, damping: float, **options: Any) -> dict[str, Any]:
        """Adapt the fitted ``Ĉ`` to ``(C + λI)⁻¹``: minimize ``Σ_j ‖(Ĉ + λI) y_j − z_j‖²`` over probes ``z_j``,
        ``y_j = (C + λI)⁻¹ z_j`` (options and report: :func:`tensorcurv.structures.inverse_fit.fit_kronecker_inverse`);
        ``Ĉ`` stays PSD. Default: ``NotImplementedError`` naming the structures that have it."""
        return generic.fit_inverse(self)

    # data-parallel fits (tensorcurv.distributed): statistics that add up over the samples. A batch is
    # split in shards; every rank calls additive_statistics on its shard, the results are summed over
    # ranks, the owner of the layer computes shared_basis from the sums and shares it, the ranks sum
    # additive_projection, and load_reduced sets the state. Structures whose fit does not add up
    # (the default) are fitted by the owner on the gathered samples instead.
    def additive_statistics(self, stats: LayerStats, weight: float) -> dict[str, Tensor] | None:
        """This shard's part of the batch tensors of a fit, such that the sums over the shards of one
        batch are those of the whole batch. ``stats`` is at the whole batch's loss scale; ``weight =
        N_shard / N`` multiplies terms that are per-sample means. ``None`` (default): not additive."""
        return None

    def shared_basis(self, reduced: dict[str, Tensor], decay: float | None) -> dict[str, Tensor]:
        """Tensors one rank computes from the summed statistics and sends to the others, so that every
        rank holds the very same ones (e.g. an eigenbasis); default: none."""
        return {}

    def shared_basis_like(self, reduced: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensors shaped like :meth:`shared_basis` (what the other ranks receive into); default: none."""
        return {}

    def additive_projection(self, stats: LayerStats, basis: dict[str, Tensor]) -> dict[str, Tensor]:
        """This shard's part of the statistics that need the shared basis (summed over ranks); default: none."""
        return {}

    def load_reduced(
        self, reduced: dict[str, Tensor], basis: dict[str, Tensor], projected: dict[str, Tensor], decay: float | None
    ) -> None:
        """Set the state from the summed statistics: the batch's (``decay=None`` or first fit), else the
        running average ``decay·old + (1−decay)·batch`` of every tensor. The default suits structures
        whose state is their additive statistics (the state is replaced by ``reduced``)."""
        if decay is not None and self.fitted:
            old = self.tensors()
            reduced = {k: decay * old[k] + (1 - decay) * v for k, v in reduced.items()}
        self.load_state_dict({"tensors": dict(reduced), "fitted": True})

    # unlearning (tensorcurv.unlearn.cache): the block of a modified data set
    def downdate(
        self, full: LayerStats, removed: LayerStats, added: LayerStats | None, corrected: LayerStats
    ) -> Structure:
        """A new structure fitted to ``corrected`` = the rows of ``full`` (to which ``self`` was fitted)
        without ``removed`` and with ``added`` (``None``: none added). Default: a fresh fit on
        ``corrected``; structures additive in the samples subtract and add the affected rows only."""
        return type(self)(self.shape, self.hparams).fit(corrected)

    #: True when :meth:`solve_split` reads ``W`` and ``b`` in place, without forming ``[W, b]``
    #: (``Curvature.solve`` then takes it on views of the parameter tensors)
    has_split_solve: ClassVar[bool] = False

    def solve_split(
        self, W: Tensor, b: Tensor | None, damping: float, out_W: Tensor, out_b: Tensor | None, check: bool = True
    ) -> None:
        """:meth:`solve` of ``V = [W, b]`` (``b=None``: ``V = W``) written into ``out_W``, ``out_b``.
        Default: forms ``V`` and splits the result; ``check`` is the fast path's switch (unused here)."""
        X = self.solve(W if b is None else torch.cat([W, b[:, None]], dim=1), damping)
        if b is None:
            out_W.copy_(X)
            return
        assert out_b is not None, "solve_split: b without out_b"
        out_W.copy_(X[:, :-1])
        out_b.copy_(X[:, -1])

    @classmethod
    def refresh(cls, blocks: Iterable[Structure], damping: float) -> None:
        """Build the solve caches of many blocks of this class at once for ``damping``, before their
        solves (default: nothing; each block builds its cache inside its own :meth:`solve`)."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": {k: v.clone() for k, v in self.tensors().items()},
            "hparams": plain_options(dataclasses.asdict(self.hparams)),
            "fitted": self.fitted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["tensors"].items():
            setattr(self, k, v.clone())
        self.fitted = state["fitted"]
        self._after_load()

    def _after_load(self) -> None:
        """Recompute caches (eigendecompositions, ...) after :meth:`load_state_dict`."""

    def snapshot(self) -> dict[str, Any]:
        """Everything :meth:`restore` needs to undo a later ``fit``/``update`` exactly (see
        :func:`snapshot_attributes`)."""
        return snapshot_attributes(self)

    def restore(self, snap: dict[str, Any]) -> None:
        """Return to the state of :meth:`snapshot` (bit-identical)."""
        restore_attributes(self, snap)

    # ------------------------------------------------------------------ model level
    @classmethod
    def for_model(cls, shapes: Mapping[str, tuple[int, int]], hparams: Any = None):
        """The model-level operator of this structure: one instance per layer of ``shapes``, side by
        side in a :class:`~tensorcurv.structures.model.BlockDiagonal`."""
        from tensorcurv.structures.model import BlockDiagonal  # (model.py builds on this module)

        return BlockDiagonal({name: cls(shape, hparams) for name, shape in shapes.items()})

    # ------------------------------------------------------------------ helpers
    def _check(self, V: Tensor, damping: float | None = None) -> None:
        if not self.fitted:
            raise NotFittedError(f"{self.name}: {NOT_FITTED}")
        if tuple(V.shape) != self.shape:
            raise ValueError(f"{self.name}: expected V of shape {self.shape}, got {tuple(V.shape)}")
        if damping is not None:
            check_damping(damping)

    def _check_stats(self, stats: LayerStats) -> None:
        if stats.shape != self.shape:
            raise ValueError(f"{self.name}: statistics of shape {stats.shape} for a block of shape {self.shape}")
        stats.check_finite()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, {self.hparams})"


def snapshot_attributes(obj: Any) -> dict[str, Any]:
    """What :func:`restore_attributes` needs to undo a later fit of ``obj`` exactly: the attribute
    dict (tensors by reference: fits assign new tensors, see the module doc), its dicts and lists
    copied one level deep, and the state of every random generator."""
    attrs = {k: copy.copy(v) if isinstance(v, (dict, list)) else v for k, v in obj.__dict__.items()}
    generators = {k: v.get_state() for k, v in obj.__dict__.items() if isinstance(v, torch.Generator)}
    return {"attrs": attrs, "generators": generators}


def restore_attributes(obj: Any, snap: dict[str, Any]) -> None:
    """Return ``obj`` to the state of :func:`snapshot_attributes` (bit-identical)."""
    obj.__dict__.clear()
    obj.__dict__.update(snap["attrs"])
    for k, state in snap["generators"].items():
        obj.__dict__[k].set_state(state)


def fit_blocks(blocks: dict[str, Structure], stats, decay: float | None) -> None:
    """Fit (``decay=None``) or running-average every block from its layer's statistics, timing each.

    A decomposition that fails inside a fit (``torch.linalg.LinAlgError``: in practice factors that
    overflowed to Inf/NaN although ``a`` and ``g`` are finite) raises :class:`NonFiniteError` naming
    the layer; undoing the blocks fitted before it is the caller's job (``Curvature`` does)."""
    for name, block in blocks.items():
        t0 = time.perf_counter()
        st = stats[name]
        try:
            if decay is None:
                block.fit(st)
            else:
                block.update(st, decay)
        except torch.linalg.LinAlgError as e:
            reason = str(e).splitlines()[0]
            raise NonFiniteError(
                f"layer {name!r}: the {block.name} fit failed ({reason}); max |a| = {float(st.a.abs().max()):.3g}, "
                f"max |g| = {float(st.g.abs().max()):.3g} in {st.a.dtype}: products this large overflow"
            ) from e
        block.fit_time = time.perf_counter() - t0


def _is_number(x: Any) -> bool:
    """A real number (Python or NumPy scalar), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_damping(damping: float, allow_zero: bool = False) -> None:
    """``λ`` of ``(Ĉ + λI)^{-1}``: a finite number ``> 0`` (``>= 0`` with ``allow_zero``, for exact
    solvers of a positive definite matrix). Zero is refused because curvature blocks are often
    singular (softmax null vector of a cross-entropy output layer, dead units, rank < mn): the solve
    would divide by zero."""
    ok = _is_number(damping) and math.isfinite(damping) and (damping >= 0 if allow_zero else damping > 0)
    if not ok:
        valid = "[0, inf)" if allow_zero else "(0, inf); curvature blocks can be singular, so λ = 0 is refused"
        raise ValueError(f"damping must be a finite number in {valid}, got {damping!r}")


def check_decay(decay: float) -> None:
    if not (_is_number(decay) and 0.0 <= decay < 1.0):
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")


def nonfinite(named: Iterable[tuple[Any, Tensor]]) -> list[Any]:
    """Names of the tensors holding NaN/±Inf. Fast path: one sum per tensor and one host sync (a
    NaN or ±Inf anywhere makes the sum non-finite); only if some sum is non-finite (or overflowed)
    are those tensors checked element by element."""
    named = [(k, t) for k, t in named if t is not None and t.numel() > 0 and t.is_floating_point()]
    if not named:
        return []
    sums = torch.stack([t.sum().to(named[0][1].device, torch.float64) for _, t in named])
    if math.isfinite(float(sums.sum())):
        return []
    return [k for (k, t), f in zip(named, torch.isfinite(sums).tolist()) if not f and not bool(torch.isfinite(t).all())]


def check_state_finite(structures: dict[str, Structure]) -> None:
    """Raise ``NonFiniteError`` naming the layers whose fitted state holds NaN/±Inf (e.g. ``A = aᵀa``
    overflowing in float32 for finite but huge inputs)."""
    bad = nonfinite(((name, k), t) for name, s in structures.items() for k, t in s.tensors().items())
    if bad:
        layers = list(dict.fromkeys(name for name, _ in bad))
        raise NonFiniteError(
            f"the fitted curvature of layer(s) {layers} is non-finite (in "
            f"{sorted({k for _, k in bad})}; e.g. an overflow of finite but huge inputs "
            "or gradients); the update was undone"
        )


def sym_eig(M: Tensor, floor: float = 0.0) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric matrix with eigenvalues clamped at ``floor`` (PSD); see
    :func:`tensorcurv.linalg.symmetric_eigh` for the float64 retry when float32 LAPACK returns NaN."""
    evals, evecs = symmetric_eigh(M)
    return evals.clamp_min(floor), evecs
