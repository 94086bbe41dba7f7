"""Training runs from a composed config: ``run_training(cfg) -> summary``.

One run = data (``tensorcurv.experiments.data.load``) + model (``tensorcurv.experiments.models.build``) + optimizer
(``tensorcurv.optim.build``; second-order ones take the structure, kind, damping and structure
hyper-parameters of the ``curvature`` group) + LR schedule, trained for ``epochs`` passes of
mini-batches (seeded permutation per epoch, last incomplete batch dropped). Loss: cross-entropy
for classification; for autoencoding, against the flattened input, ``nn.MSELoss`` or (``loss=bce_with_logits``,
inputs in [0, 1]) ``nn.BCEWithLogitsLoss`` on the output logits, both the mean over all outputs.

The run directory receives

* ``config.yaml``: the composed, resolved config;
* ``metrics.csv`` / ``metrics.jsonl``: one row per step (``loss``, ``step_time``, ``lr``, ``skipped``,
  and for second-order optimizers ``damping``, ``curvature_fit_time``, ``solve_time``) and one row per
  evaluation (``train_loss``, ``train_acc``, ``val_*``, ``test_*``, ``epoch``, ``wall_time``: training
  seconds so far, evaluation excluded);
* ``checkpoints/last.pt`` after the first evaluation, every ``checkpoint_every`` steps and at the end:
  model, optimizer (its state includes the curvature), LR scheduler, torch/numpy/python RNG states,
  step, elapsed time, skipped steps, the logger's rows and the W&B run id. With ``resume=true`` a
  restarted run loads it, recomputes the epoch's batch permutation (a function of ``seed`` and the
  epoch only) and continues the same record and the same W&B run; the final metrics equal those of
  an uninterrupted run;
* ``figures/loss_curve.png`` and ``summary.json`` (final metrics, wall-clock, time per step,
  ``skipped_steps``, ``status``).

A step the optimizer skips (non-finite loss, gradient, statistics or solve) is reported on stderr
outside the progress bar, with the running count. A run that skips more than ``max_skip_fraction``
of its steps, or diverges, stops: its summary is written and :class:`RunFailed` is raised.
"""

from __future__ import annotations

import functools
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tensorcurv import optim
from tensorcurv.distributed import launch
from tensorcurv.experiments import tracking as tracking
from tensorcurv.experiments.config import SECOND_ORDER, ConfigError, Validated, validate_train
from tensorcurv.experiments.run_records import (
    config_yaml,
    epoch_permutation,
    evaluate,
    loss_figure,
    rng_state,
    run_summary,
    save_checkpoint,
    set_rng_state,
    skip_reason,
)
from tensorcurv.experiments.run_setup import (
    build_model,
    check_blocks,
    check_unit_targets,
    hydra_run_dir,
    load_splits,
    resolve_task,
    resume_state,
    run_device,
)
from tensorcurv.experiments.schema import one_line


class RunFailed(RuntimeError):
    """A run that started and failed (diverged, or skipped more than ``max_skip_fraction`` of its
    steps); its ``summary.json`` is written, with ``status`` and ``skipped_steps``."""


Callback = Callable[[int, dict[str, Any]], None]


