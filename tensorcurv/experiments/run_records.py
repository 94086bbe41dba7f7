"""What a training run records and restores: evaluation metrics, the summary, the loss figure, the
checkpoint file with the random generators' states, the batch order, and the config's fingerprint."""

from __future__ import annotations

import inspect
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tensorcurv.experiments import models as models
from tensorcurv.experiments.config import CURVATURE_KEYS, RESUME_FREE, SECOND_ORDER, Validated


@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, Y: Tensor, loss: str, chunk: int = 2048) -> dict[str, float]:
    """Mean loss (and accuracy for ``cross_entropy``) of ``model`` on ``(X, Y)``, as the training loss
    reduces it: ``cross_entropy`` per sample, ``mse`` / ``bce_with_logits`` per output element."""
    if len(X) == 0:
        return {}
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(X), chunk):
        out = model(X[i : i + chunk])
        y = Y[i : i + chunk]
        if loss == "cross_entropy":
            total += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        elif loss == "bce_with_logits":
            total += float(nn.functional.binary_cross_entropy_with_logits(out, y, reduction="sum")) / y[0].numel()
        else:
            total += float(nn.functional.mse_loss(out, y, reduction="sum")) / y[0].numel()
    model.train(was_training)
    res = {"loss": total / len(X)}
    if loss == "cross_entropy":
        res["acc"] = correct / len(X)
    return res


def rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"].cpu())
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def loss_figure(rows: Sequence[dict[str, Any]], title: str = ""):
    """Training loss per step and evaluation losses per epoch (a matplotlib Figure in the report style of
    :mod:`tensorcurv.plotting`, drawn off-screen); the evaluation curves differ in colour, marker and
    line style, so a test curve on top of a train curve stays visible."""
    from tensorcurv import plotting

    keys = ("train_loss", "val_loss", "test_loss")
    styles = plotting.series_styles(keys)
    with plotting.style():
        fig, axes = plotting.subplots(1, 1, figsize=(6.4, 4))
        ax = axes[0][0]
        tr = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step_time" in r]
        if tr:
            ax.plot(*zip(*tr), lw=0.8, alpha=0.5, color="grey", label="train (mini-batch)")
        for k, (key, st) in enumerate(styles.items()):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), ms=4, label=key.replace("_", " "), **{**st, "linestyle": ("-", "--", ":")[k]})
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        plotting.legend_outside(fig, [ax])
    return fig


def skip_reason(info: dict[str, Any]) -> str:
    if "reason" in info:
        return str(info["reason"])
    return f"non-finite loss or gradient (loss={info.get('loss', float('nan')):.4g})"


def run_summary(
    v: Validated,
    rows: Sequence[dict[str, Any]],
    *,
    device: torch.device,
    task: str,
    loss: str,
    step: int,
    spe: int,
    bs: int,
    model: nn.Module,
    elapsed: float,
    skipped: int,
    failure: str | None,
    rdir: Path,
) -> dict[str, Any]:
    """``summary.json``: the run's identity, its final evaluation, timings and skipped steps."""
    t = v.train
    step_times = [r["step_time"] for r in rows if "step_time" in r]
    final = next(r for r in reversed(rows) if "train_loss" in r)
    return {
        "name": t.name,
        "dataset": v.data.name,
        "model": v.model["name"],
        "optimizer": v.optim["name"],
        "structure": v.curvature["name"] if v.optim["name"] in SECOND_ORDER else None,
        "task": task,
        "loss_fn": loss,
        "seed": t.seed,
        "dtype": t.dtype,
        "device": str(device),
        "steps": step,
        "epochs": step / spe,
        "batch_size": bs,
        "num_params": sum(p.numel() for p in model.parameters()),
        **{k: val for k, val in final.items() if k not in ("step", "epoch", "wall_time")},
        "wall_time": elapsed,
        "time_per_step": float(np.mean(step_times)) if step_times else None,
        "skipped_steps": skipped,
        "status": "ok" if failure is None else f"failed: {failure}",
        "run_dir": str(rdir),
    }


def effective_settings(v: Validated) -> dict[str, Any]:
    """What the run does, with every default filled in: the validated train, data, model, curvature,
    optimizer, schedule and distributed settings, without the keys a resumed run may change
    (:data:`~tensorcurv.experiments.config.RESUME_FREE`). Two configs that differ only by keys spelled
    out at their defaults (for example a key added to the schema after a checkpoint was written) have
    the same settings."""

    def plain(x: Any) -> Any:
        return asdict(x) if is_dataclass(x) and not isinstance(x, type) else x

    train = {k: val for k, val in asdict(v.train).items() if k not in RESUME_FREE}
    model = dict(v.model)
    for name, par in inspect.signature(models.builder(model["name"])).parameters.items():
        if par.default is not inspect.Parameter.empty and name not in ("input_shape", "num_outputs"):
            model.setdefault(name, par.default)
    curvature = {k: v.curvature[k] for k in CURVATURE_KEYS if k in v.curvature}
    return {
        "train": train,
        "data": asdict(v.data),
        "model": model,
        "curvature": {**curvature, **(plain(v.structure_hparams) or {})},
        "optim": {"name": v.optim["name"], **(plain(v.optimizer_config) or {})},
        "schedule": asdict(v.schedule),
        "distributed": v.raw.get("distributed"),
    }


def config_fingerprint(effective: dict[str, Any]) -> str:
    """SHA-256 of a run's :func:`effective_settings` (what the run does, defaults filled in)."""
    import hashlib

    return hashlib.sha256(json.dumps(effective, sort_keys=True, default=str).encode()).hexdigest()


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested settings dicts, as ``key (old → new)``."""
    out: list[str] = []
    for k in sorted(set(old) | set(new), key=str):
        a, b, key = old.get(k), new.get(k), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, key + ".")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{key} ({a!r} → {b!r})")
    return out


def config_yaml(raw: dict[str, Any]) -> str:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.create(raw))
    except ImportError:  # pragma: no cover
        return json.dumps(raw, indent=2)
