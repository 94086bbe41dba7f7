"""Training ``θ*`` on ``D`` and retraining on ``D̃``: full-batch L-BFGS on ``L(D; θ)`` of :mod:`.objective`.

``L(D; θ) = Σ_i ℓ_i + (μ/2)‖θ‖²`` is strictly convex for logistic regression with ``μ > 0``, so the
minimizer is unique and retraining is a well-defined reference; for an MLP it is a local minimizer
reached from the same initialization. Stops when ``‖∇L‖ ≤ gtol · max(1, ‖∇L(θ_0)‖)``.

For networks, :func:`train_adam_lbfgs` first runs ``epochs`` of minibatch Adam on the same objective
(:func:`adam_epochs`: each step descends ``(N/B) Σ_{i∈B} ℓ_i + (μ/2)‖θ‖²``, an unbiased estimate of
``L(D; θ)``, scaled by ``1/N`` so the learning rate does not depend on ``N``), then polishes with
L-BFGS; fine-tuning baselines (:mod:`.finetune`) reuse :func:`adam_epochs`.

Every result records the wall-clock ``time`` and the process CPU time ``cpu_time``; for single-threaded
torch the CPU time is what the wall-clock would be on an otherwise idle machine (the load-independent cost).
:func:`cached_training` stores a result on disk under a key of the data, ``θ_0`` and the recipe
(:func:`training_key`), so an identical training (e.g. the clean-data model that is the retrained reference
of one scenario and the trained model of another) runs once.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from tensorcurv.unlearn.objective import Objective


@dataclass
class TrainResult:
    theta: Tensor
    grad_norm: float
    iterations: int
    time: float
    converged: bool
    cpu_time: float = math.nan  # process CPU time of the training (≈ wall-clock on an idle machine)


def train_lbfgs(
    obj: Objective, X: Tensor, y: Tensor, theta0: Tensor, *, gtol: float = 1e-9, max_iter: int = 2000, history: int = 20
) -> TrainResult:
    """Minimize ``L(D; θ)`` from ``theta0`` (strong-Wolfe L-BFGS, full batch). The model is untouched."""
    t0, c0 = time.perf_counter(), time.process_time()
    theta = theta0.detach().clone().requires_grad_(True)
    g0 = float(obj.grad(theta0.detach(), X, y).norm())
    target = gtol * max(1.0, g0)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        history_size=history,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )
    state = {"evals": 0}

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            val = obj.value(theta, X, y)
            val.backward()
        state["evals"] += 1
        if float(theta.grad.norm()) <= target:  # converged: zero the gradient so L-BFGS stops
            theta.grad.zero_()
        return val

    opt.step(closure)
    th = theta.detach()
    gn = float(obj.grad(th, X, y).norm())
    its = opt.state[opt._params[0]].get("n_iter", 0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return TrainResult(th, gn, int(its), wall, gn <= 10 * target, cpu)


def adam_epochs(
    obj: Objective,
    X: Tensor,
    y: Tensor,
    theta0: Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> Tensor:
    """``epochs`` passes of minibatch Adam on ``L(D; θ)/N`` from ``theta0`` (shuffled with ``seed``); returns ``θ``."""
    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    N = X.shape[0]
    for _ in range(epochs):
        for idx in torch.randperm(N, generator=gen).split(batch_size):
            idx = idx.to(X.device)
            opt.zero_grad()
            with torch.enable_grad():
                val = obj.data_loss(theta, X[idx], y[idx]) / len(idx) + obj.regularizer(theta) / N
                val.backward()
            opt.step()
    return theta.detach()


def train_adam_lbfgs(
    obj: Objective,
    X: Tensor,
    y: Tensor,
    theta0: Tensor,
    *,
    epochs: int,
    lbfgs_iter: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    gtol: float = 1e-6,
    seed: int = 0,
) -> TrainResult:
    """``epochs`` of :func:`adam_epochs` then at most ``lbfgs_iter`` L-BFGS iterations (:func:`train_lbfgs`),
    both on ``L(D; θ)``; ``time`` / ``cpu_time`` are the totals. L-BFGS stops at ``‖∇L‖ ≤ gtol · ‖∇L‖`` of
    its start (the Adam iterate; see :func:`train_lbfgs`)."""
    t0, c0 = time.perf_counter(), time.process_time()
    theta = adam_epochs(obj, X, y, theta0, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    res = train_lbfgs(obj, X, y, theta, gtol=gtol, max_iter=lbfgs_iter) if lbfgs_iter else None
    if res is None:
        gn = float(obj.grad(theta, X, y).norm())
        return TrainResult(theta, gn, 0, time.perf_counter() - t0, False, time.process_time() - c0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return TrainResult(res.theta, res.grad_norm, res.iterations, wall, res.converged, cpu)


def training_key(X: Tensor, y: Tensor, theta0: Tensor, **recipe) -> str:
    """A hex digest of the data, the initialization and the recipe (keyword values through ``repr``)."""
    h = hashlib.sha256()
    for t in (X, y, theta0):
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(sorted(recipe.items())).encode())
    return h.hexdigest()[:24]


def cached_training(cache_dir: str | Path | None, key: str, train: Callable[[], TrainResult]) -> TrainResult:
    """``train()`` once per ``key``: its result is saved as ``<cache_dir>/<key>.pt`` and loaded on later calls
    (with the times measured when it ran); ``cache_dir=None``: always train."""
    if cache_dir is None:
        return train()
    path = Path(cache_dir) / f"{key}.pt"
    if path.exists():
        return TrainResult(**torch.load(path, weights_only=True))
    res = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(asdict(res), tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return res
