"""The direction study: how close a fitted structure's (optionally Krylov-refined) damped direction comes
to the exact one, and at what wall-clock per step.

For a relative damping ``ρ``, with ``g`` the mini-batch gradient of the covered parameters (column-major
``vec`` of each layer's ``[W, b]``, layers concatenated, length ``D``):

* whole model (``scope="model"``): ``λ = ρ tr(C)/D``; ``x = (C + λI)⁻¹ g`` with ``C`` the full curvature
  (cross-layer blocks included, Woodbury, :meth:`~tensorcurv.core.exact.ExactModel.solve`);
  ``d₀ = (Ĉ + λI)⁻¹ g`` the structure's model solve (``two_level``: its preconditioner);
* one layer (``scope="layer"``, block-diagonal structures only): ``λ_l = ρ tr(C_ll)/(m n)``,
  ``x_l = (C_ll + λ_l I)⁻¹ g_l`` against the block's own solve.

``k`` refinement steps (``refine_steps``) are :func:`tensorcurv.linalg.krylov.preconditioned_refinement`
on ``(C + λI) d = g`` (resp. ``C_ll``) with the structure's solve as preconditioner, from ``d = 0``: the
refinement the optimizers use (``k = 0``: ``d₀`` itself). Reported per row: ``cos(d, x)``,
``‖d − x‖/‖x‖``, and the step time ``fit_time + solve_time + refine_time`` (the capture of the
statistics is common to every structure and left out). Reference rows (``structure="exact"``): the full
solve itself and, for the whole model, the exact block-diagonal solve ``diag(C_ll + λI)⁻¹ g``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from tensorcurv.core.exact import ExactBlock, ExactModel
from tensorcurv.linalg.krylov import preconditioned_refinement
from tensorcurv.study.directions import direction_quality

#: The variant label of the exact full solve and of the exact block-diagonal solve (reference rows).
EXACT_FULL = "exact (full solve)"
EXACT_BLOCK_DIAGONAL = "exact (block-diagonal solve)"


def timed(fn: Callable[[], Any], repeats: int = 1, reset: Callable[[], Any] | None = None) -> tuple[Any, float]:
    """``fn()`` and the median of ``repeats`` wall-clock times in seconds (the last result is kept);
    ``reset()`` (untimed) before each call, e.g. to drop a structure's solve caches (a cold solve)."""
    times, out = [], None
    for _ in range(max(1, int(repeats))):
        if reset is not None:
            reset()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def refined_directions(
    matvec: Callable[[Tensor], Tensor],
    precond: Callable[[Tensor], Tensor],
    g: Tensor,
    d0: Tensor,
    damping: float,
    refine_steps: Sequence[int],
) -> dict[int, tuple[Tensor, float]]:
    """``{k: (d_k, refine seconds)}``: ``d_0 = d₀`` (the unrefined direction, 0 s); ``k ≥ 1``: ``k`` steps
    of :func:`preconditioned_refinement` on ``(M + λI) d = g`` (``matvec`` applies ``M``) preconditioned by
    ``precond``, from 0 (``tol = 0``: exactly ``k`` products unless the residual vanishes)."""
    out: dict[int, tuple[Tensor, float]] = {}
    for k in sorted({int(k) for k in refine_steps}):
        if k == 0:
            out[0] = (d0, 0.0)
            continue
        t0 = time.perf_counter()
        x, _ = preconditioned_refinement(lambda v: matvec(v) + damping * v, precond, g, k, 0.0, unrefined=d0)
        out[k] = (x, time.perf_counter() - t0)
    return out


def _rows(
    exact: Tensor,
    matvec: Callable[[Tensor], Tensor],
    solve: Callable[[Tensor], Tensor],
    g: Tensor,
    damping: float,
    refine_steps: Sequence[int],
    repeats: int,
    reset: Callable[[], Any] | None,
) -> list[dict[str, Any]]:
    """One row per ``k``: cosine, relative error, solve and refinement seconds (see the module docstring).
    The solve is timed cold (after ``reset()``): the solve of an optimizer step that has just fitted."""
    d0, solve_time = timed(lambda: solve(g), repeats, reset)
    rows = []
    for k, (d, refine_time) in refined_directions(matvec, solve, g, d0, damping, refine_steps).items():
        rows.append(
            {"refine_steps": k, **direction_quality(exact, d), "solve_time": solve_time, "refine_time": refine_time}
        )
    return rows


