"""Training ``θ*`` on ``D`` and retraining on ``D̃``: full-batch L-BFGS on ``L(D; θ)`` of :mod:`.objective`.

``L(D; θ) = Σ_i ℓ_i + (μ/2)‖θ‖²`` is strictly convex for logistic regression with ``μ > 0``, so the
minimizer is unique and retraining is a well-defined reference; for an MLP it is a local minimizer
reached from the same initialization. Stops when ``‖∇L‖ ≤ gtol · max(1, ‖∇L(θ_0)‖)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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


def train_lbfgs(
    obj: Objective, X: Tensor, y: Tensor, theta0: Tensor, *, gtol: float = 1e-9, max_iter: int = 2000, history: int = 20
) -> TrainResult:
    """Minimize ``L(D; θ)`` from ``theta0`` (strong-Wolfe L-BFGS, full batch). The model is untouched."""
    t0 = time.perf_counter()
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
    return TrainResult(th, gn, int(its), time.perf_counter() - t0, gn <= 10 * target)
