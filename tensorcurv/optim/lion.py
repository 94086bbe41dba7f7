"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

Per parameter, with gradient ``g``, momentum ``m`` (``m_0 = 0``), learning rate ``η`` and
decoupled weight decay ``wd``:

    c = β1 m + (1 − β1) g
    θ ← θ − η (sign(c) + wd θ)
    m ← β2 m + (1 − β2) g
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class Lion(Optimizer):
    """Sign-momentum optimizer (defaults of the paper: ``lr=1e-4``, ``betas=(0.9, 0.99)``)."""

    def __init__(
        self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                c = m.mul(b1).add_(g, alpha=1 - b1)
                p.add_(c.sign_().add_(p, alpha=wd), alpha=-lr)
                m.mul_(b2).add_(g, alpha=1 - b2)
        return loss
