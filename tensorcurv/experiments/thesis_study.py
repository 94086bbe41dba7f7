"""The thesis study as data: methods, datasets, protocols and tuning grids, and one training run per setting.

A *method* is an optimizer group plus a curvature group plus Hydra overrides (``conf/``); a *setting*
is one point of the method's tuning grid (learning rate, and damping λ for second-order methods).
Second-order methods are natural gradient with the MC Fisher (one sampled label per input), heavy-ball
momentum 0.9, the KL clip of ``conf/optim/natural_gradient.yaml``, statistics and inverses refreshed every
``stats_interval`` steps. Every method of a dataset gets the same tuning budget: the first
``grid_size`` of its :data:`GRID_SIZE` settings (second order: 2 learning rates × 2 dampings; first
order: 4 learning rates; a reduced grid keeps the central ones). The grid is run on seed 0, the best setting (lowest
final training loss, diverged runs last) is then run on the remaining seeds.

Runs go through :func:`tensorcurv.experiments.runner.run_training` (the library's training loop:
evaluation excluded from ``wall_time``, per-step ``step_time``); :func:`run_setting` returns one
result row and the run's evaluation rows (loss against epoch and training wall-clock).

Adding a method is one entry of :data:`METHODS` (``Method(optim, curvature, overrides)``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorcurv.experiments.config import SECOND_ORDER


@dataclass(frozen=True)
class Method:
    """One optimizer configuration: ``optim`` / ``curvature`` group names and extra Hydra overrides."""

    optim: str
    curvature: str | None = None
    overrides: tuple[str, ...] = ()
    label: str = ""

    @property
    def second_order(self) -> bool:
        return self.optim in SECOND_ORDER


#: Every method of the study. Second-order methods are natural gradient (MC Fisher) with a structure.
METHODS: dict[str, Method] = {
    "kfac": Method("natural_gradient", "kfac", label="K-FAC"),
    "kpsvd": Method("natural_gradient", "kpsvd", label="KPSVD (kron_sum rank 1)"),
    "kron_sum2": Method(
        "natural_gradient",
        "kron_sum",
        ("curvature.rank=2", "curvature.psd=factors", "curvature.damping_kind=pi"),
        "kron_sum rank 2 (PSD factors)",
    ),
    "two_level_nicolaides": Method(
        "natural_gradient", "two_level", ("curvature.coarse_space=nicolaides",), "two-level K-FAC, Nicolaides"
    ),
    "two_level_spectral": Method(
        "natural_gradient", "two_level", ("curvature.coarse_space=spectral",), "two-level K-FAC, spectral"
    ),
    "deflation": Method("natural_gradient", "deflation", label="Deflation (rank 2)"),
    "lanczos": Method("natural_gradient", "lanczos", label="Lanczos (rank 2)"),
    "kfac_corrected": Method("natural_gradient", "kfac_corrected", label="K-FAC-corrected"),
    "two_level_residual": Method("natural_gradient", "two_level_residual", label="two-level K-FAC, residual"),
    "two_level_krylov_residual": Method(
        "natural_gradient", "two_level_krylov_residual", label="two-level K-FAC, KRY-RESIDU"
    ),
    "kfac_refine10": Method(
        "natural_gradient",
        "kfac",
        ("optim.refine=10", "optim.refine_operator=func"),
        "K-FAC + 10 PCG steps (refined NG)",
    ),
    "sgd": Method("momentum", label="SGD momentum 0.9"),
    "adam": Method("adam", label="Adam"),
    "adamw": Method("adamw", label="AdamW"),
    "muon": Method("muon", label="Muon (+AdamW)"),
    "soap": Method("soap", label="SOAP"),
    "shampoo": Method("shampoo", label="Shampoo"),
    "psgd_kron": Method("psgd_kron", label="PSGD-Kron"),
}
#: The first-order methods whose best final loss is the target (#15: AdamW, Muon, SOAP, Shampoo, PSGD-Kron).
MODERN_FIRST_ORDER = ("adamw", "muon", "soap", "shampoo", "psgd_kron")

#: First-order methods with a preconditioner refresh interval, set to the protocol's statistics interval.
REFRESH_KEYS = {"shampoo": "update_interval", "soap": "precondition_frequency"}

#: Same tuning budget for every method: this many grid settings (lr, or lr × damping).
GRID_SIZE = 4
FIRST_ORDER_LRS: dict[str, tuple[float, ...]] = {
    "momentum": (0.01, 0.03, 0.1, 0.3),
    "muon": (0.005, 0.01, 0.02, 0.05),
}
DEFAULT_FIRST_ORDER_LRS = (3e-4, 1e-3, 3e-3, 1e-2)  # adam, adamw, soap, shampoo, psgd_kron
SECOND_ORDER_LRS, SECOND_ORDER_DAMPINGS = (0.1, 0.3), (1e-3, 1e-2)


@dataclass(frozen=True)
class Dataset:
    """A problem of the study: Hydra overrides of ``conf/train.yaml`` and the layer of the curvature errors."""

    overrides: tuple[str, ...]
    error_layer: int  # index among the model's Linear layers
    label: str


#: The datasets of a default study (``curves_relu_code``: the thesis code's activation on the code too, opt-in).
DEFAULT_DATASETS = ("curves", "digits", "mnist1d")
CURVES = ("data=curves_synthetic", "model=thesis_curves", "task=autoencode", "loss=bce_with_logits")
DATASETS: dict[str, Dataset] = {
    "curves": Dataset(
        CURVES + ("model.code_activation=null",),
        3,
        "CURVES-like autoencoder 784-400-200-100-50-25-6 (mirrored), ReLU, linear code, BCE",
    ),
    "curves_relu_code": Dataset(
        CURVES,
        3,
        "CURVES-like autoencoder 784-400-200-100-50-25-6 (mirrored), ReLU also on the code (thesis code), BCE",
    ),
    "digits": Dataset(("data=digits", "model=mlp"), 1, "digits MLP 64-64-64-10 (tanh), cross-entropy"),
    "mnist1d": Dataset(
        ("data=mnist1d", "model=mlp", "model.hidden_sizes=[100,100]", "model.activation=relu"),
        1,
        "MNIST-1D MLP 40-100-100-10 (ReLU), cross-entropy",
    ),
}


@dataclass(frozen=True)
class Protocol:
    """Budget of one study: epochs, batch size, samples kept per split (None: all), seeds, statistics interval."""

    name: str
    epochs: dict[str, int]
    batch_size: int
    limit: dict[str, int | None]
    grid_size: dict[str, int]
    seeds: int = 3
    stats_interval: int = 10
    device: str = "cpu"
    extra: tuple[str, ...] = field(default_factory=tuple)


PROTOCOLS: dict[str, Protocol] = {
    "quick": Protocol(
        "quick", dict.fromkeys(DATASETS, 1), 32, dict.fromkeys(DATASETS, 64), dict.fromkeys(DATASETS, 1), 2, 1
    ),
    "cpu": Protocol(
        "cpu",
        {"curves": 6, "curves_relu_code": 6, "digits": 10, "mnist1d": 6},
        100,
        {"curves": 1000, "curves_relu_code": 1000, "digits": None, "mnist1d": 2000},
        {"curves": 2, "curves_relu_code": 2, "digits": 4, "mnist1d": 2},
        stats_interval=20,
    ),
    "full": Protocol(
        "full", dict.fromkeys(DATASETS, 200), 256, dict.fromkeys(DATASETS), dict.fromkeys(DATASETS, 4), 3, 100
    ),
}


def check_choices(kind: str, given: Sequence[str], valid: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` (one line naming the key and the valid values) for an unknown name."""
    bad = [g for g in given if g not in valid]
    if bad:
        raise ValueError(f"unknown {kind} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")


