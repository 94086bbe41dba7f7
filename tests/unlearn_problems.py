"""Tiny float64 problems shared by the unlearning tests (logistic regression, tiny MLP, ridge)."""

from __future__ import annotations

import torch
from torch import nn

from tensorcurv.unlearn import Objective, train_lbfgs


def data(n: int = 30, d: int = 4, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(classes, d, generator=g, dtype=torch.float64)
    y = (X @ W.T + 0.8 * torch.randn(n, classes, generator=g, dtype=torch.float64)).argmax(1)
    return X, y


def logreg(d: int = 4, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(d, classes).double()


def mlp(d: int = 4, hidden: int = 3, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()


def trained(model: nn.Module, X, y, mu: float, loss="cross_entropy"):
    """Load θ* = argmin L(D; θ) into the model; returns the objective."""
    obj = Objective(model, loss, mu)
    res = train_lbfgs(obj, X, y, obj.theta(), gtol=1e-11, max_iter=300)
    obj.load(res.theta)
    return obj


def trained_problem(model_fn=logreg, mu: float = 0.5):
    """``(objective at θ*, θ*, X, y, v)`` for ``model_fn`` trained on :func:`data`, with a fixed random vector ``v``."""
    X, y = data()
    obj = trained(model_fn(), X, y, mu)
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return obj, obj.theta(), X, y, v
