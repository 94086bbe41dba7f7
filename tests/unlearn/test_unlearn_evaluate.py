"""Evaluation metrics on a hand-made case, the harness rows, scenarios, and the report writer."""

import math

import pytest
import torch
from torch import nn

from tensorcurv.unlearn import AffectedSet, Objective
from tensorcurv.unlearn.evaluate import MethodSpec, Reference, evaluate_methods, metrics
from tensorcurv.unlearn.report import summarize, write_report
from tensorcurv.unlearn.scenarios import backdoor, deletion, label_flip, stamp
from unlearn_problems import data, logreg


def _hand_made():
    """1-D inputs, 2 classes, model z = [w x, 0] (no bias): predictions are sign(w x)."""
    model = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    obj = Objective(model, "cross_entropy", mu=1.0)
    X_test = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]], dtype=torch.float64)
    y_test = torch.tensor([0, 1, 0, 0])
    t_star = torch.tensor([1.0, 0.0], dtype=torch.float64)  # class 0 iff x > 0
    t_retr = torch.tensor([-1.0, 0.0], dtype=torch.float64)  # class 0 iff x < 0
    ref = Reference(torch.zeros(2, dtype=torch.float64), t_star, t_retr, 1.0, 2.0, 0.0)
    return obj, X_test, y_test, ref


def test_metrics_on_hand_made_case():
    obj, X_test, y_test, ref = _hand_made()
    theta = torch.tensor([0.5, 0.0], dtype=torch.float64)  # same predictions as θ*
    X_rem = torch.tensor([[1.0]], dtype=torch.float64)
    y_rem = torch.tensor([1])
    Z = (torch.tensor([[3.0], [-3.0]], dtype=torch.float64), torch.tensor([0, 0]))
    m = metrics(obj, theta, ref, X_rem=X_rem, y_rem=y_rem, X_test=X_test, y_test=y_test, Z_eval=Z)
    assert m["rel_dist"] == pytest.approx(1.5 / 2.0)  # |0.5 − (−1)| / |1 − (−1)|
    assert m["agreement"] == pytest.approx(0.0)  # opposite signs everywhere
    assert m["test_acc"] == pytest.approx(3 / 4)  # predicts 0,1,0,1 vs labels 0,1,0,0
    assert m["affected_acc"] == pytest.approx(1 / 2)
    p0 = 1 / (1 + math.exp(-1.5))  # softmax([±1.5, 0])[0]
    assert m["affected_loss"] == pytest.approx(-(math.log(p0) + math.log(1 - p0)) / 2)
    # ∇L(D̃; θ) for one point x=1, y=1, z = [θ_0 x, θ_1 x]: (p − e_1)·x + μθ with p_0 = σ(0.5)
    p0 = 1 / (1 + math.exp(-0.5))
    assert m["grad_residual"] == pytest.approx(math.hypot(p0 + 1.0 * 0.5, -p0 + 0.0), rel=1e-12)


def test_retraining_row_has_zero_distance_and_full_agreement():
    X, y = data()
    aff = AffectedSet.relabel([0, 1, 2], (y[:3] + 1) % 3)
    rows, ref = evaluate_methods(logreg(), X, y, aff, X[:10], y[:10], [MethodSpec("fo", order=1, tau="cauchy")], mu=0.5)
    by = {r["method"]: r for r in rows}
    assert by["retrain"]["rel_dist"] == 0.0 and by["retrain"]["agreement"] == 1.0
    assert by["original"]["rel_dist"] == pytest.approx(1.0)
    assert by["retrain"]["grad_residual"] < 1e-6
    assert by["fo"]["speedup"] == pytest.approx(ref.retrain_time / by["fo"]["time"])


def test_failed_method_is_reported_and_scored_as_the_original_model():
    X, y = data()
    aff = AffectedSet.removal([4, 5])
    spec = MethodSpec("cg1", solver="cg", solver_kwargs={"curvature": "ggn", "tol": 1e-14, "max_iter": 1})
    rows, _ = evaluate_methods(logreg(), X, y, aff, X[:10], y[:10], [spec], mu=0.5)
    row = rows[-1]
    assert row["status"].startswith("ihvp not converged") and row["rel_dist"] == pytest.approx(1.0)


def _images(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_label_flip_changes_exactly_the_affected_labels_to_other_classes():
    X, y = _images()
    sc = label_flip(X, y, X, y, 3, fraction=0.25, seed=1)
    changed = (sc.y != y).nonzero().squeeze(1)
    assert torch.equal(changed, sc.affected.indices) and len(changed) == 10
    assert torch.equal(sc.affected.apply(sc.X, sc.y)[1], y)


def test_backdoor_stamps_trigger_and_unlearning_restores_clean_data():
    X, y = _images()
    sc = backdoor(X, y, X, y, 3, fraction=0.2, target=0, patch=2, trigger_value=7.0, seed=0)
    idx = sc.affected.indices
    assert (y[idx] != 0).all() and (sc.y[idx] == 0).all()
    assert (sc.X[idx][..., -2:, -2:] == 7.0).all()
    Xc, yc = sc.affected.apply(sc.X, sc.y)
    assert torch.equal(Xc, X) and torch.equal(yc, y)
    Xb, yb = sc.extra["backdoor"]
    assert (yb == 0).all() and torch.equal(Xb, stamp(X[y != 0], 2, 7.0))


def test_deletion_removes_the_affected_points():
    X, y = _images()
    sc = deletion(X, y, X, y, 3, fraction=0.1, seed=0)
    assert sc.affected.is_removal and len(sc.affected.apply(sc.X, sc.y)[0]) == 36


def test_report_writes_markdown_csv_and_plot(tmp_path):
    rows = [
        {
            "scenario": "s",
            "seed": s,
            "method": m,
            "status": "ok",
            "rel_dist": d,
            "agreement": 1.0,
            "test_acc": 0.9,
            "affected_acc": 1.0,
            "grad_residual": 0.1,
            "time": t,
            "speedup": 2.0,
            "time_vs_lissa": 1.0,
        }
        for s in (0, 1)
        for m, d, t in (("retrain", 0.0, 1.0), ("kfac", 0.4 + s * 0.2, 0.01))
    ]
    path = write_report(rows, tmp_path, command="python x.py")
    text = path.read_text()
    assert "python x.py" in text and "| kfac | 0.500 ± 0.141" in text
    assert (tmp_path / "results.csv").exists() and (tmp_path / "fidelity_vs_time_s.png").exists()
    assert summarize(rows)["s"][1]["rel_dist"][0] == pytest.approx(0.5)


def test_method_rows_carry_cpu_time_and_the_cpu_time_speedup_against_retraining():
    X, y = data()
    aff = AffectedSet.relabel([0, 1, 2], (y[:3] + 1) % 3)
    rows, ref = evaluate_methods(logreg(), X, y, aff, X[:10], y[:10], [MethodSpec("fo", order=1, tau="cauchy")], mu=0.5)
    fo = rows[-1]
    assert fo["cpu_time"] > 0
    assert fo["speedup_cpu"] == pytest.approx(ref.retrain_cpu_time / fo["cpu_time"])
