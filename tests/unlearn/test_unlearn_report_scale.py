"""The scale report states the retraining cost (wall and CPU), ‖∇L‖ of θ* and θ_r and the load, over seeds."""

from tensorcurv.unlearn import report
from tensorcurv.unlearn.report_scale import TRAINING, training_line


def _rows():
    base = {"method": "retrain", "status": "ok", "scenario": "cnn/label_flip", "time": 1.0}
    return [
        {**base, "retrain_time_wall": 100.0, "retrain_time_cpu": 60.0, "retrain_iterations": 300,
         "train_grad_norm": 1.0, "retrain_grad_norm": 2.0, "load1": 4.0},
        {**base, "retrain_time_wall": 200.0, "retrain_time_cpu": 80.0, "retrain_iterations": 320,
         "train_grad_norm": 3.0, "retrain_grad_norm": 2.0, "load1": 8.0},
    ]  # fmt: skip


def test_training_line_gives_mean_and_std_of_cpu_time_over_seeds():
    (entries,) = report.summarize(_rows(), TRAINING).values()
    line = training_line(entries)
    assert line.startswith("Retraining (mean ± std over 2 seeds)")
    assert report.format_mean_std(70.0, 14.142135623730951, 1) + " s CPU" in line


def test_training_line_is_empty_without_a_retrain_row():
    rows = [{**r, "method": "kfac"} for r in _rows()]
    (entries,) = report.summarize(rows, TRAINING).values()
    assert training_line(entries) == ""
