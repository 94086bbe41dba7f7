"""Tiny float64 layers (a linear and a conv MLP) shared by the rearrangement, kron_sum and tucker/tt tests."""

import torch
from torch import nn

import tensorcurv

KINDS = ["empirical", "mc", "ggn"]


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "linear":
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    if name == "conv":
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, stride=2),
            nn.Flatten(),
            nn.Linear(2 * 2 * 2, 3),
        ).double()
    raise ValueError(name)


def tiny_batch(name: str, n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = {"linear": (n, 6), "conv": (n, 2, 4, 4)}[name]
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g) % 3


def curvature(model_name: str, kind: str, structure: str = "dense", n: int = 10, **hp):
    """A fitted ``Curvature`` on a tiny model; returns ``(curv, stats)`` of the same batch."""
    model = tiny_model(model_name)
    x, y = tiny_batch(model_name, n)
    curv = tensorcurv.Curvature(model, structure, kind, seed=0, **hp)
    stats = curv.capture(x, y, nn.CrossEntropyLoss()).stats
    curv.fit_stats(stats)
    return curv, stats


def rel(a, b):
    return float((a - b).norm() / b.norm())
