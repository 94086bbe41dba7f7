"""Structured configuration of a training run and its start-up validation.

``conf/train.yaml`` composes the groups ``data``, ``model``, ``curvature``, ``optim``, ``logger``
plus the top-level fields of :class:`TrainConfig`. :func:`validate_train` checks the whole composed
config *before any work starts* and raises :class:`ConfigError` (a ``ValueError``) with one line
that names the bad key and its valid choices, e.g.::

    curvature.name='kfca' is not a structure; valid: dense, diagonal, ekfac, kfac, ...
    optim.name='adamm' is not an optimizer; valid: natural_gradient, gauss_newton, sgd, ...
    curvature.damping=-1.0: damping must be a finite number >= 0

The structure's own hyper-parameters are validated by its ``Hparams`` dataclass
(``tensorcurv.structures.make_hparams``), the optimizer's by ``tensorcurv.optim.config``; then every
covered layer's block is constructed once on the (cheap) model, so constraints that need the layer
size — an index split that does not divide it, a rank above the block's — fail here too.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "float64")
TASKS = ("auto", "classify", "autoencode")
#: curvature-group keys that are not structure hyper-parameters
CURVATURE_KEYS = ("name", "kind", "damping")
SECOND_ORDER = ("natural_gradient", "gauss_newton")
#: optim keys that conf/train.yaml links to the curvature group
LINKED_KEYS = ("structure", "kind", "damping")


class ConfigError(ValueError):
    """A one-line configuration error raised before any work starts."""


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


@dataclass
class DataConfig:
    """``conf/data/<name>.yaml``: the arguments of :func:`tensorcurv.data.load`."""

    name: str = "digits"
    """Dataset: one of ``tensorcurv.data.names()``."""
    data_dir: str = "data"
    """Folder with the dataset files (relative to the working directory)."""
    val_fraction: float = 0.1
    """Fraction of the training pool held out for validation, in [0, 1)."""
    test_fraction: float = 0.2
    """Held-out test fraction for datasets without an official test split, in [0, 1)."""
    normalize: str = "standard"
    """``standard`` (per-feature z-score), ``unit`` (to [0, 1]) or ``none``; training-set statistics."""
    download: bool = True
    """Download missing standard files (MNIST, Fashion-MNIST, CIFAR-10) when online."""
    limit: int | None = None
    """Keep at most this many samples per split (quick runs); None: all."""


@dataclass
class LoggerConfig:
    """``conf/logger/<kind>.yaml``: see :mod:`tensorcurv.tracking`."""

    kind: str = "csv"
    """``wandb``, ``csv`` or ``none``."""
    mode: str = "offline"
    """W&B mode: ``offline`` (default; ``wandb sync`` later), ``online`` or ``disabled``."""
    project: str = "tensorcurv"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: ``tensorcurv.optim.schedules.build(opt.optimizer, name, total_steps, **kw)``."""

    name: str = "constant"
    """``constant``, ``step``, ``cosine_warmup`` or ``cosine_restarts``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of that schedule (e.g. ``warmup_steps``)."""


@dataclass
class TrainConfig:
    """Top-level fields of ``conf/train.yaml``."""

    name: str = "train"
    """Run name: the run directory is ``outputs/<name>/<overrides>``."""
    seed: int = 0
    """Seeds the model initialisation, the data split and the batch order."""
    dtype: str = "float32"
    """``float32`` or ``float64`` for model and data."""
    task: str = "auto"
    """``classify`` (cross-entropy), ``autoencode`` (MSE to the flattened input) or ``auto``
    (autoencode for autoencoder models and datasets without classes)."""
    epochs: int = 5
    """Passes over the training set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (None: ``epochs`` full passes)."""
    batch_size: int = 128
    """Mini-batch size (the last incomplete batch of an epoch is dropped)."""
    eval_every: int = 1
    """Evaluate train/val/test loss and accuracy every k epochs (and always at the end)."""
    checkpoint_every: int = 50
    """Write ``checkpoints/last.pt`` every k steps (and at the end)."""
    resume: bool = True
    """Continue from ``checkpoints/last.pt`` when the run directory has one."""
    progress: bool = True
    """Show a tqdm progress bar (loss, step time)."""
    run_dir: str | None = None
    """Output folder; None: Hydra's run directory (or ``outputs/<name>`` outside Hydra)."""
    threads: int | None = None
    """``torch.set_num_threads`` (None: leave torch's default)."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:<i>`` or ``auto`` (cuda when available): where model, data and curvature live."""


