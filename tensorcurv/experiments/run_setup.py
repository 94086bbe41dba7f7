"""What a training run is built from: its device, run directory and checkpoint to resume, the data
splits and task, and the model; each failure of a config value is one :class:`ConfigError` line,
raised before training starts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tensorcurv.experiments import data as data_mod
from tensorcurv.experiments import models as models
from tensorcurv.experiments.config import CURVATURE_KEYS, ConfigError, Validated, resolve_device, validate_train
from tensorcurv.experiments.run_records import config_differences, config_fingerprint, effective_settings
from tensorcurv.experiments.schema import one_line


def hydra_run_dir() -> str | None:
    """The output directory of the running Hydra job, or None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return HydraConfig.get().runtime.output_dir
    except Exception:  # pragma: no cover - hydra missing or not running
        pass
    return None


def run_device(name: str) -> torch.device:
    """The configured device; under torchrun a bare ``cuda`` is the rank's own GPU (``LOCAL_RANK``). A CUDA
    device is made the current one."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def resume_state(ckpt: Path, resume: bool, device: torch.device, v: Validated) -> tuple[Any, str]:
    """The checkpoint to continue (``None``: a fresh run) and the config's fingerprint.

    A checkpoint is continued when its run does the same thing, i.e. has the same
    :func:`~tensorcurv.experiments.run_records.effective_settings` (so a key added to the schema later,
    spelled out at its default, does not block the resumption of an older run). Otherwise it is refused
    with the differing keys, before the run writes anything."""
    state = torch.load(ckpt, weights_only=False, map_location=device) if (resume and ckpt.exists()) else None
    effective = effective_settings(v)
    fingerprint = config_fingerprint(effective)
    if state is None or state.get("fingerprint", fingerprint) == fingerprint:
        return state, fingerprint
    old = _checkpoint_settings(state, ckpt.parent.parent / "config.yaml")
    differences = config_differences(old, effective) if old is not None else ["(the checkpoint's config is unknown)"]
    if differences:
        raise ConfigError(
            f"{ckpt} belongs to a run with a different config: {'; '.join(differences[:4])}"
            f"{' …' if len(differences) > 4 else ''}; pass resume=false to start afresh or choose another run directory"
        )
    return state, fingerprint


def _checkpoint_settings(state: Mapping[str, Any], config_file: Path) -> dict[str, Any] | None:
    """The effective settings of the run that wrote ``state``: from its saved config (the checkpoint's
    ``config``, else the run directory's ``config.yaml``), validated by the current schema; None if that
    config is missing or no longer valid."""
    raw = state.get("config")
    if raw is None and config_file.exists():
        import yaml

        raw = yaml.safe_load(config_file.read_text())
    if not isinstance(raw, dict):
        return None
    try:
        return effective_settings(validate_train(raw))
    except ConfigError:
        return None


def load_splits(v: Validated, dtype: torch.dtype) -> data_mod.DataSplits:
    """The configured dataset's seeded train / val / test splits (on the CPU)."""
    d, t = v.data, v.train
    try:
        return data_mod.load(
            d.name,
            data_dir=d.data_dir,
            val_fraction=d.val_fraction,
            test_fraction=d.test_fraction,
            normalize=d.normalize,
            seed=t.seed,
            dtype=dtype,
            download=d.download,
            limit=d.limit,
        )
    except (OSError, ValueError, ImportError) as e:  # missing files offline, a corrupt file, mnist1d not installed
        raise ConfigError(f"data ({d.name}): {one_line(e)}") from None


def resolve_task(v: Validated, num_classes: int | None) -> str:
    """``classify`` or ``autoencode`` (``auto``: autoencode an autoencoder model or unlabelled data)."""
    task = v.train.task
    if task == "auto":
        task = "autoencode" if (v.model["name"] in models.AUTOENCODERS or num_classes is None) else "classify"
    if task == "classify" and num_classes is None:
        raise ConfigError(f"task=classify needs labels, but dataset {v.data.name!r} has none; use task=autoencode")
    if task == "classify" and v.model["name"] in models.AUTOENCODERS:
        raise ConfigError(f"model {v.model['name']!r} is an autoencoder; use task=autoencode")
    if task == "classify" and v.train.loss != "mse":
        raise ConfigError(
            f"loss={v.train.loss} is an autoencoder loss; classification trains with cross-entropy "
            "(leave loss=mse, or use task=autoencode)"
        )
    return task


def check_unit_targets(targets: Mapping[str, Tensor], loss: str) -> None:
    """``bce_with_logits`` reconstructs Bernoulli means: every split's targets must lie in [0, 1]."""
    if loss != "bce_with_logits":
        return
    for split, Y in targets.items():
        if len(Y) and not bool(((Y >= 0) & (Y <= 1)).all()):
            lo, hi = float(Y.min()), float(Y.max())
            raise ConfigError(
                f"loss=bce_with_logits needs inputs in [0, 1], but the {split} split spans [{lo:.4g}, {hi:.4g}]; "
                "use data.normalize=unit"
            )


def build_model(
    v: Validated, splits: data_mod.DataSplits, task: str, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """The configured model for the splits' input shape (and classes), on ``device`` in ``dtype``."""
    mkw = {k: val for k, val in v.model.items() if k != "name"}
    try:  # the input shape is known only now (e.g. a cnn on non-image data)
        classes = splits.num_classes if task == "classify" else None
        return models.build(v.model["name"], splits.input_shape, classes, **mkw).to(device=device, dtype=dtype)
    except ValueError as e:
        raise ConfigError(f"model ({v.model['name']}) on {v.data.name}: {one_line(e)}") from None


def check_blocks(model: Any, curvature: Mapping[str, Any]) -> None:
    """Construct the curvature of ``model`` once (no data): shape-dependent hyper-parameters
    (index splits that must divide the layer size, ranks bounded by the block) fail here."""
    from tensorcurv import Curvature

    hp = {k: v for k, v in curvature.items() if k not in CURVATURE_KEYS}
    kind = curvature.get("kind") or "ggn"
    try:
        Curvature(model, curvature["name"], kind, **hp)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"curvature ({curvature['name']}): {one_line(e)}") from None
