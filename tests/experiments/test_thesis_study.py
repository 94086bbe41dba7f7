"""scripts/thesis.py and its library (tensorcurv.experiments.thesis_study / thesis_report): the method table,
the equal tuning budget, the target, CLI errors, and a quick end-to-end run that resumes."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tensorcurv.experiments import thesis_report as report
from tensorcurv.experiments import thesis_study as study

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "thesis.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_every_method_gets_the_same_number_of_grid_settings():
    sizes = {name: len(study.grid(m)) for name, m in study.METHODS.items()}
    assert set(sizes.values()) == {study.GRID_SIZE}


def test_a_reduced_grid_keeps_the_central_settings():
    assert study.grid(study.METHODS["adam"], 2) == [{"lr": 1e-3}, {"lr": 3e-3}]


def test_second_order_overrides_name_structure_damping_and_mc_fisher():
    ovr = study.overrides(
        "digits", study.METHODS["kpsvd"], {"lr": 0.1, "damping": 1e-2}, 1, study.PROTOCOLS["cpu"], Path("d")
    )
    assert {"curvature=kpsvd", "curvature.kind=mc", "curvature.damping=0.01", "optim.lr=0.1", "seed=1"} <= set(ovr)


def test_best_setting_ignores_diverged_runs():
    rows = [{"setting": "a", "train_loss": math.inf}, {"setting": "b", "train_loss": 0.3}]
    assert study.best_setting(rows) == "b"


def test_target_is_the_best_first_order_final_loss_on_its_worst_seed():
    runs = [
        {
            "dataset": "d",
            "method": m,
            "setting": "s",
            "seed": 0.0,
            "train_loss": x,
            "test_loss": x,
            "wall_time": 1.0,
            "time_per_step": 0.1,
        }
        for m, x in (("sgd", 0.5), ("adam", 0.4), ("kfac", 0.2))
    ]
    runs.append({**runs[1], "seed": 1.0, "train_loss": 0.45})
    rows = report.summarize(runs, [], first_order=("sgd", "adam"))
    assert rows["d", "kfac"]["target"] == 0.45


@pytest.mark.parametrize("flag, key", [("--methods", "method"), ("--datasets", "dataset")])
def test_unknown_name_is_a_one_line_error_naming_the_valid_values(tmp_path, flag, key):
    res = run_script(flag, "nope", "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert f"unknown {key} 'nope'" in res.stderr and "valid:" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quick_run_writes_the_report_and_a_rerun_resumes(tmp_path):
    args = ["--quick", "--datasets", "digits", "--methods", "kfac", "sgd", "--out", str(tmp_path / "out")]
    args += ["--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data")]
    first = run_script(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    out = tmp_path / "out"
    with (out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4  # 2 methods x (1 grid setting + 1 more seed)
    assert "K-FAC" in (out / "report.md").read_text()
    assert (out / "errors.csv").exists() and (out / "loss_vs_wall.png").exists()
    again = run_script(*args)
    assert again.returncode == 0 and "seed 0:" not in again.stdout  # every run recorded: nothing rerun
