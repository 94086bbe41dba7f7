"""Krylov refinement of a natural-gradient / Gauss-Newton direction on the exact mini-batch curvature.

The structured step is ``d₀ = (Ĉ + λI)⁻¹ g``. The refinement runs ``k`` steps of preconditioned
conjugate gradients on the damped *exact* curvature of the current mini-batch,

    (C + λI) d = g,    preconditioner (Ĉ + λI)⁻¹ (the structure's own damped solve),

from ``d = 0`` (:func:`tensorcurv.linalg.krylov.preconditioned_refinement`; Martens' Hessian-free
step with a tensor preconditioner). ``g``, ``d``: the covered parameters only (uncovered ones keep
their fallback direction), flattened by :class:`~tensorcurv.core.exact.ParamLayout`.

Products ``v ↦ C v`` (``k`` per step at most):

* ``operator="stats"``: from the captured per-sample factors (:class:`~tensorcurv.core.exact.ExactModel`,
  no extra backward), ``C`` of the capture's kind (GGN, MC Fisher, empirical Fisher); about two passes
  over the factors per product.
* ``operator="func"``: the GGN ``Jᵀ H J v`` by ``torch.func`` (one forward-mode ``J v``, one
  Hessian-vector product of the loss in the outputs, one reverse-mode ``Jᵀ u``), for steps without
  captured statistics; the GGN is the true Fisher of the losses tensorcurv supports.

``coupling="full"``: ``C`` of all covered parameters with its cross-layer blocks; ``"block"``: its
block diagonal (the matrix a per-layer structure approximates; under ``func`` one product per layer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from tensorcurv.core.exact import ExactModel, ParamLayout, check_coupling
from tensorcurv.core.options import Option
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.krylov import preconditioned_refinement


class RefineOperator(Option):
    """Where the refinement's ``C v`` comes from: the captured per-sample factors, or torch.func GGN products."""

    STATS = "stats"
    FUNC = "func"


def check_operator(operator: str) -> None:
    RefineOperator.parse(operator, "refine_operator")


def stats_operator(stats: Mapping[str, LayerStats], layout: ParamLayout, coupling: str) -> Callable[[Tensor], Tensor]:
    """``v ↦ C v`` on flat covered-parameter vectors from one capture's per-sample factors."""
    op = ExactModel.from_stats(stats, coupling)
    return lambda v: layout.to_flat(op.mv(layout.to_mats(v)))


