"""The structure interface and its registry.

A *structure* approximates one layer's curvature block ``C`` (``mn x mn``, column-major vec of
the ``(m, n)`` weight matrix ``[W, b]``, see ``tensorcurv/core/stats.py``). Every structure offers

    fit(stats) / update(stats, decay) / mv(V) / solve(V, damping) / to_dense() / nbytes

with ``V`` shaped like the weight matrix. ``solve`` applies ``(Ĉ + λI)^{-1}`` (exact Tikhonov
damping) unless the structure documents another damping variant; ``last_solve`` names what ran.

Adding a structure = one file that subclasses :class:`Structure`, declares a nested
``Hparams`` dataclass (validated in ``__post_init__``) and is decorated with :func:`register`.

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
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats, NonFiniteError

_REGISTRY: dict[str, type[Structure]] = {}

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
    exact_solve: bool = True  # a class default; a structure may set it per instance (kron_sum)
    #: "layer": one instance per covered layer; "model": one instance for the whole model.
    scope: ClassVar[str] = "layer"
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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"tensors": {k: v.clone() for k, v in self.tensors().items()},
                "hparams": dataclasses.asdict(self.hparams), "fitted": self.fitted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["tensors"].items():
            setattr(self, k, v.clone())
        self.fitted = state["fitted"]
        self._after_load()

    def _after_load(self) -> None:
        """Recompute caches (eigendecompositions, ...) after :meth:`load_state_dict`."""

    def snapshot(self) -> dict[str, Any]:
        """Everything :meth:`restore` needs to undo a later ``fit``/``update`` exactly: the attribute
        dict (tensors by reference: fits assign new tensors, see the module doc), its dicts and
        lists copied one level deep, and the state of every random generator."""
        attrs = {k: copy.copy(v) if isinstance(v, (dict, list)) else v for k, v in self.__dict__.items()}
        generators = {k: v.get_state() for k, v in self.__dict__.items() if isinstance(v, torch.Generator)}
        return {"attrs": attrs, "generators": generators}

    def restore(self, snap: dict[str, Any]) -> None:
        """Return to the state of :meth:`snapshot` (bit-identical)."""
        self.__dict__.clear()
        self.__dict__.update(snap["attrs"])
        for k, state in snap["generators"].items():
            self.__dict__[k].set_state(state)

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
    return [k for (k, t), f in zip(named, torch.isfinite(sums).tolist())
            if not f and not bool(torch.isfinite(t).all())]


def check_state_finite(structures: dict[str, Structure]) -> None:
    """Raise ``NonFiniteError`` naming the layers whose fitted state holds NaN/±Inf (e.g. ``A = aᵀa``
    overflowing in float32 for finite but huge inputs)."""
    bad = nonfinite(((name, k), t) for name, s in structures.items() for k, t in s.tensors().items())
    if bad:
        layers = list(dict.fromkeys(name for name, _ in bad))
        raise NonFiniteError(f"the fitted curvature of layer(s) {layers} is non-finite (in "
                             f"{sorted({k for _, k in bad})}; e.g. an overflow of finite but huge inputs "
                             "or gradients); the update was undone")


# ---------------------------------------------------------------------- registry
def register(name: str, *aliases: str):
    """Class decorator adding a structure to the registry under ``name`` (and ``aliases``)."""

    def deco(cls: type[Structure]) -> type[Structure]:
        cls.name = name
        for key in (name, *aliases):
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(f"structure name {key!r} is already registered")
            _REGISTRY[key] = cls
        return cls

    return deco


def names() -> list[str]:
    """Registered structure names (aliases included), sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Structure]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown structure {name!r}; valid structures: {', '.join(names())}") from None


def make_hparams(name: str, **hparams: Any) -> Any:
    """Build and validate ``get(name).Hparams`` from keyword arguments (clear errors on bad keys)."""
    cls = get(name)
    fields = {f.name for f in dataclasses.fields(cls.Hparams)}
    unknown = sorted(set(hparams) - fields)
    if unknown:
        raise ValueError(
            f"structure {name!r} does not take {unknown}; its hyper-parameters are {sorted(fields) or 'none'}"
        )
    return cls.Hparams(**hparams)


def create(name: str, shape: tuple[int, int], **hparams: Any) -> Structure:
    """Instantiate a registered structure for a block of weight shape ``(m, n)``."""
    return get(name)(shape, make_hparams(name, **hparams))


def sym_eig(M: Tensor, floor: float = 0.0) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric matrix with eigenvalues clamped at ``floor`` (PSD)."""
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    return evals.clamp_min(floor), evecs
