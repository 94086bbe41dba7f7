"""Curvature errors along a training run: model snapshots taken from the run's checkpoints, then the
thesis's Error 1 and Error 2 (:func:`tensorcurv.study.layer_errors.layer_errors`) at each snapshot.

The runner checkpoints every ``checkpoint_every`` steps (``checkpoints/last.pt``, written after the
step's callbacks); :class:`SnapshotCallback` copies the model state whenever that file changes, so a
run yields the states at steps ``0, k, 2k, …`` and its last step (:meth:`SnapshotCallback.collect`
after the run). Reading a checkpoint happens inside the timed loop, a few times per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: Samples of the fixed batch on which the exact block and the structure are compared.
PROBE_SAMPLES = 128
#: Snapshots per run (besides step 0).
SNAPSHOTS = 3


class SnapshotCallback:
    """``cb(step, metrics)`` for :func:`~tensorcurv.experiments.runner.run_training`: keeps the model state
    of every new checkpoint in ``snapshots`` (step → state dict). Set ``ckpt`` (the run's
    ``checkpoints/last.pt``) before the run; pass :attr:`override` to the run's config."""

    def __init__(self, total_steps: int, snapshots: int = SNAPSHOTS) -> None:
        self.override = f"checkpoint_every={max(1, total_steps // snapshots)}"
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.ckpt: Path | None = None
        self._seen = -1

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        self.collect()

    def collect(self) -> None:
        """Copy the model state of ``ckpt`` if it changed since the last look."""
        if self.ckpt is None or not self.ckpt.exists():
            return
        stamp = self.ckpt.stat().st_mtime_ns
        if stamp == self._seen:
            return
        self._seen = stamp
        state = torch.load(self.ckpt, weights_only=False, map_location="cpu")
        self.snapshots[int(state["step"])] = state["model"]


def snapshot_callback(total_steps: int) -> SnapshotCallback:
    return SnapshotCallback(total_steps)


def trajectory_errors(cfg: Any, snapshots: dict[int, dict[str, torch.Tensor]], layer: int) -> list[dict[str, Any]]:
    """Error 1 / Error 2 of the configured structure (``cfg``: a composed ``conf/train.yaml`` of a
    second-order run) on its ``layer``-th covered layer, at every snapshot, in float64 on the first
    :data:`PROBE_SAMPLES` training samples, with the run's curvature kind."""
    from tensorcurv.experiments.config import CURVATURE_KEYS, validate_train
    from tensorcurv.experiments.run_setup import build_model, load_splits, resolve_task
    from tensorcurv.study.layer_errors import layer_errors

    v = validate_train(cfg)
    splits = load_splits(v, torch.float64)
    task = resolve_task(v, splits.num_classes)
    model = build_model(v, splits, task, torch.device("cpu"), torch.float64)
    X, y = (t[:PROBE_SAMPLES] for t in splits.train)
    Y = y if task == "classify" else X.flatten(1)
    loss = "cross_entropy" if task == "classify" else v.train.loss
    hp = {k: val for k, val in v.curvature.items() if k not in CURVATURE_KEYS}
    kind = v.optimizer_kwargs().get("kind", "mc")
    rows = []
    for step, state in sorted(snapshots.items()):
        model.load_state_dict(state)
        r = layer_errors(model, X, Y, loss, v.curvature["name"], hp, layer, kind=kind, seed=step)
        rows.append({"step": step, "structure": v.curvature["name"], "kind": kind, **r})
    return rows