def grid(method: Method, size: int = GRID_SIZE) -> list[dict[str, float]]:
    """The method's tuning grid (the first ``size`` settings): ``{"lr": ..}`` or ``{"lr": .., "damping": ..}``."""
    if method.second_order:
        pts = [{"lr": lr, "damping": lam} for lr in SECOND_ORDER_LRS for lam in SECOND_ORDER_DAMPINGS]
    else:
        pts = [{"lr": lr} for lr in FIRST_ORDER_LRS.get(method.optim, DEFAULT_FIRST_ORDER_LRS)]
    if size >= len(pts):
        return pts
    mid = (len(pts) - size) // 2  # a reduced grid keeps the central settings
    return pts[mid : mid + size]


def setting_key(setting: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in sorted(setting.items()))


def overrides(
    dataset: str, method: Method, setting: Mapping[str, float], seed: int, proto: Protocol, data_dir: Path
) -> list[str]:
    """Hydra overrides of ``conf/train.yaml`` for one run."""
    ds = DATASETS[dataset]
    out = [*ds.overrides, f"optim={method.optim}", f"seed={seed}", f"epochs={proto.epochs[dataset]}"]
    out += [f"batch_size={proto.batch_size}", f"data.data_dir={data_dir}", f"device={proto.device}"]
    out += ["progress=false", "logger=csv", "resume=false", "checkpoint_every=1000000000", "eval_every=1"]
    if proto.limit[dataset] is not None:
        out.append(f"data.limit={proto.limit[dataset]}")
    out.append(f"optim.lr={setting['lr']}")
    if method.optim in REFRESH_KEYS:  # preconditioner refresh interval of the first-order methods that have one
        out.append(f"optim.{REFRESH_KEYS[method.optim]}={proto.stats_interval}")
    if method.second_order:
        k = proto.stats_interval
        out += [f"curvature={method.curvature}", "curvature.kind=mc", f"curvature.damping={setting['damping']}"]
        out += [f"optim.stats_interval={k}", f"optim.inverse_interval={k}", "optim.momentum=0.9"]
    return out + list(method.overrides) + list(proto.extra)


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def run_setting(
    compose: Callable[[list[str]], Any], run_dir: Path, key: Mapping[str, Any], ovr: list[str], callback: Any = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one run; returns its result row (``key`` + final losses, wall-clock, time per step, status)
    and its evaluation rows (epoch, step, wall_time, train/test loss). A diverged run is a row too."""
    from tensorcurv.experiments.runner import RunFailed, run_training

    cfg = compose(ovr)
    if callback is not None:
        callback.ckpt = run_dir / "checkpoints" / "last.pt"
    try:
        summary, status = run_training(cfg, run_dir=run_dir, callbacks=[callback] if callback else ()), "ok"
    except RunFailed as e:
        summary, status = json.loads((run_dir / "summary.json").read_text()), "diverged: " + str(e).split(";")[0]
    except (RuntimeError, ArithmeticError, ValueError) as e:  # a numerical failure of one method ends its run only
        summary, status = {}, f"error: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    if callback is not None:
        callback.collect()  # the final checkpoint
    evals = _eval_rows(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
    row = {
        **key,
        "status": status,
        "train_loss": _float(summary.get("train_loss")),
        "test_loss": _float(summary.get("test_loss")),
        "test_acc": _float(summary.get("test_acc")),
        "wall_time": _float(summary.get("wall_time")),
        "time_per_step": _float(summary.get("time_per_step")),
        "steps": int(summary.get("steps") or 0),
    }
    if status != "ok" or not math.isfinite(row["train_loss"]):
        row["train_loss"] = math.inf  # ranks last in the grid
    return row, [{**key, **e} for e in evals]


def _eval_rows(path: Path) -> list[dict[str, Any]]:
    import csv

    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss") not in (None, "")]
    keys = ("step", "epoch", "wall_time", "train_loss", "test_loss")
    return [{k: _float(r.get(k)) for k in keys} for r in rows]


def best_setting(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The setting (``setting`` column) of the lowest final training loss among seed-0 rows; None if all diverged."""
    ok = [r for r in rows if math.isfinite(_float(r["train_loss"]))]
    return min(ok, key=lambda r: _float(r["train_loss"]))["setting"] if ok else None
