"""Damping rules for the Tikhonov term λ of ``(Ĉ + λI)^{-1}``.

* :class:`FixedDamping`: λ constant, or ``λ(step)`` for a callable.
* :class:`LevenbergMarquardt`: λ adapted from the reduction ratio (Moré 1978; Martens & Grosse 2015 §6.5)

      ρ = (L(θ + δ) − L(θ)) / (gᵀδ + ½ δᵀĈδ)

  on the same batch, with ``Ĉ`` the (undamped) structured curvature used by the solve (its
  products from ``Curvature.mv``). ``ρ < rho_low`` → ``λ ← λ·factor``; ``ρ > rho_high`` →
  ``λ ← λ/factor``; λ stays in ``[min_damping, max_damping]``. A skipped (non-finite) step counts
  as a failed one: ``λ ← λ·factor``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tensorcurv.core.options import Option


class DampingRule(Option):
    """How λ moves in training: ``fixed`` (:class:`FixedDamping`) or ``lm`` (:class:`LevenbergMarquardt`)."""

    FIXED = "fixed"
    LM = "lm"


class FixedDamping:
    """λ constant (or ``λ(step)`` for a callable); :meth:`observe` does nothing."""

    adaptive = False

    def __init__(self, damping: float | Callable[[int], float]) -> None:
        self.damping = damping

    def value(self, step: int) -> float:
        lam = self.damping(step) if callable(self.damping) else self.damping
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise ValueError(f"damping at step {step} must be a finite number > 0, got {lam!r}")
        return float(lam)

    def observe(self, rho: float) -> None:  # noqa: D401 - interface
        """Fixed damping ignores the reduction ratio."""

    def on_skip(self) -> None:
        """Fixed damping is not changed by a skipped step."""

    def state_dict(self) -> dict[str, Any]:
        return {"damping": None if callable(self.damping) else self.damping}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["damping"] is not None:
            self.damping = state["damping"]


class LevenbergMarquardt:
    """Adaptive λ from the reduction ratio ρ (see module docstring)."""

    adaptive = True

    def __init__(
        self,
        damping: float,
        factor: float = 1.5,
        rho_low: float = 0.25,
        rho_high: float = 0.75,
        min_damping: float = 1e-8,
        max_damping: float = 1e4,
    ) -> None:
        if not factor > 1:
            raise ValueError(f"lm_factor must be > 1, got {factor!r}")
        if not rho_low < rho_high:
            raise ValueError(f"rho_low must be < rho_high, got {rho_low!r} and {rho_high!r}")
        self.damping = float(damping)
        self.factor, self.rho_low, self.rho_high = factor, rho_low, rho_high
        self.min_damping, self.max_damping = min_damping, max_damping
        self.last_rho: float | None = None

    def value(self, step: int) -> float:
        return self.damping

    def _clamp(self, lam: float) -> float:
        return min(max(lam, self.min_damping), self.max_damping)

    def observe(self, rho: float) -> None:
        """Update λ from one reduction ratio (a non-finite ρ counts as a failure)."""
        self.last_rho = rho
        if not math.isfinite(rho) or rho < self.rho_low:
            self.damping = self._clamp(self.damping * self.factor)
        elif rho > self.rho_high:
            self.damping = self._clamp(self.damping / self.factor)

    def on_skip(self) -> None:
        self.damping = self._clamp(self.damping * self.factor)

    def state_dict(self) -> dict[str, Any]:
        return {"damping": self.damping, "last_rho": self.last_rho}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.damping = state["damping"]
        self.last_rho = state.get("last_rho")


def reduction_ratio(loss_before: float, loss_after: float, model_decrease: float) -> float:
    """``ρ = (L(θ+δ) − L(θ)) / (gᵀδ + ½δᵀĈδ)``; ``-inf`` when the model predicts no decrease."""
    if not (math.isfinite(loss_after) and math.isfinite(model_decrease)) or model_decrease >= 0:
        return -math.inf
    return (loss_after - loss_before) / model_decrease


def build(rule: str, damping: Any, **kw: Any) -> FixedDamping | LevenbergMarquardt:
    if rule == "fixed":
        return FixedDamping(damping)
    if rule == "lm":
        return LevenbergMarquardt(damping, **kw)
    raise ValueError(f"unknown damping rule {rule!r}; valid: ['fixed', 'lm']")