def resolve_device(name: str) -> "torch.device":
    """Map the ``device`` field to a :class:`torch.device`; a clear error when CUDA is asked for but absent."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(name)):
        raise ConfigError(f"device={name!r}: expected one of cpu, cuda, cuda:<index>, auto")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but torch.cuda.is_available() is False (torch {torch.__version__}); "
                              f"use device=cpu or device=auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def _check_fields(group: str, cls: type, values: Mapping[str, Any]) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"{group}: unknown key(s) {unknown}; valid keys: {valid}")


def _choice(key: str, value: Any, valid, what: str = "") -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not {what or 'a valid choice'}; valid: {', '.join(map(str, valid))}")


def _int_at_least(key: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ConfigError(f"{key}={value!r} must be an integer >= {low}" + (" or null" if allow_none else ""))


def _plain(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


@dataclass
class Validated:
    """The validated pieces of a training config, ready for :func:`tensorcurv.experiment.run_training`."""

    train: TrainConfig
    data: DataConfig
    model: dict[str, Any]
    curvature: dict[str, Any]
    optim: dict[str, Any]
    logger: LoggerConfig
    schedule: ScheduleConfig
    raw: dict[str, Any]

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``tensorcurv.optim.build(optim.name, ...)``.

        ``conf/train.yaml`` links ``optim.structure/kind/damping`` to ``curvature.name/kind/damping``
        (so either may be overridden). Second-order optimizers also get the structure's
        hyper-parameters from the ``curvature`` group; first-order ones drop the linked keys.
        """
        from tensorcurv.optim import config as optim_config

        name = self.optim["name"]
        kw = {k: v for k, v in self.optim.items() if k != "name"}
        if name in SECOND_ORDER:
            kw.setdefault("structure", self.curvature["name"])
            for key in ("kind", "damping"):
                if kw.get(key) is None and self.curvature.get(key) is not None:
                    kw[key] = self.curvature[key]
            kw.update({k: v for k, v in self.curvature.items() if k not in CURVATURE_KEYS})
        else:
            valid = optim_config.field_names(name)
            kw = {k: v for k, v in kw.items() if k in valid or k not in LINKED_KEYS}
        return kw


def _structure_names() -> list[str]:
    from tensorcurv import structures

    return structures.names()


def validate_structure(curv: Mapping[str, Any], key: str = "curvature") -> Any:
    """Check ``{name, kind, damping, **hparams}``; returns the structure's validated Hparams."""
    from tensorcurv import structures
    from tensorcurv.capture import KINDS

    if "name" not in curv:
        raise ConfigError(f"{key}.name is missing; valid: {', '.join(structures.names())}")
    _choice(f"{key}.name", curv["name"], structures.names(), "a structure")
    if curv.get("kind") is not None:
        _choice(f"{key}.kind", curv["kind"], list(KINDS), "a curvature kind")
    d = curv.get("damping")
    if d is not None and not (isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and d >= 0):
        raise ConfigError(f"{key}.damping={d!r}: damping must be a finite number >= 0")
    hp = {k: v for k, v in curv.items() if k not in CURVATURE_KEYS}
    try:
        return structures.make_hparams(curv["name"], **hp)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key} ({curv['name']}): {_one_line(e)}") from None


def validate_model(model: Mapping[str, Any]) -> None:
    from tensorcurv import models

    _choice("model.name", model.get("name"), models.names(), "a model")
    builder = models._BUILDERS[model["name"]]
    params = inspect.signature(builder).parameters
    valid = [p for p in params if p not in ("self", "input_shape", "num_outputs")]
    unknown = sorted(set(model) - {"name"} - set(valid))
    if unknown:
        raise ConfigError(f"model ({model['name']}): unknown key(s) {unknown}; valid keys: {valid}")


