"""SOAP, Shampoo and PSGD-Kron from the ``pytorch-optimizer`` package (the ``baselines`` extra).

The package is optional: ``pip install 'tensorcurv[baselines]'`` (``make setup`` installs it). Its
requirements are torch and numpy only, so installing it leaves the installed torch in place. Without it,
building one of these optimizers raises a one-line ``ImportError`` that names the extra; nothing else in
tensorcurv imports it. The recursions are in the configs' docstrings (``tensorcurv.optim.config_first_order``).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

PACKAGE = "pytorch_optimizer"
EXTRA = "baselines"
PACKAGED = ("soap", "shampoo", "psgd_kron")


def _missing(name: str) -> ImportError:
    return ImportError(
        f"optimizer {name!r} needs the pytorch-optimizer package: pip install 'tensorcurv[{EXTRA}]' (or make setup)"
    )


def check_available(name: str) -> None:
    """One-line ``ImportError`` naming the extra when ``name`` is packaged and the package is not installed
    (looked up without importing it)."""
    if name in PACKAGED and importlib.util.find_spec(PACKAGE) is None:
        raise _missing(name)


def _package(name: str) -> Any:
    try:
        return importlib.import_module(PACKAGE)
    except ImportError:
        raise _missing(name) from None


def make_packaged_optimizer(name: str, params: list[torch.nn.Parameter], c: Any) -> torch.optim.Optimizer:
    """The ``pytorch-optimizer`` optimizer of ``name`` (one of :data:`PACKAGED`) from its validated config."""
    lr = c.lr(0) if callable(c.lr) else c.lr
    po = _package(name)
    if name == "soap":
        return po.SOAP(
            params,
            lr=lr,
            betas=(c.beta1, c.beta2),
            shampoo_beta=c.shampoo_beta,
            weight_decay=c.weight_decay,
            precondition_frequency=c.precondition_frequency,
            max_precondition_dim=c.max_precondition_dim,
            precondition_1d=c.precondition_1d,
            eps=c.eps,
        )
    if name == "shampoo":
        return po.Shampoo(
            params,
            lr=lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            weight_decouple=False,
            preconditioning_compute_steps=c.update_interval,
            matrix_eps=c.eps,
        )
    if name == "psgd_kron":
        dtype = None if c.precondition_dtype == "param" else getattr(torch, c.precondition_dtype)
        kron = po.Kron(
            params,
            lr=lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            weight_decouple=True,
            pre_conditioner_update_probability=c.precondition_update_probability,
            max_size_triangular=c.max_size_triangular,
            memory_save_mode=c.memory_save_mode,
            precondition_dtype=dtype,
        )
        kron.register_load_state_dict_post_hook(_restore_precondition_dtype)
        return kron
    raise ValueError(f"unknown packaged optimizer {name!r}; valid: {list(PACKAGED)}")


def _restore_precondition_dtype(optimizer: torch.optim.Optimizer) -> None:
    """torch's ``load_state_dict`` casts every floating state tensor to its parameter's dtype; PSGD-Kron's
    factors ``Q`` must keep ``precondition_dtype`` (float32 factors of float64 parameters, say)."""
    for group in optimizer.param_groups:
        dtype = group.get("precondition_dtype")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if dtype is not None and "Q" in state:
                state["Q"] = [q.to(dtype) for q in state["Q"]]
