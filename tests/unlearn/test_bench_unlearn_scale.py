"""``scripts/bench_unlearn_scale.py``: bad names fail before any work; --quick writes the report."""

import csv
import importlib.util
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("bench_unlearn_scale", ROOT / "scripts" / "bench_unlearn_scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_unlearn_scale"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenarios", "flip"], "unknown scenario 'flip'; valid:"),
        (["--methods", "kfca"], "unknown methods ['kfca']; valid:"),
        (["--presets", "resnet"], "unknown preset 'resnet'; valid:"),
        (["--data", "imagenet"], "unknown --data 'imagenet'"),
    ],
)
def test_unknown_names_are_one_line_errors_before_any_work(argv, message, capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as err:
        _script().main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - t0 < 5.0  # nothing trained


@pytest.mark.slow
def test_quick_run_writes_report_csv_and_figures(tmp_path):
    methods = ["first_order", "lissa", "kfac (cached)", "finetune 1 ep"]
    _script().main(
        ["--quick", "--presets", "cnn", "--scenarios", "label_flip", "--methods", *methods, "--out", str(tmp_path)]
    )
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["method"] for r in rows} == {"original", "retrain", *methods}
    assert all(r["mia_auc"] != "" for r in rows)
    assert (tmp_path / "report.md").read_text().startswith("# Unlearning where retraining hurts")
    assert (tmp_path / "fidelity_vs_time_cnn_label_flip.png").exists()
    assert (tmp_path / "restored_vs_time_cnn_label_flip.png").exists()
