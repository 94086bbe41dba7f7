"""Unlearning updates by approximate retraining (Warnecke et al., NDSS 2023).

A model ``θ*`` minimizes ``L(D; θ) = Σ_{i∈D} ℓ(z_i; θ) + (μ/2)‖θ‖²`` (sum over points). An affected
set ``Z ⊂ D`` is replaced by its corrected version ``Z̃`` (points removed: ``Z̃ = ∅``; labels
and/or features changed: same size as ``Z``), giving ``D̃ = (D \\ Z) ∪ Z̃``. Then

    Δg = ∇L(Z̃; θ*) − ∇L(Z; θ*) = Σ_{z̃∈Z̃} ∇ℓ(z̃; θ*) − Σ_{z∈Z} ∇ℓ(z; θ*)   (= ∇L(D̃; θ*) at a minimizer)

    first order:   θ = θ* − τ Δg
    second order:  θ = θ* − τ H^{-1} Δg,   H = ∇²L(D̃; θ*)   (one Newton step on L(D̃) from θ*)

so removing one point gives the influence-function formula ``θ* + H^{-1}∇ℓ(z; θ*)`` (Koh & Liang
2017). (The French formulation in the seed writes ``Δg`` with the opposite sign; with its update
``θ − τΔg`` that would move towards the *poisoned* data — this module uses the NDSS sign.)

The iterative variant splits ``Z`` into ``steps`` chunks and applies the update chunk by chunk,
recomputing ``Δg`` and the inverse-HVP solver at the current ``θ`` on the data corrected so far.

Updates never touch the model unless they succeed: the result carries a ``status``;
``inplace=True`` writes ``θ`` into the model only when ``status == "ok"``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tensorcurv.unlearn.ihvp_base import IHVPResult, IHVPSolver
from tensorcurv.unlearn.objective import Objective


@dataclass
class AffectedSet:
    """Indices ``Z`` into the training set and their correction ``Z̃``.

    ``X_new``/``y_new`` (``k`` rows each, ``k = len(indices)``) replace the features/labels of the
    affected points; leaving both None means *removal* (``Z̃ = ∅``).
    """

    indices: Tensor
    X_new: Tensor | None = None
    y_new: Tensor | None = None

    def __post_init__(self) -> None:
        self.indices = torch.as_tensor(self.indices, dtype=torch.long).reshape(-1)
        k = self.indices.numel()
        if k == 0:
            raise ValueError("the affected set is empty")
        if torch.unique(self.indices).numel() != k:
            raise ValueError("affected indices contain duplicates")
        for label, t in (("X_new", self.X_new), ("y_new", self.y_new)):
            if t is not None and t.shape[0] != k:
                raise ValueError(
                    f"{label} has {t.shape[0]} rows but there are {k} affected indices; "
                    f"Z and Z̃ must have the same size for a correction (use removal to delete)"
                )

    @classmethod
    def removal(cls, indices) -> AffectedSet:
        return cls(indices)

    @classmethod
    def relabel(cls, indices, y_new: Tensor) -> AffectedSet:
        return cls(indices, y_new=y_new)

    @property
    def is_removal(self) -> bool:
        return self.X_new is None and self.y_new is None

    def __len__(self) -> int:
        return self.indices.numel()

    def check(self, X: Tensor, y: Tensor) -> None:
        """Raise ``ValueError`` if the set does not fit the training data ``(X, y)``."""
        N = X.shape[0]
        if y.shape[0] != N:
            raise ValueError(f"X has {N} rows but y has {y.shape[0]}")
        lo, hi = int(self.indices.min()), int(self.indices.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"affected indices out of range: found {lo}..{hi}, training set has {N} points")
        if self.X_new is not None and self.X_new.shape[1:] != X.shape[1:]:
            raise ValueError(f"X_new rows have shape {tuple(self.X_new.shape[1:])}, training rows {tuple(X.shape[1:])}")
        if self.y_new is not None and self.y_new.shape[1:] != y.shape[1:]:
            raise ValueError(
                f"y_new rows have shape {tuple(self.y_new.shape[1:])}, training targets {tuple(y.shape[1:])}"
            )
        if self.y_new is not None and self.y_new.dtype != y.dtype:
            raise ValueError(f"y_new has dtype {self.y_new.dtype}, training targets {y.dtype}")

    def original(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``Z``: the affected points as they are in the training data."""
        self.check(X, y)
        return X[self.indices], y[self.indices]

    def corrected(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``Z̃``: the corrected points (empty for removal)."""
        self.check(X, y)
        if self.is_removal:
            return X[:0], y[:0]
        Xz = self.X_new.to(X.dtype) if self.X_new is not None else X[self.indices]
        yz = self.y_new if self.y_new is not None else y[self.indices]
        return Xz, yz

    def apply(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``D̃``: the training data with ``Z`` replaced by ``Z̃`` (removed rows dropped, order kept)."""
        self.check(X, y)
        if self.is_removal:
            keep = torch.ones(X.shape[0], dtype=torch.bool)
            keep[self.indices] = False
            return X[keep], y[keep]
        Xt, yt = X.clone(), y.clone()
        Xz, yz = self.corrected(X, y)
        Xt[self.indices], yt[self.indices] = Xz, yz
        return Xt, yt

    def subset(self, positions: Tensor) -> AffectedSet:
        """The affected points at ``positions`` (0..k−1) of this set."""
        return AffectedSet(
            self.indices[positions],
            None if self.X_new is None else self.X_new[positions],
            None if self.y_new is None else self.y_new[positions],
        )


def gradient_difference(obj: Objective, theta: Tensor, X: Tensor, y: Tensor, affected: AffectedSet) -> Tensor:
    """``Δg = Σ_{Z̃} ∇ℓ(z̃; θ) − Σ_Z ∇ℓ(z; θ)`` (sum convention; the regularizer cancels)."""
    Zx, Zy = affected.original(X, y)
    Zx_new, Zy_new = affected.corrected(X, y)
    return obj.data_grad(theta, Zx_new, Zy_new) - obj.data_grad(theta, Zx, Zy)


@dataclass
class UpdateResult:
    """Outcome of an unlearning update; ``theta`` is only written to the model when ``ok``."""

    method: str
    status: str  # "ok" or a reason for failure ("ihvp not converged: ...", "non-finite update")
    theta: Tensor  # proposed parameters (equal to θ* if the update failed before producing any)
    theta_star: Tensor
    applied: bool = False
    steps: int = 1
    tau: float = 1.0
    time: float = 0.0
    times: dict[str, float] = field(default_factory=dict)  # grad_diff / prepare / solve
    ihvp: list[IHVPResult] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def finish_update(obj: Objective, res: UpdateResult, inplace: bool, t0: float) -> UpdateResult:
    """The common end of every update: a non-finite result fails, the model is written only when ``inplace`` and
    the update succeeded, and the wall-clock since ``t0`` is recorded."""
    if res.ok and not bool(torch.isfinite(res.theta).all()):
        res.status = "non-finite update"
    if res.ok and inplace:
        obj.load(res.theta)
        res.applied = True
    res.time = time.perf_counter() - t0
    return res


def first_order_update(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    affected: AffectedSet,
    *,
    loss="cross_entropy",
    mu: float = 0.0,
    tau: float | str = "cauchy",
    inplace: bool = True,
) -> UpdateResult:
    """First-order unlearning update ``θ = θ* − τ Δg``.

    Args:
        model: the trained model at ``θ*``.
        X: the training inputs ``D``.
        y: the training targets of ``D``.
        affected: the points to remove or correct.
        loss (str | nn.Module): the per-sample loss of ``L(D; θ) = Σ_i ℓ_i + (μ/2)‖θ‖²``.
        mu: the L2 regularization ``μ ≥ 0``.
        tau: a step size, or ``"cauchy"``: the minimizer of the quadratic model of ``L(D̃)`` along
            ``−Δg``, ``τ = ΔgᵀΔg / ΔgᵀHΔg`` (one Hessian-vector product on ``D̃``).
        inplace: write ``θ`` into the model when the update succeeded.

    Returns:
        The outcome; ``status`` is ``"ok"`` or the reason for failure (the model is then unchanged).
    """
    t0 = time.perf_counter()
    obj = Objective(model, loss, mu)
    theta_star = obj.theta()
    dg = gradient_difference(obj, theta_star, X, y, affected)
    t_grad = time.perf_counter() - t0
    if tau == "cauchy":
        Xr, yr = affected.apply(X, y)
        curv = float(dg.dot(obj.hvp(theta_star, Xr, yr, dg)))
        tau_v = float(dg.dot(dg)) / curv if curv > 0 else math.nan
    elif isinstance(tau, (int, float)):
        tau_v = float(tau)
    else:
        raise ValueError(f"tau must be a number or 'cauchy', got {tau!r}")
    if not math.isfinite(tau_v):
        return finish_update(
            obj,
            UpdateResult("first_order", "non-positive curvature along Δg", theta_star.clone(), theta_star, tau=tau_v),
            inplace,
            t0,
        )
    theta = theta_star - tau_v * dg
    res = UpdateResult(
        "first_order",
        "ok",
        theta,
        theta_star,
        tau=tau_v,
        times={"grad_diff": t_grad},
        info={"grad_diff_norm": float(dg.norm())},
    )
    return finish_update(obj, res, inplace, t0)


def _check_second_order_arguments(affected: AffectedSet, steps: int, tau: float, hessian_on: str) -> None:
    if hessian_on not in ("remaining", "original"):
        raise ValueError(f"hessian_on must be 'remaining' or 'original', got {hessian_on!r}")
    if not (isinstance(steps, int) and 1 <= steps <= len(affected)):
        raise ValueError(f"steps must be an integer in [1, {len(affected)}] (number of affected points), got {steps!r}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number, got {tau!r}")


def _chunk_step(
    obj: Objective,
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    affected: AffectedSet,
    chunks: tuple[Tensor, ...],
    j: int,
    solver: IHVPSolver,
    hessian_on: str,
    times: dict[str, float],
) -> IHVPResult:
    """Step ``j`` of the iterative update: ``(H + λI)^{-1} Δg_j`` for the ``j``-th chunk of ``Z``, with
    ``Δg_j`` on the data corrected by chunks ``0 … j−1`` and ``H`` on ``hessian_on`` data; adds to ``times``."""
    done = affected.subset(torch.cat(list(chunks[: j + 1])))
    part = affected.subset(chunks[j])
    before = affected.subset(torch.cat(list(chunks[:j]))) if j > 0 else None
    # the data set as corrected before this step, and the chunk's Δg on it
    Xc, yc = (X, y) if before is None else before.apply(X, y)
    part_here = _reindex(part, before, X.shape[0])
    ta = time.perf_counter()
    dg = gradient_difference(obj, theta, Xc, yc, part_here)
    times["grad_diff"] += time.perf_counter() - ta
    Xh, yh = done.apply(X, y) if hessian_on == "remaining" else (Xc, yc)
    solver.prepare(obj, theta, Xh, yh)
    times["prepare"] += solver.prepare_time
    r = solver.solve(dg)
    times["solve"] += r.time
    return r


def _iterate(
    obj: Objective,
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    affected: AffectedSet,
    steps: int,
    tau: float,
    solver: IHVPSolver,
    hessian_on: str,
    times: dict[str, float],
) -> tuple[Tensor, list[IHVPResult]]:
    """``θ ← θ − τ (H + λI)^{-1} Δg_j`` over the ``steps`` chunks of ``Z`` (index order); stops at the first
    solve that did not converge (the last result, ``θ`` left before it)."""
    results: list[IHVPResult] = []
    chunks = torch.arange(len(affected)).tensor_split(steps)
    for j in range(steps):
        r = _chunk_step(obj, theta, X, y, affected, chunks, j, solver, hessian_on, times)
        results.append(r)
        if not r.converged:
            break
        theta = theta - tau * r.x
    return theta, results


def second_order_update(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    affected: AffectedSet,
    solver: IHVPSolver,
    *,
    loss="cross_entropy",
    mu: float = 0.0,
    tau: float = 1.0,
    steps: int = 1,
    hessian_on: str = "remaining",
    inplace: bool = True,
) -> UpdateResult:
    """Second-order unlearning update ``θ = θ* − τ (H + λI)^{-1} Δg``.

    Args:
        model: the trained model at ``θ*``.
        X: the training inputs ``D``.
        y: the training targets of ``D``.
        affected: the points to remove or correct.
        solver: the inverse-HVP solver (:func:`build_solver`), prepared here on ``hessian_on`` data at ``θ*``.
        loss (str | nn.Module): the per-sample loss of ``L(D; θ) = Σ_i ℓ_i + (μ/2)‖θ‖²``.
        mu: the L2 regularization ``μ ≥ 0`` (added exactly to ``H``).
        tau: the step size ``τ``.
        steps: ``> 1`` for the iterative variant (chunks of ``Z`` in index order).
        hessian_on: ``"remaining"`` (``H`` of ``L(D̃)``, the Newton step; default) or ``"original"``
            (``H`` of ``L(D)``).
        inplace: write ``θ`` into the model when the update succeeded.

    Returns:
        The outcome; on any inverse-HVP failure the model is left unchanged and ``status`` says why.
    """
    _check_second_order_arguments(affected, steps, tau, hessian_on)
    affected.check(X, y)
    t0 = time.perf_counter()
    obj = Objective(model, loss, mu)
    theta_star = obj.theta()
    theta = theta_star.clone()
    times = {"grad_diff": 0.0, "prepare": 0.0, "solve": 0.0}
    theta, results = _iterate(obj, theta, X, y, affected, steps, tau, solver, hessian_on, times)
    ok = results[-1].converged  # on failure: the failed solve's method and message, the model left unchanged
    res = UpdateResult(
        f"second_order:{(results[0] if ok else results[-1]).method}",
        "ok" if ok else f"ihvp not converged: {results[-1].message}",
        theta,
        theta_star,
        steps=steps,
        tau=tau,
        times=times,
        ihvp=results,
        info={"solver": solver.describe()} if ok else {},
    )
    return finish_update(obj, res, inplace and ok, t0)


def _reindex(part: AffectedSet, before: AffectedSet | None, N: int) -> AffectedSet:
    """Indices of ``part`` in the data set after ``before`` was applied (removals shift indices)."""
    if before is None or not before.is_removal:
        return part
    keep = torch.ones(N, dtype=torch.bool)
    keep[before.indices] = False
    new_pos = torch.cumsum(keep.long(), 0) - 1
    return AffectedSet(new_pos[part.indices], part.X_new, part.y_new)
