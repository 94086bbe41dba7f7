"""Tiny float64 models and batches shared by the core tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).double()


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dilation=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, kernel_size=2, stride=1, padding=0, dilation=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 1 * 1, 3),
    ).double()


def deconv(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.ConvTranspose2d(2, 3, kernel_size=3, stride=2, padding=1, output_padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 3),
    ).double()


class Sequence(nn.Module):
    """Linear layers applied to (N, L, d) sequences, pooled at the end."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x))).mean(1)


def batch(kind: str, loss: str, n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (n, 5), "cnn": (n, 2, 5, 5), "deconv": (n, 2, 3, 3), "sequence": (n, 4, 3)}[kind]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (n,), generator=g)
    elif loss == "bce_with_logits":  # soft targets in [0, 1]
        y = torch.rand(n, 3, generator=g, dtype=torch.float64)
    else:
        y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, y


MODELS = {
    "mlp": mlp,
    "mlp_nobias": lambda: mlp(bias=False),
    "cnn": cnn,
    "deconv": deconv,
    "sequence": lambda: Sequence().double(),
}
