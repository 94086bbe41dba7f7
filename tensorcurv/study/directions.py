"""How well a structure's damped solve ``x̂ = (Ĉ + λI)⁻¹ g`` reproduces the exact ``x = (C + λI)⁻¹ g``.

The damping is relative, ``λ = ρ tr(C)/(mn)`` (``ρ`` in ``damping_rel``), so one grid fits every layer;
the exact directions come from :meth:`tensorcurv.core.exact.ExactBlock.solve` and are shared by every
structure compared. Reported: the cosine and the relative error ``‖x̂ − x‖/‖x‖``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.exact import ExactBlock
from tensorcurv.linalg import vec
from tensorcurv.structures.base import Structure


def direction_quality(exact: Tensor, approx: Tensor) -> dict[str, float]:
    """Cosine and relative error ``‖x̂ − x‖/‖x‖`` between two directions."""
    en, an = float(exact.norm()), float(approx.norm())
    cos = float((exact * approx).sum()) / (en * an) if en > 0 and an > 0 else float("nan")
    return {"cos": cos, "rel_err": float((approx - exact).norm()) / en if en > 0 else float("nan")}


def exact_directions(
    block: ExactBlock,
    grad: Tensor,
    damping_rel: Sequence[float],
    *,
    method: str = "auto",
) -> dict[float, tuple[float, Tensor, dict[str, Any]]]:
    """``{ρ: (λ, (C + λI)⁻¹g, info)}`` with ``λ = ρ tr(C)/(mn)`` (shared by every structure compared)."""
    base = block.trace() / block.dim
    return {
        float(rho): (float(rho) * base, *block.solve(grad, float(rho) * base, method=method)) for rho in damping_rel
    }


def inverse_quality(
    structure: Structure,
    block: ExactBlock,
    grad: Tensor,
    damping_rel: Sequence[float],
    *,
    method: str = "auto",
    repeats: int = 3,
    exact: Mapping[float, tuple[float, Tensor, dict[str, Any]]] | None = None,
) -> list[dict[str, float]]:
    """For each ``ρ`` in ``damping_rel``: ``λ = ρ tr(C)/(mn)``, compare ``x̂ = (Ĉ + λI)⁻¹g`` to the exact
    ``x = (C + λI)⁻¹g`` (cosine, relative error), with the median solve time of ``Ĉ``.
    ``exact``: precomputed :func:`exact_directions` (else computed here with ``method``)."""
    exact = exact if exact is not None else exact_directions(block, grad, damping_rel, method=method)
    rows = []
    for rho in damping_rel:
        lam, x, info = exact[float(rho)]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            xh = structure.solve(grad, lam)
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "damping_rel": float(rho),
                "damping": lam,
                **direction_quality(x, xh),
                "solve_time": statistics.median(times),
                "exact_iters": info["iterations"],
            }
        )
    return rows


def model_direction_quality(exact: Mapping[str, Tensor], approx: Mapping[str, Tensor]) -> dict[str, float]:
    keys = list(exact)
    return direction_quality(torch.cat([vec(exact[k]) for k in keys]), torch.cat([vec(approx[k]) for k in keys]))