def model_direction_rows(
    model_solve: Callable[[Mapping[str, Tensor], float], Mapping[str, Tensor]],
    exact_model: ExactModel,
    grads: Mapping[str, Tensor],
    exact: Mapping[float, tuple[float, Mapping[str, Tensor], Any]],
    refine_steps: Sequence[int],
    repeats: int = 1,
    reset: Callable[[], Any] | None = None,
) -> list[dict[str, Any]]:
    """``scope="model"`` rows of one fitted model structure, for every ``ρ`` of ``exact``
    (``{ρ: (λ, (C + λI)⁻¹g per layer, info)}``, the full solve); ``reset``: see :func:`timed`."""
    flat, unflat = exact_model.flatten, exact_model.unflatten
    g = flat(grads)
    rows = []
    for rho, (lam, x, _) in exact.items():

        def solve(v: Tensor, lam: float = lam) -> Tensor:
            return flat(model_solve(unflat(v), lam))

        mv = lambda v: flat(exact_model.mv(unflat(v)))  # noqa: E731
        for r in _rows(flat(x), mv, solve, g, lam, refine_steps, repeats, reset):
            rows.append({"scope": "model", "layer": "(model)", "damping_rel": float(rho), "damping": lam, **r})
    return rows


def layer_direction_rows(
    block_solve: Callable[[Tensor, float], Tensor],
    exact_block: ExactBlock,
    grad: Tensor,
    exact: Mapping[float, tuple[float, Tensor, Any]],
    refine_steps: Sequence[int],
    repeats: int = 1,
    reset: Callable[[], Any] | None = None,
) -> list[dict[str, Any]]:
    """``scope="layer"`` rows of one fitted layer block (``block_solve(V, λ)`` on ``(m, n)`` matrices)
    against its exact block, for every ``ρ`` of ``exact`` (``{ρ: (λ_l, (C_ll + λ_l I)⁻¹g_l, info)}``);
    ``reset``: see :func:`timed`."""
    rows = []
    for rho, (lam, x, _) in exact.items():

        def solve(v: Tensor, lam: float = lam) -> Tensor:
            return block_solve(v, lam)

        for r in _rows(x, exact_block.mv, solve, grad, lam, refine_steps, repeats, reset):
            rows.append({"scope": "layer", "damping_rel": float(rho), "damping": lam, **r})
    return rows


def reference_rows(
    exact_model: ExactModel,
    blocks: Mapping[str, ExactBlock],
    grads: Mapping[str, Tensor],
    exact: Mapping[float, tuple[float, Mapping[str, Tensor], Any]],
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """``scope="model"`` reference rows for every ``ρ``: the exact full solve (cosine 1 by definition; its
    cost is a cold Woodbury solve: Gram matrix, its factorization, the products) and the exact
    block-diagonal solve ``diag(C_ll + λI)⁻¹ g`` at the
    model's ``λ`` against the full one (what any block-diagonal structure can reach at best)."""
    flat = exact_model.flatten
    rows = []
    for rho, (lam, x, _) in exact.items():

        def full(lam: float = lam) -> Any:  # cold: a fresh operator forms and factors its Gram matrix
            return ExactModel.from_stats(exact_model.stats).solve(dict(grads), lam)

        def block_diagonal(lam: float = lam) -> dict[str, Tensor]:
            return {k: ExactBlock(b.stats).solve(grads[k], lam)[0] for k, b in blocks.items()}

        _, t_full = timed(full, repeats)
        xb, t_block = timed(block_diagonal, repeats)
        common = {"scope": "model", "layer": "(model)", "damping_rel": float(rho), "damping": lam, "refine_steps": 0}
        for label, d, t in ((EXACT_FULL, x, t_full), (EXACT_BLOCK_DIAGONAL, xb, t_block)):
            rows.append(
                {
                    **common,
                    "structure": "exact",
                    "variant": label,
                    **direction_quality(flat(x), flat(d)),
                    "solve_time": t,
                    "refine_time": 0.0,
                    "fit_time": 0.0,
                    "step_time": t,
                }
            )
    return rows
