"""L1 penalty (LASSO) for every optimizer: a proximal step after each update of its torch optimizer.

Objective: ``L(θ) + α‖θ‖₁`` over every trainable parameter the optimizer updates (biases included).
The smooth part ``L`` is what the optimizer sees; the penalty enters only through

    prox_{τ‖·‖₁}(z) = sign(z) · max(|z| − τ, 0)          (soft-thresholding, elementwise)

applied by a step post-hook of the torch optimizer (``optimizer.register_step_post_hook``), so every
update rule (SGD … Muon, SOAP, and the second-order step) gets the same option:

* ISTA (first-order): the optimizer's update gives ``z = θ − η d``; then ``θ ← prox_{ηα}(z)`` with ``η``
  the learning rate of the parameter's group. For SGD this is ISTA exactly; for adaptive rules (Adam,
  Muon, ...) the threshold still uses the group's ``η``, not the per-coordinate scale of ``d``.
* FISTA (``fista=True``, Beck & Teboulle 2009): ``x_k = prox(z)``, ``t_{k+1} = (1 + √(1 + 4t_k²))/2``
  from ``t_1 = 1``, ``θ ← x_k + ((t_k − 1)/t_{k+1})(x_k − x_{k−1})``: the parameters hold the
  extrapolated point where the next gradient is taken; :meth:`ProximalL1.iterate` is ``x_k``.
* Proximal Gauss-Newton (``metric`` given): the second-order update is the damped GN step
  ``z = θ − η (Ĉ + λI)^{-1} g``; then ``θ ← argmin_u (1/2η)‖u − z‖²_M + α‖u‖₁`` with ``M = Ĉ + λI``: the
  prox in the metric of the damped curvature, with the GN step size ``η`` as scale. Its fixed points are
  the solutions of ``0 ∈ ∇L(θ) + α∂‖θ‖₁`` (for a linear least-squares model with exact GGN: the LASSO
  solution). With ``M = λI`` (no curvature) it is ``prox_{ηα/λ}(z)``: ISTA with the step length ``η/λ``
  of the damped step. The metric prox is computed by ``prox_steps`` FISTA iterations (step ``1/L``,
  ``L = 1.1 · λ_max(M)`` from warm-started power iterations on ``Ĉ``), started from whichever of
  ``θ`` (the point before the update) and ``prox_{ηα/L}(z)`` has the lower value of the prox objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Metric = Callable[[list[Tensor]], list[Tensor]]
"""``v ↦ Ĉ v`` (the undamped curvature) for a list of tensors shaped like the parameters."""

POWER_MARGIN = 1.1
"""Safety factor on the power-iteration estimate of ``λ_max(Ĉ)`` (an estimate from below)."""


def soft_threshold(z: Tensor, tau: float) -> Tensor:
    """``prox_{τ‖·‖₁}(z) = sign(z) · max(|z| − τ, 0)``, elementwise (``τ >= 0``)."""
    return torch.sign(z) * torch.clamp(z.abs() - tau, min=0.0)


def fista_momentum(t: float) -> tuple[float, float]:
    """``(t_{k+1}, (t_k − 1)/t_{k+1})`` of FISTA's sequence ``t_{k+1} = (1 + √(1 + 4t_k²))/2``."""
    t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
    return t_next, (t - 1.0) / t_next


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum(torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)))


