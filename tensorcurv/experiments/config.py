"""The config of the ``train`` command line, the groups the three command lines share, and their validation.

``conf/<primary>.yaml`` composes groups (``data``, ``model``, ``curvature``, ``optim``, ``logger``,
...) plus top-level fields. Each validator (:func:`validate_train` here,
:func:`~tensorcurv.experiments.study_config.validate_study`,
:func:`~tensorcurv.experiments.unlearn_config.validate_unlearn`) checks the whole composed config *before
any work starts* against its schemas (:mod:`tensorcurv.experiments.schema`: every key's type, range and
allowed values, taken from the live registries of datasets, models, activations, structures, optimizers,
scenarios...; unknown keys refused with the closest valid key) and raises :class:`ConfigError`
(a ``ValueError``) with one line::

    curvature.name='kfca' is not a structure (did you mean 'kfac'?); valid: dense, diagonal, ekfac, ...
    unknown key 'lissa_dept'; did you mean 'lissa_depth'? valid keys: name, scenario, fraction, ...
    model.hidden_sizes=[-4]: -4 is not allowed; expected a list of integers >= 1
    resume='no' must be true or false

The structure's own hyper-parameters are validated by its ``Hparams`` dataclass
(``tensorcurv.structures.make_hparams``), the optimizer's by ``tensorcurv.optim.config``; training
then constructs every covered layer's block once on the (cheap) model (:func:`check_blocks`), so
constraints that need the layer size — an index split that does not divide it, a rank above the
block's — fail before the first step too. :mod:`tensorcurv.experiments.cli` runs the validator as a Hydra
callback, before Hydra creates the run directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from tensorcurv.experiments.schema import ConfigError, check, check_keys, check_value, one_line, signature_schema, spec

if TYPE_CHECKING:
    import torch

__all__ = [
    "ConfigError",
    "DataConfig",
    "LoggerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "Validated",
    "kind_names",
    "plain_config",
    "resolve_device",
    "validate_model",
    "validate_structure",
    "validate_train",
]

DTYPES = ("float32", "float64")
TASKS = ("auto", "classify", "autoencode")
AUTOENCODER_LOSSES = ("mse", "bce_with_logits")
#: curvature-group keys that are not structure hyper-parameters
CURVATURE_KEYS = ("name", "kind", "damping")
#: keys that may change between a run and its resumption
RESUME_FREE = ("resume", "progress", "logger", "threads", "run_dir")
SECOND_ORDER = ("natural_gradient", "gauss_newton")
#: optim keys that conf/train.yaml links to the curvature group
LINKED_KEYS = ("structure", "kind", "damping")
#: the torchrun environment a data-parallel run needs
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------ live registries (imported lazily)
def _datasets() -> list[str]:
    from tensorcurv.experiments import data as data

    return data.names()


def _normalizations() -> list[str]:
    from tensorcurv.experiments import data as data

    return data.Normalization.values()


def _loggers() -> list[str]:
    from tensorcurv.experiments import tracking as tracking

    return tracking.LoggerKind.values()


def _wandb_modes() -> list[str]:
    from tensorcurv.experiments import tracking as tracking

    return tracking.WandbMode.values()


def _schedules() -> list[str]:
    from tensorcurv.optim import schedules

    return schedules.Schedule.values()


def kind_names() -> list[str]:
    from tensorcurv.core.capture import CurvatureKind

    return CurvatureKind.values()


def _structure_names() -> list[str]:
    from tensorcurv import structures

    return structures.names()


# ------------------------------------------------------------------ shared groups
@dataclass
class DataConfig:
    """``conf/data/<name>.yaml``: the arguments of :func:`tensorcurv.experiments.data.load`."""

    name: str = spec("digits", choices=_datasets, what="a dataset")
    """Dataset: one of ``tensorcurv.experiments.data.names()``."""
    data_dir: str = spec("data")
    """Folder with the dataset files (relative to the working directory)."""
    val_fraction: float = spec(0.1, ge=0, lt=1)
    """Fraction of the training pool held out for validation, in [0, 1)."""
    test_fraction: float = spec(0.2, ge=0, lt=1)
    """Held-out test fraction for datasets without an official test split, in [0, 1)."""
    normalize: str = spec("standard", choices=_normalizations, what="a normalization")
    """``standard`` (per-feature z-score), ``unit`` (to [0, 1]) or ``none``; training-set statistics."""
    download: bool = spec(True)
    """Download missing standard files (MNIST, Fashion-MNIST, CIFAR-10) when online."""
    limit: int | None = spec(None, ge=1)
    """Keep at most this many samples per split (quick runs); None: all."""


@dataclass
class LoggerConfig:
    """``conf/logger/<kind>.yaml``: see :mod:`tensorcurv.experiments.tracking`."""

    kind: str = spec("csv", choices=_loggers, what="a logger")
    """``wandb``, ``csv`` or ``none``."""
    mode: str = spec("offline", choices=_wandb_modes, what="a W&B mode")
    """W&B mode: ``offline`` (default; ``wandb sync`` later), ``online`` or ``disabled``."""
    project: str = spec("tensorcurv")
    entity: str | None = spec(None)
    name: str | None = spec(None)
    group: str | None = spec(None)
    tags: list[str] = spec([])


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: ``tensorcurv.optim.schedules.build(opt.optimizer, name, total_steps, **kw)``."""

    name: str = spec("constant", choices=_schedules, what="a schedule")
    """``constant``, ``step``, ``cosine_warmup`` or ``cosine_restarts``."""
    kwargs: dict[str, Any] = spec({})
    """Keyword arguments of that schedule (e.g. ``warmup_steps``)."""


