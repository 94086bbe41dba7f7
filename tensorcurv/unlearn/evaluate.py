"""Evaluation against retraining: the reference is ``θ_r = argmin L(D̃; θ)`` retrained from the same
initialization ``θ_0`` as ``θ*`` (full-batch L-BFGS, :mod:`.training`).

Per method (one row each):

* ``rel_dist``       ``‖θ − θ_r‖ / ‖θ* − θ_r‖`` (0: retraining reached; 1: nothing unlearned)
* ``agreement``      fraction of test points where ``argmax f(x; θ) = argmax f(x; θ_r)``
* ``test_acc``       test accuracy
* ``affected_acc`` / ``affected_loss``  accuracy / mean loss on the affected points with their
  corrected labels (``Z̃``; for removal: ``Z`` with its labels)
* ``grad_residual``  ``‖∇L(D̃; θ)‖`` (Guo et al. 2020's certification quantity; includes ``μθ``)
* ``time``, ``speedup`` (retraining time / time), ``time_vs_lissa``, ``time_vs_cg`` (time / theirs);
  for a ``cached`` method ``time`` is the per-request cost and ``time_oneoff`` the one-off capture +
  fit at ``θ*`` on ``D`` (0 for the others), with ``speedup_incl_oneoff`` = retraining / (time + one-off)
* ``cpu_time`` (process CPU time of the request, one-off excluded) and ``speedup_cpu`` (retraining CPU time /
  ``cpu_time``): with one torch thread, CPU time is the wall-clock of an idle machine, so this ratio does not
  depend on the load of a shared machine
* whatever ``extra_metrics(θ)`` returns (e.g. the membership-inference AUC of :mod:`.privacy`)
* ``<name>_acc`` for every extra evaluation set (e.g. ``backdoor_acc``: the backdoor success rate,
  triggered test images labelled with the target class).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tensorcurv.unlearn.ihvp import build_solver
from tensorcurv.unlearn.objective import Objective
from tensorcurv.unlearn.training import train_lbfgs
from tensorcurv.unlearn.updates import AffectedSet, UpdateResult, first_order_update, second_order_update


@dataclass
class MethodSpec:
    """One unlearning method: ``order`` 1 (first-order, ``tau``), 2 (``solver`` + its kwargs) or 0
    (fine-tuning on ``D̃``, :func:`~tensorcurv.unlearn.finetune.finetune_update` with ``solver_kwargs``
    such as ``epochs``).

    ``cached=True``: a :class:`~tensorcurv.unlearn.cache.CurvatureCache` with structure ``solver`` is
    built at ``θ*`` on ``D`` (one-off, timed separately) and serves the request.

    ``runner``: any other update, called as ``runner(model, X, y, affected, loss=, mu=, tau=, **solver_kwargs)``
    and returning an :class:`~tensorcurv.unlearn.updates.UpdateResult` (its ``info["oneoff_time"]`` is the
    one-off part of its time), e.g. :func:`~tensorcurv.unlearn.peers_kronfluence.kronfluence_update`."""

    name: str
    order: int = 2
    solver: str | None = None
    solver_kwargs: dict[str, Any] = field(default_factory=dict)
    tau: float | str = 1.0
    steps: int = 1
    cached: bool = False
    runner: Callable[..., UpdateResult] | None = None

    def __post_init__(self) -> None:
        if self.order not in (0, 1, 2):
            raise ValueError(f"method {self.name!r}: order must be 0 (fine-tuning), 1 or 2, got {self.order!r}")
        if self.order == 2 and not (self.solver or self.runner):
            raise ValueError(f"method {self.name!r}: a second-order method needs a solver or a runner")

    def run(self, model: nn.Module, X: Tensor, y: Tensor, affected: AffectedSet, loss, mu: float) -> UpdateResult:
        if self.runner is not None:
            return self.runner(model, X, y, affected, loss=loss, mu=mu, tau=self.tau, **self.solver_kwargs)
        if self.order == 0:
            from tensorcurv.unlearn.finetune import finetune_update

            return finetune_update(model, X, y, affected, loss=loss, mu=mu, inplace=False, **self.solver_kwargs)
        if self.order == 1:
            return first_order_update(model, X, y, affected, loss=loss, mu=mu, tau=self.tau, inplace=False)
        assert self.solver is not None  # checked in __post_init__
        kwargs = dict(self.solver_kwargs)
        if self.cached:
            from tensorcurv.unlearn.cache import CurvatureCache

            cache = CurvatureCache(model, X, y, loss=loss, mu=mu, structure=self.solver, **kwargs)
            return cache.update(affected, tau=float(self.tau))
        pre = kwargs.pop("preconditioner", None)
        if pre is not None:  # {"structure": "kfac", ...} -> StructureSolver
            kwargs["preconditioner"] = build_solver("structure", **pre)
        solver = build_solver(self.solver, **kwargs)
        return second_order_update(
            model, X, y, affected, solver, loss=loss, mu=mu, tau=float(self.tau), steps=self.steps, inplace=False
        )


@dataclass
class Reference:
    """``θ*`` (trained on ``D``), ``θ_r`` (retrained on ``D̃``) and their costs."""

    theta0: Tensor
    theta_star: Tensor
    theta_retrain: Tensor
    train_time: float
    retrain_time: float
    retrain_grad_norm: float
    train_grad_norm: float = math.nan  # ‖∇L(D; θ*)‖
    retrain_cpu_time: float = math.nan  # process CPU time of the retraining (≈ its wall-clock on an idle machine)


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean()) if len(y) else math.nan


def metrics(
    obj: Objective,
    theta: Tensor,
    ref: Reference,
    *,
    X_rem: Tensor,
    y_rem: Tensor,
    X_test: Tensor,
    y_test: Tensor,
    Z_eval: tuple[Tensor, Tensor],
    extra: dict[str, tuple[Tensor, Tensor]] | None = None,
    extra_metrics: Callable[[Tensor], dict[str, float]] | None = None,
) -> dict[str, float]:
    """The per-method fidelity and utility numbers of the module docstring (no timing)."""
    with torch.no_grad():
        out_t = obj.outputs(theta, X_test)
        out_r = obj.outputs(ref.theta_retrain, X_test)
        Zx, Zy = Z_eval
        out_z = obj.outputs(theta, Zx)
        row = {
            "rel_dist": float((theta - ref.theta_retrain).norm() / (ref.theta_star - ref.theta_retrain).norm()),
            "agreement": float((out_t.argmax(1) == out_r.argmax(1)).double().mean()),
            "test_acc": accuracy(out_t, y_test),
            "affected_acc": accuracy(out_z, Zy),
            "affected_loss": float(obj.loss.per_sample(out_z, Zy).mean()),
        }
        for name, (Xe, ye) in (extra or {}).items():
            row[f"{name}_acc"] = accuracy(obj.outputs(theta, Xe), ye)
    row["grad_residual"] = float(obj.grad(theta, X_rem, y_rem).norm())
    if extra_metrics is not None:
        row.update(extra_metrics(theta))
    return row


def train_reference(
    obj: Objective,
    X: Tensor,
    y: Tensor,
    affected: AffectedSet,
    theta0: Tensor,
    gtol: float = 1e-9,
    max_iter: int = 2000,
) -> Reference:
    """Train ``θ*`` on ``D`` and retrain ``θ_r`` on ``D̃``, both from ``theta0``; timed."""
    tr = train_lbfgs(obj, X, y, theta0, gtol=gtol, max_iter=max_iter)
    Xr, yr = affected.apply(X, y)
    rt = train_lbfgs(obj, Xr, yr, theta0, gtol=gtol, max_iter=max_iter)
    return Reference(theta0.clone(), tr.theta, rt.theta, tr.time, rt.time, rt.grad_norm, tr.grad_norm, rt.cpu_time)


def evaluate_methods(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    affected: AffectedSet,
    X_test: Tensor,
    y_test: Tensor,
    methods: list[MethodSpec],
    *,
    loss="cross_entropy",
    mu: float = 1.0,
    extra: dict[str, tuple[Tensor, Tensor]] | None = None,
    reference: Reference | None = None,
    gtol: float = 1e-9,
    extra_metrics: Callable[[Tensor], dict[str, float]] | None = None,
) -> tuple[list[dict[str, Any]], Reference]:
    """Run every method from ``θ*`` and compare with retraining. The model ends holding ``θ*``.

    Rows: ``original`` (``θ*``), ``retrain`` (``θ_r``), then one per method (failed methods keep
    their status and the metrics of ``θ*``). ``reference``: reuse an already trained pair;
    ``extra_metrics``: more numbers of a flat ``θ`` for every row.
    """
    obj = Objective(model, loss, mu)
    affected.check(X, y)
    ref = reference or train_reference(obj, X, y, affected, obj.theta(), gtol=gtol)
    X_rem, y_rem = affected.apply(X, y)
    Zc = affected.corrected(X, y)
    Z_eval = Zc if len(Zc[0]) else affected.original(X, y)
    kw: dict[str, Any] = dict(X_rem=X_rem, y_rem=y_rem, X_test=X_test, y_test=y_test, Z_eval=Z_eval, extra=extra)
    kw["extra_metrics"] = extra_metrics
    rows: list[dict[str, Any]] = [
        {"method": "original", "status": "ok", "time": 0.0, **metrics(obj, ref.theta_star, ref, **kw)},
        {
            "method": "retrain",
            "status": "ok",
            "time": ref.retrain_time,
            "cpu_time": ref.retrain_cpu_time,
            **metrics(obj, ref.theta_retrain, ref, **kw),
        },
    ]
    for spec in methods:
        obj.load(ref.theta_star)
        rows.append(_method_row(spec, obj, ref, model, X, y, affected, loss, mu, kw))
    obj.load(ref.theta_star)
    _add_speedups(rows, ref.retrain_time, ref.retrain_cpu_time)
    return rows, ref


def _method_row(
    spec: MethodSpec,
    obj: Objective,
    ref: Reference,
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    affected: AffectedSet,
    loss,
    mu: float,
    kw: dict[str, Any],
) -> dict[str, Any]:
    """Run one method from the model's current ``θ`` (timed) and measure the result: its ``θ`` if it
    succeeded, else ``θ*`` with the failure as ``status``; ``kw``: the evaluation data of :func:`metrics`."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        res = spec.run(model, X, y, affected, loss, mu)
        status = res.status
    except (ValueError, RuntimeError) as err:  # e.g. a structure that does not cover this model
        res, status = None, f"error: {err}"
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    oneoff = res.info.get("oneoff_time", 0.0) if res is not None else 0.0
    oneoff_cpu = res.info.get("oneoff_cpu_time", 0.0) if res is not None else 0.0
    theta = res.theta if (res is not None and res.ok) else ref.theta_star
    row = {
        "method": spec.name,
        "status": status,
        "time": elapsed - oneoff,
        "time_oneoff": oneoff,
        "cpu_time": cpu - oneoff_cpu,
        **metrics(obj, theta, ref, **kw),
    }
    if res is not None:
        row.update({f"time_{k}": v for k, v in res.times.items()})
        row["ihvp_iterations"] = sum(r.iterations for r in res.ihvp)
        row["ihvp_residual"] = res.ihvp[-1].residual if res.ihvp else math.nan
    return row


def _add_speedups(rows: list[dict[str, Any]], retrain_time: float, retrain_cpu_time: float = math.nan) -> None:
    """``speedup`` (and with the one-off cost, and in CPU time) against retraining, and ``time_vs_lissa`` /
    ``time_vs_cg`` against the successful LiSSA / CG rows, added to every row."""
    by_name = {r["method"]: r["time"] for r in rows if r["status"] == "ok"}
    for r in rows:
        r["speedup"] = retrain_time / r["time"] if r["time"] > 0 else math.inf
        cpu = r.get("cpu_time", math.nan)
        r["speedup_cpu"] = retrain_cpu_time / cpu if cpu > 0 else math.nan
        total = r["time"] + r.get("time_oneoff", 0.0)
        r["speedup_incl_oneoff"] = retrain_time / total if total > 0 else math.inf
        for other in ("lissa", "cg"):
            r[f"time_vs_{other}"] = r["time"] / by_name[other] if other in by_name and r["time"] > 0 else math.nan