def _restores_process_state(run: Callable[..., Any]) -> Callable[..., Any]:
    """A run applies the config's ``threads`` and seeds the torch/numpy/python generators (its explicit
    settings); the caller gets its own thread count and generator states back afterwards, also on error."""

    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads, py_state, np_state = torch.get_num_threads(), random.getstate(), np.random.get_state()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=cuda):
                return run(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            random.setstate(py_state)
            np.random.set_state(np_state)

    return wrapper


@_restores_process_state
def run_training(
    cfg: Any, *, callbacks: Sequence[Callback] = (), run_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Train as configured by ``cfg`` (a composed ``conf/train.yaml``, DictConfig or dict).

    ``callbacks``: called as ``cb(step, metrics)`` after every step (tests use one to interrupt a
    run). Returns the summary that is also written to ``summary.json``. The config's ``threads`` and
    ``seed`` hold for the run only: the caller's thread count and RNG states are restored on return.
    """
    v = validate_train(cfg)  # one-line ConfigError before any work
    return _TrainingRun(v, run_dir).train(callbacks)


class _TrainingRun:
    """One training run, in named steps: setup (device, distributed session, checkpoint, data, model,
    optimizer, schedule), logging, resume, the step loop, evaluation, checkpoints and the summary."""

    def __init__(self, v: Validated, run_dir: str | os.PathLike | None) -> None:
        self.v, self.t = v, v.train
        self._setup(run_dir)
        self._load_data()
        self._build_model_and_optimizer()
        self._open_logging()
        self._resume()

    # ------------------------------------------------------------------ setup
    def _setup(self, run_dir: str | os.PathLike | None) -> None:
        """Device, distributed session, run directory, the checkpoint to resume (checked against the config
        before anything is written), threads and dtype."""
        v, t = self.v, self.t
        self.device = device = run_device(t.device)
        # data parallel (torchrun): rank 0 logs and checkpoints
        self.session = launch.setup(v.raw.get("distributed"), device)
        self.rdir = rdir = Path(run_dir or t.run_dir or hydra_run_dir() or Path("outputs") / t.name)
        self.ckpt = rdir / "checkpoints" / "last.pt"
        self.state, self.fingerprint = resume_state(self.ckpt, t.resume, device, v)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[t.dtype]

    def _load_data(self) -> None:
        """The dataset's splits on the device, the task, and the targets (labels, or the flattened input)."""
        device = self.device
        splits = load_splits(self.v, self.dtype)
        task = resolve_task(self.v, splits.num_classes)
        self.splits, self.task = splits, task
        self.loss_name = "cross_entropy" if task == "classify" else self.t.loss

        def targets(split):
            X, y = split[0].to(device), split[1].to(device)
            return X, (y if task == "classify" else X.flatten(1))

        self.Xtr, self.Ytr = targets(splits.train)
        self.evals = {k: targets(getattr(splits, k)) for k in ("train", "val", "test")}
        check_unit_targets({k: Y for k, (_, Y) in self.evals.items()}, self.loss_name)

    def _build_model_and_optimizer(self) -> None:
        """Seeds, then the model, the loss, the optimizer and the LR schedule over ``total`` steps."""
        v, t, splits, task = self.v, self.t, self.splits, self.task
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)
        model = build_model(v, splits, task, self.device, self.dtype)
        if v.optim["name"] in SECOND_ORDER:
            check_blocks(model, v.curvature)
        loss_fn = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce_with_logits": nn.BCEWithLogitsLoss}[
            self.loss_name
        ]()
        try:
            self.session.check_batch(min(t.batch_size, len(self.Xtr)))
        except ValueError as e:
            raise ConfigError(one_line(e)) from None
        opt_model, dist_kw = self.session.for_optimizer(model, v.optim["name"])
        self.model = model
        self.opt = optim.build(v.optim["name"], opt_model, loss_fn, **v.optimizer_kwargs(), **dist_kw)
        self.n, self.bs = len(self.Xtr), min(t.batch_size, len(self.Xtr))
        self.spe = self.n // self.bs
        self.total = t.epochs * self.spe if t.max_steps is None else min(t.max_steps, t.epochs * self.spe)
        self.sched = optim.schedules.build(self.opt.optimizer, v.schedule.name, self.total, **v.schedule.kwargs)

    # ------------------------------------------------------------------ logging and resume
    def _open_logging(self) -> None:
        """The run directory's first files: ``config.yaml``, the CSV record and the external logger."""
        v, t, rdir, session, state = self.v, self.t, self.rdir, self.session, self.state
        rdir.mkdir(parents=True, exist_ok=True)  # the first file of the run
        if session.is_main:
            (rdir / "config.yaml").write_text(config_yaml(v.raw))
        self.record = tracking.CsvLogger(rdir if session.is_main else rdir / f".rank{session.rank}")
        self.ext = None
        if v.logger.kind != "csv" and session.is_main:
            lcfg = {k: val for k, val in vars(v.logger).items()}
            lcfg["name"] = lcfg.get("name") or t.name
            self.ext = tracking.build(
                lcfg,
                rdir,
                v.raw,
                state=(state or {}).get("logger_ext"),
                history=(state or {}).get("logger", {}).get("rows", ()),
            )
        self.logger = tracking.MultiLogger(self.record, self.ext) if self.ext is not None else self.record

    def _resume(self) -> None:
        """Counters of a fresh run, or everything the checkpoint holds (model, optimizer, schedule, RNGs, record)."""
        self.step, self.elapsed, self.last_eval, self.skipped = 0, 0.0, -1, 0
        self.t_start: float | None = None  # start of the current stretch of training time
        state = self.state
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.record.load_state_dict(state["logger"])
        self.step, self.elapsed, self.last_eval = state["step"], state["elapsed"], state["last_eval"]
        self.skipped = state.get("skipped_steps", 0)

    def evaluate_and_log(self) -> dict[str, float]:
        """Loss (and accuracy) on every split, logged at the current step; not counted as training time."""
        t0, m = time.perf_counter(), {}
        for k, (X, Y) in self.evals.items():
            m.update({f"{k}_{key}": val for key, val in evaluate(self.model, X, Y, self.loss_name).items()})
        m["epoch"] = self.step / self.spe
        m["wall_time"] = self.elapsed + (t0 - self.t_start if self.t_start is not None else 0.0)
        self.logger.log(m, self.step)
        if self.t_start is not None:  # evaluation time does not count as training time
            self.t_start += time.perf_counter() - t0
        return m

    def checkpoint(self) -> None:
        """``checkpoints/last.pt`` (rank 0): everything a restarted run needs to continue bit for bit."""
        if not self.session.is_main:
            return
        save_checkpoint(
            self.ckpt,
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "rng": rng_state(),
                "fingerprint": self.fingerprint,
                "config": self.v.raw,
                "step": self.step,
                "elapsed": self.elapsed,
                "last_eval": self.last_eval,
                "skipped_steps": self.skipped,
                "logger": self.record.state_dict(),
                "logger_ext": self.ext.state_dict() if self.ext is not None else None,
            },
        )

    def note(self, msg: str) -> None:
        """A message on stderr, outside the progress bar (rank 0)."""
        from tqdm.auto import tqdm

        if self.session.is_main:
            tqdm.write(msg, file=sys.stderr)

    # ------------------------------------------------------------------ training
    def train(self, callbacks: Sequence[Callback]) -> dict[str, Any]:
        """Evaluate the untrained model (fresh run), run the steps, conclude; the logger is closed on every
        exit (exit code 1 when killed, crashed or failed, then :class:`RunFailed` is raised)."""
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.total, initial=self.step, disable=not self.t.progress, desc=self.t.name, dynamic_ncols=True
        )
        self.model.train()
        try:
            if self.state is None:
                self.evaluate_and_log()  # the untrained model, step 0
                self.last_eval = 0
                self.checkpoint()  # from here on a restarted run continues this record (and this W&B run)
            self.t_start = time.perf_counter()
            failure = self._step_loop(callbacks)
            summary = self._conclude(failure)
        except BaseException:  # killed, interrupted or crashed: close the record (a restart restores it)
            self.bar.close()
            self.logger.finish(exit_code=1)
            raise
        self.logger.finish(exit_code=0 if failure is None else 1)
        if failure is not None:
            raise RunFailed(f"{failure}; summary: {self.rdir / 'summary.json'}")
        return summary

    def _step_loop(self, callbacks: Sequence[Callback]) -> str | None:
        """Mini-batch steps up to ``total`` (one seeded permutation per epoch), with the periodic evaluations
        and checkpoints; returns why the run failed, or None."""
        t, spe, bs = self.t, self.spe, self.bs
        perm, perm_epoch, bad_steps = None, -1, 0
        while self.step < self.total:
            epoch, b = divmod(self.step, spe)
            if perm_epoch != epoch:
                perm, perm_epoch = epoch_permutation(t.seed, epoch, self.n), epoch
            assert perm is not None
            loss, info, m = self._train_step(perm[b * bs : (b + 1) * bs])
            if self.step % spe == 0 and (self.step // spe) % t.eval_every == 0:
                self.evaluate_and_log()
                self.last_eval = self.step
            for cb in callbacks:
                cb(self.step, m)
            bad_steps = 0 if math.isfinite(loss) else bad_steps + 1
            failure = self._failure(loss, info, bad_steps)
            if failure is not None:
                return failure
            if self.step % t.checkpoint_every == 0 and self.step < self.total:
                assert self.t_start is not None
                self.elapsed += time.perf_counter() - self.t_start
                self.checkpoint()  # not counted as training time
                self.t_start = time.perf_counter()
        return None

    def _train_step(self, idx: Tensor) -> tuple[float, dict[str, Any], dict[str, Any]]:
        """One optimizer and schedule step on the batch ``idx``; its metrics logged, a skipped step reported."""
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # skipped steps are reported below, outside the progress bar
            warnings.simplefilter("ignore", optim.NonFiniteStepWarning)
            loss = float(self.opt.step(self.session.shard(self.Xtr[idx]), self.session.shard(self.Ytr[idx])))
        self.sched.step()
        dt = time.perf_counter() - t0
        self.step += 1
        info = self.opt.info
        m = {"loss": loss, "step_time": dt, "lr": float(self.opt.optimizer.param_groups[0]["lr"])}
        for key in (
            "damping",
            "curvature_fit_time",
            "solve_time",
            "skipped",
            "kl_scale",
            "refine_iterations",
            "refine_residual",
            "refine_cosine",
            "refine_time",
        ):
            if key in info:
                m[key] = float(info[key]) if not isinstance(info[key], bool) else int(info[key])
        self.logger.log(m, self.step)
        if info.get("skipped"):
            self.skipped += 1
            self.note(
                f"{self.t.name}: step {self.step} skipped: {skip_reason(info)} "
                f"({self.skipped} of {self.step} steps skipped so far)"
            )
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4g}", step_ms=f"{1e3 * dt:.1f}", skipped=self.skipped)
        return loss, info, m

    def _failure(self, loss: float, info: dict[str, Any], bad_steps: int) -> str | None:
        """Why the run must stop after this step (too many skipped steps, or divergence), or None."""
        t, step = self.t, self.step
        if self.skipped > t.max_skip_fraction * self.total:
            return (
                f"{self.skipped} of the run's {self.total} steps skipped by step {step} (more than "
                f"max_skip_fraction={t.max_skip_fraction:g}); last: {skip_reason(info)}"
            )
        if bad_steps >= 10 or not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            return f"training diverged at step {step} (loss={loss}); lower the learning rate or raise the damping"
        return None

    def _conclude(self, failure: str | None) -> dict[str, Any]:
        """The final evaluation and checkpoint (a failed run keeps its last good one), the summary and the
        loss figure."""
        self.bar.close()
        assert self.t_start is not None
        self.elapsed += time.perf_counter() - self.t_start
        self.t_start = None
        if self.last_eval != self.step:
            self.evaluate_and_log()
            self.last_eval = self.step
        if failure is None:
            self.checkpoint()  # (a failed run keeps its last good checkpoint: a restart replays the failure)
        else:
            self.note(f"{self.t.name}: FAILED: {failure}")
        v, record = self.v, self.record
        summary = run_summary(
            v,
            record.rows,
            device=self.device,
            task=self.task,
            loss=self.loss_name,
            step=self.step,
            spe=self.spe,
            bs=self.bs,
            model=self.model,
            elapsed=self.elapsed,
            skipped=self.skipped,
            failure=failure,
            rdir=self.rdir,
        )
        fig = loss_figure(record.rows, f"{self.t.name}: {v.model['name']} on {v.data.name}, {v.optim['name']}")
        record.log_figure("loss_curve", fig)
        if self.ext is not None:
            self.ext.log_figure("loss_curve", record.dir / "figures" / "loss_curve.png")
        self.logger.summary(summary)
        return summary
