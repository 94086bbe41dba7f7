"""Optimizers: natural gradient and Gauss-Newton with any curvature structure, and first-order baselines.

    opt = tensorcurv.optim.build("gauss_newton", model, loss_fn, structure="kfac", damping=1e-3)
    opt = tensorcurv.optim.build("adam", model, loss_fn, lr=1e-3)
    opt = tensorcurv.optim.build("muon", model, loss_fn, lr=0.02, adamw_lr=1e-3)  # Muon + AdamW, one optimizer
    opt = tensorcurv.optim.build("soap", model, loss_fn)  # also shampoo, psgd_kron: the `baselines` extra
    loss = opt.step(inputs, targets)   # every optimizer; .optimizer is the torch one (for schedulers)
    opt.info                           # last step's metrics (damping, skipped, timings, rho, ...)
    opt.state_dict() / opt.load_state_dict(state)

:class:`Preconditioner` composes the curvature solve with any ``torch.optim`` optimizer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tensorcurv.optim import config, damping, schedules
from tensorcurv.optim.baselines import BASELINES, FirstOrder
from tensorcurv.optim.config import CONFIGS, make_config
from tensorcurv.optim.lion import Lion
from tensorcurv.optim.muon import MuonAdamW
from tensorcurv.optim.preconditioner import NonFiniteStepWarning, Preconditioner
from tensorcurv.optim.second_order import GaussNewton, NaturalGradient, SecondOrderOptimizer

_SECOND_ORDER = {"natural_gradient": NaturalGradient, "gauss_newton": GaussNewton}


def names() -> list[str]:
    """Every optimizer :func:`build` knows.

    Returns:
        ``natural_gradient``, ``gauss_newton`` and the baselines (first-order, Muon, SOAP, Shampoo, PSGD-Kron).
    """
    return list(_SECOND_ORDER) + list(BASELINES)


def build(name: str, model: nn.Module, loss_fn: Any, **kwargs: Any) -> SecondOrderOptimizer | FirstOrder:
    """Build an optimizer by name.

    Args:
        name: one of :func:`names`.
        model: the model to train.
        loss_fn: the loss, e.g. ``nn.CrossEntropyLoss()``.
        **kwargs: the keys of the optimizer's config dataclass (``config.CONFIGS[name]``); second-order
            optimizers forward any other key to the curvature structure's hyper-parameters.

    Returns:
        An optimizer with ``step(inputs, targets) -> loss``, ``info``, ``state_dict`` and ``load_state_dict``.

    Raises:
        ValueError: an unknown name or key (the message lists the valid ones).
    """
    if name in _SECOND_ORDER:
        return _SECOND_ORDER[name](model, loss_fn, **kwargs)
    if name in BASELINES:
        return FirstOrder(name, model, loss_fn, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; valid: {names()}")


__all__ = [
    "CONFIGS",
    "FirstOrder",
    "GaussNewton",
    "Lion",
    "MuonAdamW",
    "NaturalGradient",
    "NonFiniteStepWarning",
    "Preconditioner",
    "SecondOrderOptimizer",
    "build",
    "config",
    "damping",
    "make_config",
    "names",
    "schedules",
]