#: allowed values of model-builder parameters, by parameter name (types come from the signatures)
def _model_rules(name: str) -> dict[str, dict[str, Any]]:
    from tensorcurv.experiments import models as models

    positive = {"ge": 1}
    rules: dict[str, dict[str, Any]] = {
        "activation": {"choices": list(models.ACTIVATIONS), "what": "an activation"},
        "norm": {"choices": models.Norm.values(), "what": "a norm"},
        "preset": {"choices": list(models.AUTOENCODER_PRESETS), "what": "an autoencoder preset"},
        "hidden_sizes": positive,
        "channels": positive,
        "hidden": positive,
        "groups": positive,
        "blocks_per_stage": positive,
        "widths": {"ge": 1, "nonempty": True},
    }
    if name == "conv_autoencoder":
        rules["channels"] = {"ge": 1, "length": 2}
    return rules


def validate_model(
    model: Mapping[str, Any], key: str = "model", valid_names: list[str] | None = None, what: str = "a model"
) -> dict:
    """Check ``{name, **builder kwargs}`` against the builder's signature and the allowed values."""
    from tensorcurv.experiments import models as models

    valid_names = valid_names or models.names()
    check_value(f"{key}.name", model.get("name"), str, {"choices": valid_names, "what": what})
    schema = signature_schema(
        model["name"],
        models.builder(model["name"]),
        skip=("input_shape", "num_outputs"),
        rules=_model_rules(model["name"]),
    )
    check(key, schema, {k: v for k, v in model.items() if k != "name"})
    return dict(model)


def validate_structure(curv: Mapping[str, Any], key: str = "curvature") -> Any:
    """Check ``{name, kind, damping, **hparams}``; returns the structure's validated Hparams."""
    from tensorcurv import structures

    if "name" not in curv:
        raise ConfigError(f"{key}.name is missing; valid: {', '.join(structures.names())}")
    check_value(f"{key}.name", curv["name"], str, {"choices": structures.names(), "what": "a structure"})
    check_value(f"{key}.kind", curv.get("kind"), str | None, {"choices": kind_names(), "what": "a curvature kind"})
    d = curv.get("damping")
    check_value(f"{key}.damping", d, float | None, {"gt": 0})
    hp = {k: v for k, v in curv.items() if k not in CURVATURE_KEYS}
    try:
        return structures.make_hparams(curv["name"], **hp)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key} ({curv['name']}): {one_line(e)}") from None


