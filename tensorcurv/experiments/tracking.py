"""Experiment loggers: ``build(cfg, run_dir, config) -> Logger`` with kinds ``csv``, ``wandb``, ``none``.

Every logger offers ``log(metrics, step)``, ``log_figure(name, fig_or_png)``, ``log_table(name,
rows)``, ``summary(dict)``, ``finish()``, and ``state_dict()`` / ``load_state_dict()`` so a resumed
run continues the same record.

* ``csv`` (:class:`CsvLogger`): the run directory's own record, no account and no network (a new
  logger starts the record afresh; a resumed one restores its rows with ``load_state_dict``):
  ``metrics.csv`` (one row per ``log`` call, columns = union of keys), ``metrics.jsonl`` (the same
  rows as JSON lines), ``figures/<name>.png``, ``tables/<name>.csv``, ``summary.json``.
* ``wandb`` (:class:`WandbLogger`): the real ``wandb`` package. ``mode="offline"`` (default) writes a
  run directory under ``<run_dir>/wandb/offline-run-*`` that ``wandb sync <that dir>`` uploads later;
  ``mode="online"`` needs ``wandb login``; ``mode="disabled"`` makes every call a no-op. W&B records
  the config, the metric history, system information (hardware, Python, git) and the final figures
  and tables. A resumed run continues the *same* W&B run, with every step exactly once: offline,
  the killed attempt's ``offline-run-*-<id>`` directory is replaced by one with the same id that
  replays the checkpointed history (``history``, the CSV record up to the checkpoint; the steps
  after it are recomputed identically) and continues from there; online, the server's run is
  resumed (``resume="allow"``) and logging continues from the checkpoint's step.
* ``none`` (:class:`NullLogger`): nothing.

``tensorcurv.experiments.runner.run_training`` always keeps a :class:`CsvLogger` and adds the configured
logger when it is not ``csv``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorcurv.core.options import Option


class LoggerKind(Option):
    """Where metrics go: ``wandb``, ``csv`` files, or ``none``."""

    WANDB = "wandb"
    CSV = "csv"
    NONE = "none"


class WandbMode(Option):
    """W&B's run mode."""

    OFFLINE = "offline"
    ONLINE = "online"
    DISABLED = "disabled"


def _plain(v: Any) -> Any:
    """Python scalars for JSON/CSV (tensors and numpy scalars become floats/ints)."""
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            pass
    return v


