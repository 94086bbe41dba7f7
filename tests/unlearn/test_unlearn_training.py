"""Training θ* and θ_r: CPU time is recorded, and an identical training is run once and then loaded from disk."""

import math

import torch

from tensorcurv.unlearn import Objective
from tensorcurv.unlearn.training import cached_training, train_adam_lbfgs, training_key
from unlearn_problems import data, logreg

MU = 0.5
RECIPE = dict(epochs=1, lbfgs_iter=20, batch_size=8, lr=1e-2, gtol=1e-6, seed=0)


def _train():
    X, y = data()
    obj = Objective(logreg(), "cross_entropy", MU)
    return train_adam_lbfgs(obj, X, y, obj.theta(), **RECIPE)


def test_training_records_its_cpu_time():
    res = _train()
    assert math.isfinite(res.cpu_time) and res.cpu_time > 0


def test_cached_training_runs_once_per_key(tmp_path):
    calls = []

    def train():
        calls.append(1)
        return _train()

    cached_training(tmp_path, "k", train)
    cached_training(tmp_path, "k", train)
    assert len(calls) == 1


def test_cached_training_returns_the_saved_result_with_its_times(tmp_path):
    first = cached_training(tmp_path, "k", _train)
    again = cached_training(tmp_path, "k", lambda: None)  # never called
    assert torch.equal(again.theta, first.theta)
    assert (again.time, again.cpu_time, again.grad_norm, again.iterations) == (
        first.time,
        first.cpu_time,
        first.grad_norm,
        first.iterations,
    )


def test_training_key_changes_with_data_initialization_and_recipe():
    X, y = data()
    theta0 = torch.zeros(15, dtype=torch.float64)
    base = training_key(X, y, theta0, **RECIPE)
    assert base == training_key(X.clone(), y.clone(), theta0.clone(), **RECIPE)
    y2 = y.clone()
    y2[0] = (y2[0] + 1) % 3
    assert training_key(X, y2, theta0, **RECIPE) != base
    assert training_key(X, y, theta0 + 1, **RECIPE) != base
    assert training_key(X, y, theta0, **{**RECIPE, "gtol": 1e-3}) != base


def test_without_a_cache_directory_every_call_trains():
    calls = []

    def train():
        calls.append(1)
        return _train()

    cached_training(None, "k", train)
    cached_training(None, "k", train)
    assert len(calls) == 2
