"""The inverse-HVP solver interface: :class:`IHVPSolver` and its :class:`IHVPResult`.

A solver approximates ``x ≈ (H + λI)^{-1} v`` (``H``: Hessian or GGN of the objective, ``μI``
included; ``λ``: extra damping, 0 by default). It is prepared once on (objective, θ, data), timed,
then solves any number of vectors ``v`` of the shape of ``θ``; a non-finite ``x`` is reported as
not converged. The solvers are in :mod:`tensorcurv.unlearn.ihvp` and
:mod:`tensorcurv.unlearn.structure_solver`.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tensorcurv.structures.base import check_damping
from tensorcurv.unlearn.objective import Objective


@dataclass
class IHVPResult:
    """``x ≈ (H + λI)^{-1} v``; ``converged`` is False when the solver failed (then do not use ``x``)."""

    x: Tensor
    converged: bool
    method: str
    iterations: int = 0
    residual: float = math.nan  # ‖(H + λI)x − v‖ / ‖v‖ where the solver knows it
    message: str = ""
    time: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class IHVPSolver(ABC):
    """Base class: ``prepare`` on (objective, θ, data), then ``solve`` any number of vectors."""

    name = ""

    def __init__(self, damping: float = 0.0) -> None:
        check_damping(damping, allow_zero=True)
        self.damping = float(damping)
        self.prepared = False
        self.prepare_time = 0.0

    def prepare(self, obj: Objective, theta: Tensor, X: Tensor, y: Tensor) -> IHVPSolver:
        t0 = time.perf_counter()
        self.obj, self.theta, self.X, self.y = obj, theta.detach(), X, y
        self._prepare()
        self.prepared = True
        self.prepare_time = time.perf_counter() - t0
        return self

    def _prepare(self) -> None:
        """Solver-specific set-up (factorization, fitting, scale estimate)."""

    def solve(self, v: Tensor) -> IHVPResult:
        if not self.prepared:
            raise RuntimeError(f"{self.name}: call prepare(objective, theta, X, y) before solve()")
        if v.shape != self.theta.shape:
            raise ValueError(f"{self.name}: v must have shape {tuple(self.theta.shape)}, got {tuple(v.shape)}")
        t0 = time.perf_counter()
        res = self._solve(v)
        res.time = time.perf_counter() - t0
        if res.converged and not bool(torch.isfinite(res.x).all()):
            res.converged, res.message = False, "non-finite result"
        return res

    @abstractmethod
    def _solve(self, v: Tensor) -> IHVPResult: ...

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "damping": self.damping}
