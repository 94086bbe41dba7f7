"""Learning-rate schedules (torch's schedulers), stepped once per optimizer step.

    sched = schedules.build(opt.optimizer, "cosine_warmup", total_steps=1000, warmup_steps=50)
    for x, y in batches: opt.step(x, y); sched.step()

* ``constant``: ``η_t = η``.
* ``step``: ``η_t = η γ^{⌊t / step_size⌋}`` (``StepLR``; ``step_size`` defaults to ``total_steps // 3``).
* ``cosine_warmup``: linear warm-up from ``warmup_start·η`` to ``η`` over ``warmup_steps``, then
  ``η_min + (η − η_min)(1 + cos(π s / S))/2`` over the remaining ``S`` steps (``LinearLR`` then
  ``CosineAnnealingLR`` in ``SequentialLR``).
* ``cosine_restarts``: SGDR (Loshchilov & Hutter 2017), period ``T_0`` growing by ``T_mult``
  (``CosineAnnealingWarmRestarts``; ``T_0`` defaults to ``total_steps // 4``).
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer, lr_scheduler

from tensorcurv.core.options import Option


class Schedule(Option):
    """Learning-rate schedules of :func:`build`."""

    CONSTANT = "constant"
    STEP = "step"
    COSINE_WARMUP = "cosine_warmup"
    COSINE_RESTARTS = "cosine_restarts"


def names() -> list[str]:
    return Schedule.values()


def _only(name: str, kw: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"schedule {name!r} does not take {unknown}; valid keys: {list(allowed)}")


def build(optimizer: Optimizer, name: str, total_steps: int, **kw: Any) -> lr_scheduler.LRScheduler:
    """A torch LR scheduler for ``optimizer`` (``opt.optimizer`` of any tensorcurv optimizer)."""
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if name == "constant":
        _only(name, kw, ())
        return lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    if name == "step":
        _only(name, kw, ("step_size", "gamma"))
        step_size = kw.get("step_size", max(1, total_steps // 3))
        return lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=kw.get("gamma", 0.1))
    if name == "cosine_warmup":
        _only(name, kw, ("warmup_steps", "warmup_start", "eta_min"))
        warm = kw.get("warmup_steps", max(1, total_steps // 20))
        if not 0 <= warm < total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps), got {warm!r}")
        cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warm, eta_min=kw.get("eta_min", 0.0))
        if warm == 0:
            return cosine
        linear = lr_scheduler.LinearLR(
            optimizer, start_factor=kw.get("warmup_start", 1e-3), end_factor=1.0, total_iters=warm
        )
        return lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warm])
    if name == "cosine_restarts":
        _only(name, kw, ("T_0", "T_mult", "eta_min"))
        return lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer,
            T_0=kw.get("T_0", max(1, total_steps // 4)),
            T_mult=kw.get("T_mult", 1),
            eta_min=kw.get("eta_min", 0.0),
        )
    raise ValueError(f"unknown schedule {name!r}; valid: {Schedule.values()}")
