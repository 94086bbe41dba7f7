"""Approximation-accuracy study (thin Hydra wrapper around tensorcurv.study.runner / tensorcurv.study.report).

    python scripts/study.py                                   # conf/study.yaml: digits MLP
    python scripts/study.py experiment=study_digits_cnn
    python scripts/study.py study.kinds=[ggn] train.steps=50 report_dir=reports/quick
    python scripts/study.py experiment=study_digits_mlp render_only=true   # re-draw from the CSVs
    python -m tensorcurv.study.figures reports/study_digits_mlp          # only the figures, report.md untouched

Trains the model with Adam, evaluates every structure on every covered layer and curvature kind at
the checkpoints, and writes report.md, PNG figures and the raw CSVs into report_dir (default
reports/<name>). With logger=wandb the same figures and tables go to W&B (offline by default).
A bad config value or an unknown key stops with one line (``error: ...``, exit status 2) before
anything is trained or written.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONF = str(ROOT / "conf")


def command_line() -> str:
    return "python scripts/study.py " + " ".join(a for a in sys.argv[1:] if not a.startswith(("hydra.", "render_only")))


@hydra.main(config_path=CONF, config_name="study", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import torch

    from tensorcurv.experiments import tracking as tracking
    from tensorcurv.experiments.cli import CONFIG_ERROR_EXIT, fail, report_errors, validate_or_exit
    from tensorcurv.experiments.study_config import check_study_data
    from tensorcurv.study import report as report
    from tensorcurv.study.runner import run_study

    plain = validate_or_exit("study", cfg)  # one line and exit 2 before any work
    out = Path(cfg.report_dir or ROOT / "reports" / cfg.name)
    if not out.is_absolute():
        out = ROOT / out
    if cfg.render_only and not (out / "metrics.csv").exists():
        fail(
            f"render_only=true but {out} has no metrics.csv; run the study first (without render_only)",
            CONFIG_ERROR_EXIT,
        )
    if not cfg.render_only:
        with report_errors():
            check_study_data(plain)  # the dataset loads and has labels, the model fits it, spectrum_layer exists
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    t0, load_before = time.perf_counter(), os.getloadavg()
    if cfg.render_only:  # re-draw figures and tables from the CSVs already in report_dir
        result = report.read_result(out)
    else:
        result = run_study(plain)
    elapsed = time.perf_counter() - t0
    logger = tracking.build(plain.get("logger"), out / "logs", plain)
    title = cfg.title or f"Curvature approximation study: {cfg.data.name}, {cfg.model.name}"
    old_md = out / "report.md"
    if cfg.render_only and old_md.exists():  # keep the generating command and the original description
        text = old_md.read_text().split("```bash\n", 1)[1]
        command, rest = text.split("\n```", 1)
        desc = rest.strip().split("\n\n", 1)[0]
        path = report.write_report(result, out, command=command, title=title, description=desc)
        print(f"report re-rendered: {path}")
        return
    desc = (
        f"Model `{cfg.model.name}` ({', '.join(f'{k}={v}' for k, v in plain['model'].items() if k != 'name')}) "
        f"on `{cfg.data.name}`, trained with Adam (lr {cfg.train.lr}, batch {cfg.train.batch_size}) for "
        f"{cfg.train.steps} steps; metrics on a fixed batch of {cfg.study.batch_size} training samples at steps "
        f"{sorted({r['step'] for r in result['training']})}, {cfg.dtype}. Study time {elapsed:.0f} s "
        f"({cfg.threads} thread(s)); machine load (os.getloadavg, 1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_before)} at the start, "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end."
    )
    path = report.write_report(result, out, command=command_line(), title=title, description=desc, logger=logger)
    logger.finish()
    print(f"report: {path} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