def validate_train(cfg: Any) -> Validated:
    """Validate a composed training config (DictConfig or dict). Raises :class:`ConfigError`."""
    from tensorcurv import data as data_mod
    from tensorcurv import optim, tracking
    from tensorcurv.optim import config as optim_config
    from tensorcurv.optim import schedules

    raw = _plain(cfg)
    raw.pop("hydra", None)
    groups = ("data", "model", "curvature", "optim", "logger", "schedule", "distributed")
    top = {k: v for k, v in raw.items() if k not in groups and k != "experiment"}
    _check_fields("train", TrainConfig, top)
    train = TrainConfig(**top)
    _choice("dtype", train.dtype, DTYPES)
    _choice("task", train.task, TASKS)
    for k in ("epochs", "batch_size", "eval_every", "checkpoint_every"):
        _int_at_least(k, getattr(train, k), 1)
    _int_at_least("max_steps", train.max_steps, 1, allow_none=True)
    _int_at_least("threads", train.threads, 1, allow_none=True)
    _int_at_least("seed", train.seed, 0)
    resolve_device(train.device)

    d = dict(raw.get("data") or {})
    _check_fields("data", DataConfig, d)
    data = DataConfig(**d)
    _choice("data.name", data.name, data_mod.names(), "a dataset")
    _choice("data.normalize", data.normalize, data_mod.NORMALIZATIONS)
    for k in ("val_fraction", "test_fraction"):
        v = getattr(data, k)
        if not (isinstance(v, (int, float)) and 0 <= v < 1):
            raise ConfigError(f"data.{k}={v!r} must be in [0, 1)")
    _int_at_least("data.limit", data.limit, 1, allow_none=True)

    model = dict(raw.get("model") or {})
    validate_model(model)

    curvature = dict(raw.get("curvature") or {})
    validate_structure(curvature)

    opt = dict(raw.get("optim") or {})
    _choice("optim.name", opt.get("name"), optim.names(), "an optimizer")
    lg = dict(raw.get("logger") or {"kind": "csv"})
    _check_fields("logger", LoggerConfig, lg)
    logger = LoggerConfig(**lg)
    _choice("logger.kind", logger.kind, tracking.KINDS, "a logger")
    _choice("logger.mode", logger.mode, tracking.WANDB_MODES, "a W&B mode")

    sc = dict(raw.get("schedule") or {})
    _check_fields("schedule", ScheduleConfig, sc)
    schedule = ScheduleConfig(**sc)
    _choice("schedule.name", schedule.name, list(schedules.NAMES), "a schedule")

    from tensorcurv.distributed.launch import make_config as distributed_config

    try:
        distributed_config(raw.get("distributed"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if opt["name"] in SECOND_ORDER and opt.get("structure", curvature["name"]) != curvature["name"]:
        raise ConfigError(f"optim.structure={opt['structure']!r} differs from curvature.name={curvature['name']!r}; "
                          f"choose the structure with curvature=<name> (valid: {', '.join(_structure_names())})")
    v = Validated(train, data, model, curvature, opt, logger, schedule, raw)
    kw = v.optimizer_kwargs()
    try:
        if opt["name"] in SECOND_ORDER:
            fields, _ = optim_config.split_structure_hparams(opt["name"], kw)
            optim_config.make_config(opt["name"], **fields)
        else:
            optim_config.make_config(opt["name"], **kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optim ({opt['name']}): {_one_line(e)}") from None
    return v


def check_blocks(model: Any, curvature: Mapping[str, Any]) -> None:
    """Construct the curvature of ``model`` once (no data): shape-dependent hyper-parameters
    (index splits that must divide the layer size, ranks bounded by the block) fail here."""
    from tensorcurv import Curvature

    hp = {k: v for k, v in curvature.items() if k not in CURVATURE_KEYS}
    kind = curvature.get("kind") or "ggn"
    try:
        Curvature(model, curvature["name"], kind, **hp)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"curvature ({curvature['name']}): {_one_line(e)}") from None