def plain_config(cfg: Any) -> dict[str, Any]:
    """A composed config as plain containers, without Hydra's own ``hydra`` node."""
    try:
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover
        DictConfig = None  # type: ignore[misc, assignment]
    if DictConfig is not None and isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
        cfg.pop("hydra", None)  # Hydra's own node: its ${hydra:...} values are set when the job starts
        try:
            return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)  # type: ignore[return-value]
        except OmegaConfBaseException as e:
            raise ConfigError(f"the config does not resolve: {one_line(e)}") from None
    raw = dict(cfg)
    raw.pop("hydra", None)
    return raw


def _groups(raw: Mapping[str, Any], top: type, groups: tuple[str, ...]) -> dict[str, Any]:
    """The top-level keys of ``raw`` that are not groups; unknown ones refused against ``top``'s fields."""
    keys = {k: v for k, v in raw.items() if k not in groups and k != "experiment"}
    check_keys("", keys, [f.name for f in fields(top)] + list(groups))
    return keys


# ------------------------------------------------------------------ scripts/train.py
@dataclass
class TrainConfig:
    """Top-level fields of ``conf/train.yaml``."""

    name: str = spec("train")
    """Run name: the run directory is ``outputs/<name>/<overrides>``."""
    seed: int = spec(0, ge=0)
    """Seeds the model initialisation, the data split and the batch order."""
    dtype: str = spec("float32", choices=DTYPES, what="a dtype")
    """``float32`` or ``float64`` for model and data."""
    task: str = spec("auto", choices=TASKS, what="a task")
    """``classify`` (cross-entropy), ``autoencode`` (MSE to the flattened input) or ``auto``
    (autoencode for autoencoder models and datasets without classes)."""
    loss: str = spec("mse", choices=AUTOENCODER_LOSSES, what="an autoencoder loss")
    """Reconstruction loss of ``autoencode`` against the flattened input: ``mse`` (``nn.MSELoss``) or
    ``bce_with_logits`` (``nn.BCEWithLogitsLoss`` on the output logits; inputs must lie in [0, 1]).
    Classification always trains with cross-entropy."""
    epochs: int = spec(5, ge=1)
    """Passes over the training set."""
    max_steps: int | None = spec(None, ge=1)
    """Stop after this many optimizer steps in total (None: ``epochs`` full passes)."""
    batch_size: int = spec(128, ge=1)
    """Mini-batch size (the last incomplete batch of an epoch is dropped)."""
    eval_every: int = spec(1, ge=1)
    """Evaluate train/val/test loss and accuracy every k epochs (and always at the end)."""
    checkpoint_every: int = spec(50, ge=1)
    """Write ``checkpoints/last.pt`` every k steps (and after the first evaluation, and at the end)."""
    resume: bool = spec(True)
    """Continue from ``checkpoints/last.pt`` when the run directory has one (strictly ``true``/``false``)."""
    progress: bool = spec(True)
    """Show a tqdm progress bar (loss, step time)."""
    run_dir: str | None = spec(None)
    """Output folder; None: Hydra's run directory (or ``outputs/<name>`` outside Hydra)."""
    threads: int | None = spec(None, ge=1)
    """``torch.set_num_threads`` (None: leave torch's default)."""
    device: str = spec("cpu")
    """``cpu``, ``cuda``, ``cuda:<i>`` or ``auto`` (cuda when available): where model, data and curvature live."""
    max_skip_fraction: float = spec(0.5, ge=0, le=1)
    """The run fails (nonzero exit, ``summary.json`` still written) once more than this fraction of its
    steps were skipped by the optimizer (non-finite loss, gradient, statistics or solve); 1: never."""


