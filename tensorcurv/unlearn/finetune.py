"""Fine-tuning baseline: continue training ``θ*`` on the corrected data ``D̃`` for a few epochs.

    θ = Adam^{epochs}(θ*; L(D̃; θ)/N)        (minibatch Adam of :func:`.training.adam_epochs`)

It uses no curvature and no knowledge of which points changed beyond ``D̃`` itself; its cost grows
with ``|D̃|`` and the number of epochs. Same outcome type as the other updates: the model is written
only if ``inplace`` and the result is finite.
"""

from __future__ import annotations

import time

from torch import Tensor, nn

from tensorcurv.unlearn.objective import Objective
from tensorcurv.unlearn.training import adam_epochs
from tensorcurv.unlearn.updates import AffectedSet, UpdateResult, finish_update


def finetune_update(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    affected: AffectedSet,
    *,
    loss="cross_entropy",
    mu: float = 0.0,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    inplace: bool = True,
) -> UpdateResult:
    """``epochs`` of minibatch Adam on ``L(D̃; θ)`` from the model's ``θ*`` (see the module docstring)."""
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"finetune: epochs must be an integer >= 1, got {epochs!r}")
    t0 = time.perf_counter()
    obj = Objective(model, loss, mu)
    theta_star = obj.theta()
    Xr, yr = affected.apply(X, y)
    theta = adam_epochs(obj, Xr, yr, theta_star, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    res = UpdateResult(f"finetune:{epochs}", "ok", theta, theta_star, steps=epochs, info={"epochs": epochs})
    return finish_update(obj, res, inplace, t0)