def ggn_operator(
    model: nn.Module,
    loss: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    named_params: Sequence[tuple[str, Tensor]],
    layout: ParamLayout,
    coupling: str,
) -> Callable[[Tensor], Tensor]:
    """``v ↦ Jᵀ ∇²_z L J v`` (GGN of ``loss`` on the batch) on flat vectors of ``named_params`` by torch.func.

    ``coupling="block"``: ``Σ_l P_l C P_l v`` with ``P_l`` the projection on layer ``l`` (one product per layer).
    """
    names = [n for n, _ in named_params]
    primals = tuple(p.detach() for _, p in named_params)
    numels = [p.numel() for p in primals]
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in set(names)}  # held constant

    def outputs(*ps: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **dict(zip(names, ps))}, (inputs,))
        return out.flatten(1) if out.dim() != 2 else out

    z, pullback = vjp(outputs, *primals)  # type: ignore[misc]  # (torch.func's stubs: a 2-tuple here)
    z = z.detach()
    loss_grad = grad(lambda zz: loss(zz, targets))

    def product(v: Tensor) -> Tensor:
        tangents = tuple(t.view_as(p) for t, p in zip(v.split(numels), primals))
        _, Jv = jvp(outputs, primals, tangents)  # type: ignore[misc]
        _, HJv = jvp(loss_grad, (z,), (Jv,))  # type: ignore[misc]
        return torch.cat([t.reshape(-1) for t in pullback(HJv)])

    if coupling == "full":
        return product
    offsets = [0]
    for k in numels:
        offsets.append(offsets[-1] + k)
    masks = []
    for _, _, idx in layout.layers:
        mask = torch.zeros(offsets[-1], dtype=torch.bool, device=primals[0].device)
        for i in idx:
            mask[offsets[i] : offsets[i + 1]] = True
        masks.append(mask)

    def block_product(v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        for m in masks:
            out = torch.where(m, product(torch.where(m, v, 0.0)), out)
        return out

    return block_product


class Refinement:
    """``k`` PCG steps on ``(C + λI) d = g`` preconditioned by ``solver``'s damped solve (module docstring).

    Args:
        solver: the fitted curvature whose ``solve(grads, damping)`` is the preconditioner (a
            :class:`tensorcurv.Curvature`; its ``params`` and ``adapters`` give the layout).
        steps: ``k >= 1``, the most PCG iterations (products with ``C``) per step.
        tol: stop early when ``‖g − (C + λI) d‖ ≤ tol ‖g‖``.
        coupling: ``"full"`` or ``"block"``.
        operator: ``"stats"`` or ``"func"``.
    """

    def __init__(self, solver: Any, steps: int, tol: float, coupling: str = "full", operator: str = "stats") -> None:
        check_coupling(coupling)
        check_operator(operator)
        self.solver, self.steps, self.tol = solver, int(steps), float(tol)
        self.coupling, self.operator = coupling, operator
        covered = {id(p) for ad in solver.adapters.values() for _, p in ad.params()}
        self.index = [i for i, p in enumerate(solver.params) if id(p) in covered]
        self.named = [solver.named_params[i] for i in self.index]
        self.layout = ParamLayout(self.named, solver.adapters)

    def flat(self, tensors: Sequence[Tensor]) -> Tensor:
        """The covered parameters' entries of a list aligned with ``solver.params``, concatenated."""
        return torch.cat([tensors[i].reshape(-1) for i in self.index])

    def precondition(self, r: Tensor, damping: float) -> Tensor:
        """``(Ĉ + λI)⁻¹ r`` on the covered parameters (the structure's solve)."""
        full = [torch.zeros_like(p) for p in self.solver.params]
        for i, part in zip(self.index, r.split([p.numel() for _, p in self.named])):
            full[i] = part.view_as(full[i])
        return self.flat(self.solver.solve(full, damping=damping))

    def operator_for(
        self,
        stats: Mapping[str, LayerStats] | None,
        model: nn.Module | None = None,
        loss: Any = None,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Callable[[Tensor], Tensor]:
        if self.operator == "stats":
            if stats is None:
                raise ValueError("refine_operator='stats' needs the statistics of this step (stats_interval=1)")
            return stats_operator(stats, self.layout, self.coupling)
        if model is None or inputs is None or targets is None:
            raise ValueError("refine_operator='func' needs the model, the loss and the batch")
        return ggn_operator(model, loss, inputs, targets, self.named, self.layout, self.coupling)

    def __call__(
        self,
        grads: Sequence[Tensor],
        directions: Sequence[Tensor],
        damping: float,
        curvature_mv: Callable[[Tensor], Tensor],
    ) -> tuple[list[Tensor], dict[str, Any]]:
        """The refined directions (a new list aligned with ``solver.params``) and the step's report:
        ``refine_iterations``, ``refine_residual`` (``‖g − (C + λI)d‖/‖g‖``), ``refine_residuals`` (its
        history), ``refine_cosine`` (to the unrefined ``d₀``), ``refine_time``, ``refine_fallback``
        (True when the refined direction was not finite and ``d₀`` was kept)."""
        t0 = time.perf_counter()
        b, d0 = self.flat(grads), self.flat(directions)
        x, info = preconditioned_refinement(
            lambda v: curvature_mv(v) + damping * v,
            lambda r: self.precondition(r, damping),
            b,
            self.steps,
            self.tol,
            unrefined=d0,
        )
        fallback = not (bool(torch.isfinite(x).all()) and math.isfinite(info["residual"]))
        out = list(directions)
        if not fallback:
            for i, part in zip(self.index, x.split([p.numel() for _, p in self.named])):
                out[i] = part.view_as(directions[i])
        report = {
            "refine_iterations": info["iterations"],
            "refine_residual": info["residual"],
            "refine_residuals": info["residuals"],
            "refine_cosine": 1.0 if fallback else info["cosine"],
            "refine_time": time.perf_counter() - t0,
            "refine_fallback": fallback,
        }
        return out, report


__all__ = ["RefineOperator", "Refinement", "check_operator", "ggn_operator", "stats_operator"]
