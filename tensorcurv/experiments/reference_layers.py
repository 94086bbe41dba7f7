"""Reference layers: the real layers on which the accuracy targets of the structures are checked.

Three small networks on the embedded digits data (sklearn, 8x8 images, standardized), each either at
its seeded initialization (``trained=False``) or after a fixed, seeded Adam run (``trained=True``):

* ``mlp``: 64-128-128-10, tanh, cross-entropy. Layers ``"1"`` (128 x 65), ``"3"`` (128 x 129),
  ``"5"`` (10 x 129).
* ``autoencoder``: 64-128-32-128-64, sigmoid, linear code and output, MSE. Layer ``"3"`` is the
  32 x 129 code layer.
* ``cnn``: conv(8)-pool-conv(16)-pool-fc(32)-fc(10), relu, cross-entropy (the study's digits CNN).
  ``"features.3"`` is the 8 -> 16 conv layer (16 x 73, T = 16 positions).

:func:`reference_stats` returns the per-sample factors (:class:`~tensorcurv.core.stats.LayerStats`) of every
covered layer for one fixed batch, for any curvature kind. Everything is deterministic in a fresh process.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from tensorcurv.core.options import Option
from tensorcurv.core.stats import LayerStats
from tensorcurv.curvature import Curvature
from tensorcurv.experiments import data as data
from tensorcurv.experiments import models as models


class ReferenceNetwork(Option):
    """The small trained networks whose layers the structure tests and benchmarks use."""

    MLP = "mlp"
    AUTOENCODER = "autoencoder"
    CNN = "cnn"


TRAIN_STEPS = 300  # Adam, lr 1e-3, batch 128: a few seconds on 2 CPU cores for each network


def _build(net: str) -> tuple[nn.Module, str, bool]:
    """Model, loss name and whether the inputs are images."""
    if net == "mlp":
        return models.mlp((64,), 10, hidden_sizes=(128, 128), activation="tanh"), "cross_entropy", False
    if net == "autoencoder":
        return models.autoencoder((64,), hidden_sizes=(128, 32), activation="sigmoid"), "mse", False
    if net == "cnn":
        return models.CNN((1, 8, 8), 10, channels=(8, 16), hidden=32, activation="relu"), "cross_entropy", True
    raise ValueError(f"unknown reference network {net!r}; valid: {ReferenceNetwork.values()}")


def _loss_fn(loss: str) -> nn.Module:
    return nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()


@cache
def _digits(image: bool):
    splits = data.load("digits", seed=0, dtype=torch.float64)
    x, y = splits.train
    return (x if image else x.flatten(1)), y


def _targets(loss: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) if loss == "mse" else y


@cache
def _state(net: str, trained: bool) -> dict[str, torch.Tensor]:
    """float64 weights of ``net``: seeded init, then (if ``trained``) ``TRAIN_STEPS`` seeded Adam steps."""
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global generator
        torch.manual_seed(0)
        model, loss, image = _build(net)
    model = model.double()
    if trained:
        x, y = _digits(image)
        gen = torch.Generator().manual_seed(1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        fn = _loss_fn(loss)
        for _ in range(TRAIN_STEPS):
            idx = torch.randint(0, len(x), (128,), generator=gen)
            opt.zero_grad()
            fn(model(x[idx]), _targets(loss, x[idx], y[idx])).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_model(net: str, trained: bool = True, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The reference network ``net`` (see the module doc) in ``dtype``."""
    with torch.random.fork_rng(devices=[]):  # its init is overwritten: no draw from the caller's generator
        model, _, _ = _build(net)
    model.load_state_dict(_state(net, trained))
    return model.to(dtype)


def reference_batch(net: str, batch: int = 256, dtype: torch.dtype = torch.float64):
    """``(inputs, targets, loss_fn)``: the first ``batch`` training samples of the digits split."""
    _, loss, image = _build(net)
    x, y = _digits(image)
    x, y = x[:batch].to(dtype), y[:batch]
    return x, _targets(loss, x, y), _loss_fn(loss)


def reference_stats(
    net: str,
    trained: bool = True,
    kind: str = "ggn",
    batch: int = 256,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict[str, LayerStats]:
    """Per-sample factors of every covered layer of ``net`` on one fixed batch (``kind``: ggn | empirical | mc)."""
    model = reference_model(net, trained, dtype)
    x, t, fn = reference_batch(net, batch, dtype)
    curv = Curvature(model, "kfac", kind, seed=seed)
    return curv.capture(x, t, fn).stats