TRAIN_GROUPS = ("data", "model", "curvature", "optim", "logger", "schedule", "distributed")


def resolve_device(name: str) -> torch.device:
    """Map the ``device`` field to a :class:`torch.device`; a clear error when CUDA is asked for but absent."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(name)):
        raise ConfigError(f"device={name!r}: expected one of cpu, cuda, cuda:<index>, auto")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={name!r} but torch.cuda.is_available() is False (torch {torch.__version__}); "
                f"use device=cpu or device=auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def validate_distributed(raw: Any) -> Any:
    """The ``distributed`` group as a ``DistributedConfig``; ``enabled`` needs the torchrun environment."""
    from tensorcurv.distributed.launch import DistributedConfig

    dist = check("distributed", DistributedConfig, dict(raw or {}))
    if dist.enabled:
        import torch.distributed

        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ConfigError(
                f"distributed=ddp needs the torchrun environment ({', '.join(missing)} not set); launch "
                f"it as: torchrun --nproc_per_node=<processes> scripts/train.py distributed=ddp ..."
            )
    return dist


@dataclass
class Validated:
    """The validated pieces of a training config, ready for :func:`tensorcurv.experiments.runner.run_training`."""

    train: TrainConfig
    data: DataConfig
    model: dict[str, Any]
    curvature: dict[str, Any]
    optim: dict[str, Any]
    logger: LoggerConfig
    schedule: ScheduleConfig
    raw: dict[str, Any]
    structure_hparams: Any = None
    """The curvature group's validated structure hyper-parameters (defaults filled in)."""
    optimizer_config: Any = None
    """The optimizer's validated config (defaults filled in)."""

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


def validate_train(cfg: Any) -> Validated:
    """Validate a composed ``conf/train.yaml`` (DictConfig or dict). Raises :class:`ConfigError`."""
    from tensorcurv import optim
    from tensorcurv.optim import config as optim_config
    from tensorcurv.optim import packaged

    raw = plain_config(cfg)
    train = check("", TrainConfig, _groups(raw, TrainConfig, TRAIN_GROUPS))
    resolve_device(train.device)
    data = check("data", DataConfig, dict(raw.get("data") or {}))
    model = validate_model(dict(raw.get("model") or {}))
    curvature = dict(raw.get("curvature") or {})
    structure_hparams = validate_structure(curvature)
    opt = dict(raw.get("optim") or {})
    check_value("optim.name", opt.get("name"), str, {"choices": optim.names(), "what": "an optimizer"})
    try:
        packaged.check_available(opt["name"])
    except ImportError as e:
        raise ConfigError(f"optim={opt['name']}: {one_line(e)}") from None
    logger = check("logger", LoggerConfig, dict(raw.get("logger") or {"kind": "csv"}))
    schedule = check("schedule", ScheduleConfig, dict(raw.get("schedule") or {}))
    validate_distributed(raw.get("distributed"))
    if opt["name"] in SECOND_ORDER and opt.get("structure", curvature["name"]) != curvature["name"]:
        raise ConfigError(
            f"optim.structure={opt['structure']!r} differs from curvature.name={curvature['name']!r}; "
            f"choose the structure with curvature=<name> (valid: {', '.join(_structure_names())})"
        )
    v = Validated(train, data, model, curvature, opt, logger, schedule, raw, structure_hparams)
    kw = v.optimizer_kwargs()
    try:
        if opt["name"] in SECOND_ORDER:
            fields_, struct_kw = optim_config.split_structure_hparams(opt["name"], kw)
            struct_kw.pop("exclude", None)
            v.optimizer_config = optim_config.make_second_order_config(opt["name"], fields_, struct_kw)
        else:
            v.optimizer_config = optim_config.make_config(opt["name"], **kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optim ({opt['name']}): {one_line(e)}") from None
    return v