def _json_safe(v: Any) -> Any:
    v = _plain(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


class Logger:
    """Base logger: does nothing (the ``none`` kind)."""

    kind = "none"

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_figure(self, name: str, fig_or_png: Any) -> None:
        pass

    def log_table(self, name: str, rows: list[dict]) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        """Close the record (``exit_code`` != 0: the run was killed, crashed or failed)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


NullLogger = Logger


class CsvLogger(Logger):
    """Metrics, figures, tables and the summary as plain files in ``run_dir``."""

    kind = "csv"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self._summary: dict[str, Any] = {}
        (self.dir / "metrics.jsonl").write_text("")  # a new logger starts a new record (resume: load_state_dict)

    def log(self, metrics, step):
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_json_safe(row)) + "\n")

    def flush(self) -> None:
        """Rewrite ``metrics.csv`` from all rows (columns = union of keys, in first-seen order)."""
        cols: dict[str, None] = {}
        for r in self.rows:
            cols.update(dict.fromkeys(r))
        with open(self.dir / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(cols))
            w.writeheader()
            w.writerows(self.rows)

    def log_figure(self, name, fig_or_png):
        out = self.dir / "figures" / f"{name}.png"
        out.parent.mkdir(exist_ok=True)
        if isinstance(fig_or_png, (str, os.PathLike)):
            if Path(fig_or_png).resolve() != out.resolve():
                out.write_bytes(Path(fig_or_png).read_bytes())
        else:
            fig_or_png.savefig(out, dpi=120, bbox_inches="tight")

    def log_table(self, name, rows):
        out = self.dir / "tables" / f"{name}.csv"
        out.parent.mkdir(exist_ok=True)
        cols: dict[str, None] = {}
        for r in rows:
            cols.update(dict.fromkeys(r))
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(cols))
            w.writeheader()
            w.writerows([{k: _plain(v) for k, v in r.items()} for r in rows])

    def summary(self, values):
        self._summary.update({k: _plain(v) for k, v in values.items()})
        (self.dir / "summary.json").write_text(json.dumps(_json_safe(self._summary), indent=2) + "\n")

    def finish(self, exit_code=0):
        self.flush()

    def state_dict(self):
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state):
        """Restore the rows of a checkpoint; rows logged after it (by a killed run) are dropped."""
        self.rows = [dict(r) for r in state.get("rows", [])]
        with open(self.dir / "metrics.jsonl", "w") as f:
            for r in self.rows:
                f.write(json.dumps(_json_safe(r)) + "\n")
        self.flush()


class WandbLogger(Logger):
    """The ``wandb`` package; offline by default (see the module docstring)."""

    kind = "wandb"

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: Mapping[str, Any] | None = None,
        *,
        mode: str = "offline",
        project: str = "tensorcurv",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        run_id: str | None = None,
        history: list[Mapping[str, Any]] | tuple = (),
    ) -> None:
        WandbMode.parse(mode, "logger.mode")
        import wandb

        self._wandb = wandb
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        server_resume = run_id is not None and mode == "online"
        if run_id is not None and mode == "offline":  # the killed attempt's record is replayed below
            for stale in (self.dir / "wandb").glob(f"offline-run-*-{run_id}"):
                shutil.rmtree(stale)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=list(tags or []),
            config=_json_safe(dict(config or {})),
            dir=str(self.dir),
            mode=mode,  # type: ignore[arg-type]
            id=run_id,
            resume="allow" if server_resume else None,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", init_timeout=300),  # slow start on loaded CPUs
        )
        self.run_id = self.run.id if mode != "disabled" else None
        if not server_resume:
            for row in history:
                self.log({k: v for k, v in row.items() if k != "step"}, row["step"])

    def log(self, metrics, step):
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=int(step))

    def log_figure(self, name, fig_or_png):
        path = str(fig_or_png) if isinstance(fig_or_png, (str, os.PathLike)) else None
        self.run.log({name: self._wandb.Image(path if path is not None else fig_or_png)})

    def log_table(self, name, rows):
        cols: dict[str, None] = {}
        for r in rows:
            cols.update(dict.fromkeys(r))
        data = [[_plain(r.get(c)) for c in cols] for r in rows]
        self.run.log({name: self._wandb.Table(columns=list(cols), data=data)})

    def summary(self, values):
        self.run.summary.update({k: _plain(v) for k, v in values.items()})

    def finish(self, exit_code=0):
        self.run.finish(exit_code=exit_code)

    @property
    def offline_dir(self) -> Path | None:
        """The offline run directory (``wandb sync`` it), or None when not offline."""
        if self.mode != "offline":
            return None
        return Path(self.run.dir).parent

    def state_dict(self):
        return {"run_id": self.run_id}


class MultiLogger(Logger):
    """Forwards every call to several loggers."""

    def __init__(self, *loggers: Logger) -> None:
        self.loggers = list(loggers)
        self.kind = "+".join(lg.kind for lg in self.loggers)

    def log(self, metrics, step):
        for lg in self.loggers:
            lg.log(metrics, step)

    def log_figure(self, name, fig_or_png):
        for lg in self.loggers:
            lg.log_figure(name, fig_or_png)

    def log_table(self, name, rows):
        for lg in self.loggers:
            lg.log_table(name, rows)

    def summary(self, values):
        for lg in self.loggers:
            lg.summary(values)

    def finish(self, exit_code=0):
        for lg in self.loggers:
            lg.finish(exit_code)

    def state_dict(self):
        return {str(i): lg.state_dict() for i, lg in enumerate(self.loggers)}

    def load_state_dict(self, state):
        for i, lg in enumerate(self.loggers):
            lg.load_state_dict(state.get(str(i), {}))


def build(
    cfg: Mapping[str, Any] | None,
    run_dir: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    history: list[Mapping[str, Any]] | tuple = (),
) -> Logger:
    """Logger from a config node ``{kind: wandb|csv|none, ...}`` (``conf/logger/*.yaml``).

    ``state``: a previous :meth:`Logger.state_dict` (resume: the W&B run id is re-used);
    ``history``: the rows a resumed run logged up to its checkpoint (:attr:`CsvLogger.rows`).
    """
    cfg = dict(cfg or {"kind": "csv"})
    kind = cfg.pop("kind", "csv")
    LoggerKind.parse(kind, "logger.kind")
    if kind == "csv":
        return CsvLogger(run_dir)
    if kind == "none":
        return NullLogger()
    run_id = (state or {}).get("run_id")
    return WandbLogger(run_dir, config, run_id=run_id, history=history, **cfg)
