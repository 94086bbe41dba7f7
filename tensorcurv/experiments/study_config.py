"""The config of the ``study`` command line (``conf/study.yaml``, ``scripts/study.py``) and its validation.

Same rules as :mod:`tensorcurv.experiments.config`: every key checked before any work starts, one-line
:class:`~tensorcurv.experiments.schema.ConfigError`; :func:`check_study_data` then checks what needs the data
(the dataset has labels, the model fits it, ``spectrum_layer`` is a covered layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tensorcurv.experiments.config import (
    DTYPES,
    DataConfig,
    LoggerConfig,
    kind_names,
    plain_config,
    validate_model,
)
from tensorcurv.experiments.schema import ConfigError, check, check_keys, check_value, one_line, spec


@dataclass
class StudyTrainConfig:
    """``train`` group of ``conf/study.yaml``: Adam on the mean loss before/between the checkpoints."""

    steps: int = spec(300, ge=0)
    batch_size: int = spec(64, ge=1)
    lr: float = spec(1e-3, gt=0)


@dataclass
class StudySettings:
    """``study`` group of ``conf/study.yaml`` (see :func:`tensorcurv.study.runner.run_study`)."""

    kinds: list[str] = spec(["empirical", "mc", "ggn"], choices=kind_names, what="a curvature kind", nonempty=True)
    mc_samples: int = spec(1, ge=1)
    batch_size: int = spec(128, ge=1)
    checkpoints: list[float] = spec([0, 0.1, 0.5, 1.0], ge=0, le=1, nonempty=True)
    structures: Any = spec("all")
    """``all`` or a list of structure names (checked in :func:`validate_study`)."""
    hparams: dict[str, Any] = spec({})
    sweeps: dict[str, Any] = spec({})
    variants: list[Any] = spec([])
    """Extra variants ``{structure, hparams, label}`` (e.g. another fit target of a structure)."""
    damping_rel: list[float] = spec([1e-4, 1e-3, 1e-2, 1e-1, 1.0], gt=0, nonempty=True)
    direction_damping_rel: list[float] = spec([1e-4, 1e-3, 1e-2, 1e-1], gt=0)
    """λ/(tr C/dim) of the direction study (empty: no direction study)."""
    refine_steps: list[int] = spec([0, 5, 20], ge=0, nonempty=True)
    """Krylov refinement steps k of the direction study (0: the structure's own damped solve)."""
    floor_ranks: list[int] = spec([1, 2, 3, 4, 6, 8], ge=1)
    spectral: bool = spec(True)
    spectral_max_iter: int = spec(80, ge=1)
    spectral_tol: float = spec(1e-6, gt=0)
    spectrum_layer: str | int | None = spec(None)
    """Layer (module name) of the eigenvalue plot; None: the first covered layer."""
    spectrum_k: int = spec(60, ge=1)
    chunk: int = spec(128, ge=1)
    solve_repeats: int = spec(1, ge=1)


@dataclass
class StudyConfig:
    """``conf/study.yaml``."""

    name: str = spec("study")
    seed: int = spec(0, ge=0)
    dtype: str = spec("float64", choices=DTYPES, what="a dtype")
    threads: int | None = spec(1, ge=1)
    loss: str = spec("cross_entropy", choices=("cross_entropy",), what="a loss of the study (a classifier)")
    report_dir: str | None = spec(None)
    title: str | None = spec(None)
    render_only: bool = spec(False)
    data: DataConfig = spec(None)
    model: dict[str, Any] = spec({})
    logger: LoggerConfig = spec(None)
    train: StudyTrainConfig = spec(None)
    study: StudySettings = spec(None)


def validate_study(cfg: Any) -> dict[str, Any]:
    """Validate a composed ``conf/study.yaml``; returns it as plain containers. Raises :class:`ConfigError`."""
    from tensorcurv import structures
    from tensorcurv.experiments import models as models
    from tensorcurv.study.variants import make_variants

    raw = plain_config(cfg)
    s = check("", StudyConfig, {**raw, **{g: raw.get(g) or {} for g in ("data", "logger", "train", "study")}})
    validate_model(
        s.model,
        valid_names=[n for n in models.names() if n not in models.AUTOENCODERS],
        what="a classifier (the study trains on labels)",
    )
    names = structures.names()
    picked = s.study.structures
    if picked != "all":
        check_value("study.structures", picked, list[str], {"choices": names, "what": "a structure", "nonempty": True})
    for group in ("hparams", "sweeps"):
        entries = getattr(s.study, group)
        check_keys(f"study.{group}", entries, names)
        for name, hp in entries.items():
            check_value(f"study.{group}.{name}", hp, dict)
        if group == "sweeps":
            for name, grid in entries.items():
                for k, values in grid.items():
                    check_value(f"study.sweeps.{name}.{k}", values, list, {"nonempty": True})
    try:
        make_variants(picked, s.study.hparams, s.study.sweeps, s.study.variants)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"study.hparams/sweeps/variants: {one_line(e)}") from None
    if s.study.spectrum_layer is not None:  # layer names are module names ("1", "features.0"): keep them strings
        raw["study"]["spectrum_layer"] = str(s.study.spectrum_layer)
    return raw


def check_study_data(raw: Mapping[str, Any]) -> None:
    """What a validated study config can only show with its data: the dataset loads and has labels, the
    model fits its inputs, and ``study.spectrum_layer`` names a covered layer. Raises :class:`ConfigError`."""
    from tensorcurv import Curvature
    from tensorcurv.experiments import data as data
    from tensorcurv.experiments import models as models

    d = dict(raw["data"])
    name = d.pop("name")
    try:
        splits = data.load(name, seed=raw["seed"], **d)
    except (OSError, ValueError, ImportError) as e:  # missing files offline, a corrupt file, mnist1d not installed
        raise ConfigError(f"data ({name}): {one_line(e)}") from None
    if splits.num_classes is None:
        raise ConfigError(
            f"data.name={name!r} has no labels, and the study trains a classifier; choose a labelled dataset"
        )
    m = dict(raw["model"])
    try:
        model = models.build(m.pop("name"), splits.input_shape, splits.num_classes, **m)
    except ValueError as e:
        raise ConfigError(f"model ({raw['model']['name']}) on {name}: {one_line(e)}") from None
    layer = raw["study"].get("spectrum_layer")
    if layer is not None:
        layers = list(Curvature(model, "diagonal", "ggn").adapters)
        check_value("study.spectrum_layer", str(layer), str, {"choices": layers, "what": "a covered layer"})
