"""Training runs from a composed config: ``run_training(cfg) -> summary``.

One run = data (``tensorcurv.experiments.data.load``) + model (``tensorcurv.experiments.models.build``) + optimizer
(``tensorcurv.optim.build``; second-order ones take the structure, kind, damping and structure
hyper-parameters of the ``curvature`` group) + LR schedule, trained for ``epochs`` passes of
mini-batches (seeded permutation per epoch, last incomplete batch dropped). Loss: cross-entropy
for classification, ``nn.MSELoss`` (mean over all outputs) against the flattened input for
autoencoding.

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
import json
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
from tensorcurv.experiments import data as data_mod
from tensorcurv.experiments import models as models
from tensorcurv.experiments import tracking as tracking
from tensorcurv.experiments.config import (
    SECOND_ORDER,
    ConfigError,
    Validated,
    check_blocks,
    resolve_device,
    validate_train,
)
from tensorcurv.experiments.schema import one_line


class RunFailed(RuntimeError):
    """A run that started and failed (diverged, or skipped more than ``max_skip_fraction`` of its
    steps); its ``summary.json`` is written, with ``status`` and ``skipped_steps``."""


#: keys that may change between a run and its resumption
_RESUME_FREE = ("resume", "progress", "logger", "threads", "run_dir")

Callback = Callable[[int, dict[str, Any]], None]


def _hydra_run_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return HydraConfig.get().runtime.output_dir
    except Exception:  # pragma: no cover - hydra missing or not running
        pass
    return None


def resolve_task(v: Validated, num_classes: int | None) -> str:
    task = v.train.task
    if task == "auto":
        task = "autoencode" if (v.model["name"] in models.AUTOENCODERS or num_classes is None) else "classify"
    if task == "classify" and num_classes is None:
        raise ConfigError(f"task=classify needs labels, but dataset {v.data.name!r} has none; use task=autoencode")
    if task == "classify" and v.model["name"] in models.AUTOENCODERS:
        raise ConfigError(f"model {v.model['name']!r} is an autoencoder; use task=autoencode")
    return task


@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, Y: Tensor, task: str, chunk: int = 2048) -> dict[str, float]:
    """Mean loss (and accuracy for classification) of ``model`` on ``(X, Y)``."""
    if len(X) == 0:
        return {}
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(X), chunk):
        out = model(X[i:i + chunk])
        y = Y[i:i + chunk]
        if task == "classify":
            total += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        else:
            total += float(nn.functional.mse_loss(out, y, reduction="sum")) / y[0].numel()
    model.train(was_training)
    res = {"loss": total / len(X)}
    if task == "classify":
        res["acc"] = correct / len(X)
    return res


def _rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"].cpu())
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def _save(path: Path, state: dict[str, Any]) -> None:
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
def run_training(cfg: Any, *, callbacks: Sequence[Callback] = (), run_dir: str | os.PathLike | None = None
                 ) -> dict[str, Any]:
    """Train as configured by ``cfg`` (a composed ``conf/train.yaml``, DictConfig or dict).

    ``callbacks``: called as ``cb(step, metrics)`` after every step (tests use one to interrupt a
    run). Returns the summary that is also written to ``summary.json``. The config's ``threads`` and
    ``seed`` hold for the run only: the caller's thread count and RNG states are restored on return.
    """
    v = validate_train(cfg)  # one-line ConfigError before any work
    t = v.train
    device = resolve_device(t.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    session = launch.setup(v.raw.get("distributed"), device)  # data parallel (torchrun): rank 0 logs/checkpoints
    rdir = Path(run_dir or t.run_dir or _hydra_run_dir() or Path("outputs") / t.name)
    ckpt = rdir / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=False, map_location=device) if (t.resume and ckpt.exists()) else None
    fingerprint = _fingerprint(v.raw)
    if state is not None and state.get("fingerprint", fingerprint) != fingerprint:  # before anything is written
        raise ConfigError(f"{ckpt} belongs to a run with a different config; pass resume=false to start afresh "
                          f"or choose another run directory")
    if t.threads:
        torch.set_num_threads(t.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[t.dtype]

    d = v.data
    try:
        splits = data_mod.load(d.name, data_dir=d.data_dir, val_fraction=d.val_fraction,
                               test_fraction=d.test_fraction, normalize=d.normalize, seed=t.seed, dtype=dtype,
                               download=d.download, limit=d.limit)
    except (OSError, ValueError, ImportError) as e:  # missing files offline, a corrupt file, mnist1d not installed
        raise ConfigError(f"data ({d.name}): {one_line(e)}") from None
    task = resolve_task(v, splits.num_classes)

    def targets(split):
        X, y = split[0].to(device), split[1].to(device)
        return X, (y if task == "classify" else X.flatten(1))

    Xtr, Ytr = targets(splits.train)
    evals = {k: targets(getattr(splits, k)) for k in ("train", "val", "test")}

    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    random.seed(t.seed)
    mkw = {k: val for k, val in v.model.items() if k != "name"}
    try:  # the input shape is known only now (e.g. a cnn on non-image data)
        model = models.build(v.model["name"], splits.input_shape,
                             splits.num_classes if task == "classify" else None, **mkw).to(device=device, dtype=dtype)
    except ValueError as e:
        raise ConfigError(f"model ({v.model['name']}) on {d.name}: {one_line(e)}") from None
    if v.optim["name"] in SECOND_ORDER:
        check_blocks(model, v.curvature)
    loss_fn = nn.CrossEntropyLoss() if task == "classify" else nn.MSELoss()
    try:
        session.check_batch(min(t.batch_size, len(Xtr)))
    except ValueError as e:
        raise ConfigError(one_line(e)) from None
    opt_model, dist_kw = session.for_optimizer(model, v.optim["name"])
    opt = optim.build(v.optim["name"], opt_model, loss_fn, **v.optimizer_kwargs(), **dist_kw)

    n, bs = len(Xtr), min(t.batch_size, len(Xtr))
    spe = n // bs
    total = t.epochs * spe if t.max_steps is None else min(t.max_steps, t.epochs * spe)
    sched = optim.schedules.build(opt.optimizer, v.schedule.name, total, **v.schedule.kwargs)

    rdir.mkdir(parents=True, exist_ok=True)  # the first file of the run
    if session.is_main:
        (rdir / "config.yaml").write_text(_to_yaml(v.raw))
    record = tracking.CsvLogger(rdir if session.is_main else rdir / f".rank{session.rank}")
    ext = None
    if v.logger.kind != "csv" and session.is_main:
        lcfg = {k: val for k, val in vars(v.logger).items()}
        lcfg["name"] = lcfg.get("name") or t.name
        ext = tracking.build(lcfg, rdir, v.raw, state=(state or {}).get("logger_ext"),
                             history=(state or {}).get("logger", {}).get("rows", ()))
    logger = tracking.MultiLogger(record, ext) if ext is not None else record

    step, elapsed, last_eval, t_start, skipped = 0, 0.0, -1, None, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        record.load_state_dict(state["logger"])
        step, elapsed, last_eval = state["step"], state["elapsed"], state["last_eval"]
        skipped = state.get("skipped_steps", 0)

    def do_eval() -> dict[str, float]:
        nonlocal t_start
        t0, m = time.perf_counter(), {}
        for k, (X, Y) in evals.items():
            m.update({f"{k}_{key}": val for key, val in evaluate(model, X, Y, task).items()})
        m["epoch"] = step / spe
        m["wall_time"] = elapsed + (t0 - t_start if t_start is not None else 0.0)
        logger.log(m, step)
        if t_start is not None:  # evaluation time does not count as training time
            t_start += time.perf_counter() - t0
        return m

    def checkpoint() -> None:
        if not session.is_main:
            return
        _save(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": _rng_state(), "fingerprint": fingerprint, "step": step, "elapsed": elapsed,
                     "last_eval": last_eval, "skipped_steps": skipped, "logger": record.state_dict(),
                     "logger_ext": ext.state_dict() if ext is not None else None})

    def note(msg: str) -> None:  # on stderr, outside the progress bar
        if session.is_main:
            tqdm.write(msg, file=sys.stderr)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not t.progress, desc=t.name, dynamic_ncols=True)
    perm, perm_epoch, bad_steps, failure = None, -1, 0, None
    model.train()
    try:
        if state is None:
            do_eval()  # the untrained model, step 0
            last_eval = 0
            checkpoint()  # from here on a restarted run continues this record (and this W&B run)
        t_start = time.perf_counter()
        while step < total:
            epoch, b = divmod(step, spe)
            if perm_epoch != epoch:
                perm, perm_epoch = _epoch_permutation(t.seed, epoch, n), epoch
            assert perm is not None
            idx = perm[b * bs:(b + 1) * bs]
            t0 = time.perf_counter()
            with warnings.catch_warnings():  # skipped steps are reported below, outside the progress bar
                warnings.simplefilter("ignore", optim.NonFiniteStepWarning)
                loss = float(opt.step(session.shard(Xtr[idx]), session.shard(Ytr[idx])))
            sched.step()
            dt = time.perf_counter() - t0
            step += 1
            info = opt.info
            m = {"loss": loss, "step_time": dt, "lr": float(opt.optimizer.param_groups[0]["lr"])}
            for key in ("damping", "curvature_fit_time", "solve_time", "skipped", "kl_scale", "refine_iterations",
                        "refine_residual", "refine_cosine", "refine_time"):
                if key in info:
                    m[key] = float(info[key]) if not isinstance(info[key], bool) else int(info[key])
            logger.log(m, step)
            if info.get("skipped"):
                skipped += 1
                note(f"{t.name}: step {step} skipped: {_skip_reason(info)} ({skipped} of {step} steps skipped so far)")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", step_ms=f"{1e3 * dt:.1f}", skipped=skipped)
            if step % spe == 0 and (step // spe) % t.eval_every == 0:
                do_eval()
                last_eval = step
            for cb in callbacks:
                cb(step, m)
            bad_steps = 0 if math.isfinite(loss) else bad_steps + 1
            if skipped > t.max_skip_fraction * total:
                failure = (f"{skipped} of the run's {total} steps skipped by step {step} (more than "
                           f"max_skip_fraction={t.max_skip_fraction:g}); last: {_skip_reason(info)}")
                break
            if bad_steps >= 10 or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                failure = (f"training diverged at step {step} (loss={loss}); lower the learning rate or raise "
                           f"the damping")
                break
            if step % t.checkpoint_every == 0 and step < total:
                elapsed += time.perf_counter() - t_start
                checkpoint()  # not counted as training time
                t_start = time.perf_counter()
        bar.close()
        elapsed += time.perf_counter() - t_start
        t_start = None
        if last_eval != step:
            do_eval()
            last_eval = step
        if failure is None:
            checkpoint()  # (a failed run keeps its last good checkpoint: a restart replays the failure)
        else:
            note(f"{t.name}: FAILED: {failure}")
        summary = _summary(v, record.rows, device=device, task=task, step=step, spe=spe, bs=bs, model=model,
                           elapsed=elapsed, skipped=skipped, failure=failure, rdir=rdir)
        fig = loss_figure(record.rows, f"{t.name}: {v.model['name']} on {v.data.name}, {v.optim['name']}")
        record.log_figure("loss_curve", fig)
        if ext is not None:
            ext.log_figure("loss_curve", record.dir / "figures" / "loss_curve.png")
        logger.summary(summary)
    except BaseException:  # killed, interrupted or crashed: close the record (a restart restores it)
        bar.close()
        logger.finish(exit_code=1)
        raise
    logger.finish(exit_code=0 if failure is None else 1)
    if failure is not None:
        raise RunFailed(f"{failure}; summary: {rdir / 'summary.json'}")
    return summary


def _skip_reason(info: dict[str, Any]) -> str:
    if "reason" in info:
        return str(info["reason"])
    return f"non-finite loss or gradient (loss={info.get('loss', float('nan')):.4g})"


def _summary(v: Validated, rows: Sequence[dict[str, Any]], *, device: torch.device, task: str, step: int, spe: int,
             bs: int, model: nn.Module, elapsed: float, skipped: int, failure: str | None, rdir: Path
             ) -> dict[str, Any]:
    """``summary.json``: the run's identity, its final evaluation, timings and skipped steps."""
    t = v.train
    step_times = [r["step_time"] for r in rows if "step_time" in r]
    final = next(r for r in reversed(rows) if "train_loss" in r)
    return {
        "name": t.name, "dataset": v.data.name, "model": v.model["name"], "optimizer": v.optim["name"],
        "structure": v.curvature["name"] if v.optim["name"] in SECOND_ORDER else None, "task": task,
        "seed": t.seed, "dtype": t.dtype, "device": str(device), "steps": step, "epochs": step / spe, "batch_size": bs,
        "num_params": sum(p.numel() for p in model.parameters()),
        **{k: val for k, val in final.items() if k not in ("step", "epoch", "wall_time")},
        "wall_time": elapsed, "time_per_step": float(np.mean(step_times)) if step_times else None,
        "skipped_steps": skipped, "status": "ok" if failure is None else f"failed: {failure}",
        "run_dir": str(rdir),
    }


def _fingerprint(raw: dict[str, Any]) -> str:
    import hashlib

    kept = {k: val for k, val in raw.items() if k not in _RESUME_FREE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _to_yaml(raw: dict[str, Any]) -> str:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.create(raw))
    except ImportError:  # pragma: no cover
        return json.dumps(raw, indent=2)