class ProximalL1:
    """``α‖θ‖₁`` by a proximal step after each ``optimizer.step()`` (module docstring: ISTA, FISTA, GN).

    Args:
        optimizer: the torch optimizer; its groups' ``lr`` scale the threshold.
        alpha: penalty weight ``α > 0``.
        fista: Nesterov extrapolation of the proximal iterates (FISTA's ``t_k`` sequence).
        metric: ``v ↦ Ĉ v`` for the proximal Gauss-Newton step (None: Euclidean prox).
        damping: ``() ↦ λ`` of the step just taken (with ``metric``).
        prox_steps: FISTA iterations of the metric prox.
        power_steps: power iterations per step for ``λ_max(Ĉ)`` (warm-started).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        alpha: float,
        fista: bool = False,
        metric: Metric | None = None,
        damping: Callable[[], float] | None = None,
        prox_steps: int = 10,
        power_steps: int = 10,
    ) -> None:
        self.alpha, self.fista = float(alpha), fista
        self.metric, self.damping = metric, damping
        self.prox_steps, self.power_steps = prox_steps, power_steps
        self.t = 1.0
        self.previous: list[Tensor] | None = None
        self.power: list[Tensor] | None = None
        self.before: list[Tensor] | None = None
        self.info: dict[str, Any] = {}
        if metric is not None:
            optimizer.register_step_pre_hook(self._remember)
        optimizer.register_step_post_hook(self._after_step)

    @staticmethod
    def _params(optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, float]]:
        return [(p, float(g["lr"])) for g in optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def _remember(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.before = [p.detach().clone() for p, _ in self._params(optimizer)]

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        pairs = self._params(optimizer)
        if self.metric is None:
            xs = [soft_threshold(p, lr * self.alpha) for p, lr in pairs]
        else:
            xs = self._metric_prox([p.detach() for p, _ in pairs], pairs[0][1])
        if self.fista:
            self._extrapolate([p for p, _ in pairs], xs)
        else:
            for (p, _), x in zip(pairs, xs):
                p.copy_(x)

    def _extrapolate(self, params: list[Tensor], xs: list[Tensor]) -> None:
        """``θ ← x_k + ((t_k − 1)/t_{k+1})(x_k − x_{k−1})`` and ``x_{k−1} ← x_k``."""
        self.t, beta = fista_momentum(self.t)
        prev = self.previous if self.previous is not None else xs
        for p, x, x0 in zip(params, xs, prev):
            p.copy_(x + beta * (x - x0))
        self.previous = [x.clone() for x in xs]
        self.info["fista_beta"] = beta

    def iterate(self, params: list[Tensor]) -> list[Tensor]:
        """The proximal iterate ``x_k`` (FISTA: the parameters hold the extrapolated point; else them)."""
        return [x.clone() for x in self.previous] if self.previous is not None else [p.detach().clone() for p in params]

    # ------------------------------------------------------------------ proximal Gauss-Newton
    def _lambda_max(self, z: list[Tensor]) -> float:
        """Power iterations on ``Ĉ`` warm-started from the last vector; returns ``‖Ĉ v‖`` at the end."""
        assert self.metric is not None
        if self.power is None:
            gen = torch.Generator().manual_seed(0)
            self.power = [torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) for x in z]
        v, est = self.power, 0.0
        for _ in range(self.power_steps):
            norm = math.sqrt(_dot(v, v))
            if norm == 0.0 or not math.isfinite(norm):
                break
            w = self.metric([x / norm for x in v])
            est = math.sqrt(_dot(w, w))
            v = w
        self.power = [x / max(math.sqrt(_dot(v, v)), 1e-300) for x in v]
        return est

    def _metric_prox(self, z: list[Tensor], lr: float) -> list[Tensor]:
        """``argmin_u (1/2η)‖u − z‖²_M + α‖u‖₁``, ``M = Ĉ + λI``, by FISTA with step ``1/L``."""
        metric, damping = self.metric, self.damping
        assert metric is not None and damping is not None
        lam = float(damping())

        def M(v: list[Tensor]) -> list[Tensor]:
            return [c + lam * x for c, x in zip(metric(v), v)]

        L = POWER_MARGIN * self._lambda_max(z) + lam
        tau = lr * self.alpha / L

        def objective(u: list[Tensor]) -> float:
            d = [a - b for a, b in zip(u, z)]
            return _dot(d, M(d)) / (2 * lr) + self.alpha * sum(float(x.abs().sum()) for x in u)

        u = [soft_threshold(x, tau) for x in z]
        if self.before is not None and objective(self.before) < objective(u):
            u = self.before
        y, t = u, 1.0
        for _ in range(self.prox_steps):
            My = M([a - b for a, b in zip(y, z)])
            u_next = [soft_threshold(a - m / L, tau) for a, m in zip(y, My)]
            t, beta = fista_momentum(t)
            y = [a + beta * (a - b) for a, b in zip(u_next, u)]
            u = u_next
        self.info.update(prox_lambda_max=L, prox_threshold=tau)
        return u

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "previous": self.previous, "power": self.power}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.previous, self.power = state["t"], state["previous"], state["power"]


def attach(optimizer: torch.optim.Optimizer, config: Any, **metric: Any) -> ProximalL1 | None:
    """The L1 proximal step of ``config`` (fields ``l1``, ``l1_fista``) on ``optimizer``; None when ``l1 = 0``
    (the optimizer is then untouched). ``metric``: ``metric``, ``damping``, ``prox_steps`` for Gauss-Newton."""
    if not config.l1:
        return None
    return ProximalL1(optimizer, config.l1, fista=config.l1_fista, **metric)


__all__ = ["ProximalL1", "attach", "fista_momentum", "soft_threshold"]
