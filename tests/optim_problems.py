"""Tiny models, batches and the resume protocol shared by the optimizer tests."""

from __future__ import annotations

import io

import torch
from torch import nn

import tensorcurv.optim as O


def mlp(seed=0, d_in=4, h=6, d_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, d_out))


def cls_batch(seed=0, N=16, d_in=4, C=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d_in, generator=g), torch.randint(0, C, (N,), generator=g)


def losses_with_resume(name: str, kw: dict, batches: list, split: int) -> list[float]:
    """Losses of one step per batch; after ``split`` steps the model and optimizer are rebuilt from their state
    dicts (a fresh model with other weights, another global seed), so equality with ``split = len(batches)`` means
    the state dict carries everything."""
    torch.manual_seed(0)
    model = mlp()
    opt = O.build(name, model, nn.CrossEntropyLoss(), **kw)
    losses = [float(opt.step(*b)) for b in batches[:split]]
    if split < len(batches):
        buf = io.BytesIO()
        torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=False)
        torch.manual_seed(123)  # global RNG must not matter
        model = mlp(seed=99)
        opt = O.build(name, model, nn.CrossEntropyLoss(), **kw)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        losses += [float(opt.step(*b)) for b in batches[split:]]
    return losses
