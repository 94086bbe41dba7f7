"""First-order baselines with the same ``step(inputs, targets)`` API as the second-order optimizers.

torch's implementations (SGD, heavy-ball momentum, Nesterov, AdaGrad, RMSProp, Adam, AdamW),
:class:`~tensorcurv.optim.lion.Lion`, Muon with AdamW (:mod:`tensorcurv.optim.muon`), and SOAP, Shampoo
and PSGD-Kron from the optional ``pytorch-optimizer`` package (:mod:`tensorcurv.optim.packaged`).
One step: forward, backward, optional clipping of the global gradient norm, ``optimizer.step()``,
then (``l1 > 0``) the soft-thresholding step of :mod:`tensorcurv.optim.proximal` (ISTA, or FISTA).
A non-finite loss or gradient skips the step (parameters, moments and counters untouched except
``skipped``) with a warning naming the parameter. Recursions (torch conventions; see ``config.py``
for the mapping to the course's, and for the recursions of Muon, SOAP, Shampoo and PSGD-Kron):

* momentum: ``b ← γ b + g``, ``θ ← θ − η b``  (course: ``v ← γ v + (1−γ) g``, ``θ ← θ − η' v``, ``η = (1−γ)η'``)
* nesterov: ``b ← γ b + g``, ``θ ← θ − η (g + γ b)`` (iterates = look-ahead points of the course's form)
* adagrad: ``s ← s + g²``, ``θ ← θ − η g/(√s + ε)``; rmsprop: ``s ← α s + (1−α) g²``, ``θ ← θ − η g/(√s + ε)``
* adam/adamw: bias-corrected moments, ``θ ← θ − η m̂/(√v̂ + ε)`` (adamw: ``θ ← θ(1 − η wd)`` first)
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from tensorcurv.core.losses import as_loss_spec
from tensorcurv.optim import config as cfgs
from tensorcurv.optim import muon, proximal
from tensorcurv.optim.lion import Lion
from tensorcurv.optim.packaged import PACKAGED, make_packaged_optimizer
from tensorcurv.optim.preconditioner import NonFiniteStepWarning, first_nonfinite


def make_torch_optimizer(name: str, params, c: Any, model: nn.Module | None = None) -> torch.optim.Optimizer:
    """The torch optimizer of baseline ``name`` from its validated config ``c`` (``muon`` needs ``model``)."""
    if name == "muon":
        if model is None:
            raise ValueError("muon splits the parameters by layer: pass the model")
        return muon.build(model, c)
    if name in PACKAGED:
        return make_packaged_optimizer(name, list(params), c)
    lr = c.lr(0) if callable(c.lr) else c.lr
    wd = c.weight_decay
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name in ("momentum", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=c.momentum, nesterov=name == "nesterov", weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=c.eps, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=c.alpha, eps=c.eps, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(c.beta1, c.beta2), eps=c.eps, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(c.beta1, c.beta2), eps=c.eps, weight_decay=wd)
    if name == "lion":
        return Lion(params, lr=lr, betas=(c.beta1, c.beta2), weight_decay=wd)
    raise ValueError(f"unknown baseline {name!r}; valid: {list(BASELINES)}")


BASELINES = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lion", "muon") + PACKAGED


class FirstOrder:
    """A torch optimizer behind ``step(inputs, targets) -> loss``; ``.optimizer`` is the torch one."""

    def __init__(self, name: str, model: nn.Module, loss_fn: Any, **kwargs: Any) -> None:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; valid: {list(BASELINES)}")
        self.name = name
        self.config = cfgs.make_config(name, **kwargs)
        self.model, self.loss = model, as_loss_spec(loss_fn)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.optimizer = make_torch_optimizer(name, self.params, self.config, model)
        self.proximal = proximal.attach(self.optimizer, self.config)  # L1 (ISTA / FISTA); None when l1 = 0
        self.steps = 0
        self.skipped = 0
        self.info: dict[str, Any] = {}

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        c = self.config
        if callable(c.lr):
            for group in self.optimizer.param_groups:
                group["lr"] = float(c.lr(self.steps))
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(inputs)
        value = self.loss(out.flatten(1) if out.dim() != 2 else out, targets)
        value.backward()
        loss = value.detach()
        bad = ([] if bool(torch.isfinite(loss)) else ["loss"]) + first_nonfinite(
            [(n, p.grad) for n, p in self.named_params]
        )
        if bad:
            warnings.warn(
                f"tensorcurv.optim: non-finite values in {bad} (loss={float(loss):.4g}); step {self.steps} skipped",
                NonFiniteStepWarning,
                stacklevel=2,
            )
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.info = {"skipped": True, "step": self.steps, "lr": lr, "loss": float(loss)}
            return loss
        info = {"skipped": False, "step": self.steps, "lr": lr, "loss": float(loss)}
        if c.grad_clip is not None:
            info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip))
        self.optimizer.step()
        self.steps += 1
        if self.proximal is not None:
            info.update(self.proximal.info)
        self.info = info
        return loss

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "name": self.name,
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
            "skipped": self.skipped,
        }
        if self.proximal is not None:
            state["proximal"] = self.proximal.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for optimizer {state.get('name')!r}, this is {self.name!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps, self.skipped = state["steps"], state["skipped"]
        if self.proximal is not None and "proximal" in state:
            self.proximal.load_state_dict(state["proximal"])

    def __repr__(self) -> str:
        return f"FirstOrder({self.config})"
