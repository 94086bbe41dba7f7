"""Pareto-front figures of a study: accuracy against memory at every checkpoint (small multiples, one
panel per checkpoint and a row per curvature kind), and direction quality against wall-clock per step.

Every panel draws each variant with its own colour (per structure) and marker (per variant), the front
as a black staircase with its points ringed, and one legend outside the axes. A structure whose value
is NaN in a table (``two_level``'s Frobenius error: its layer blocks are only its base) is left out
of that figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tensorcurv import plotting
from tensorcurv.study.direction_study import EXACT_BLOCK_DIAGONAL, EXACT_FULL
from tensorcurv.study.pareto import pareto_front
from tensorcurv.study.tables import (
    MODEL,
    as_float,
    cosine_front,
    focus_damping,
    kinds_of,
    model_directions,
    steps_of,
    valid_rows,
)

#: how the exact reference rows are drawn (black, never part of a structure's colour cycle)
REFERENCE_MARKERS = {EXACT_FULL: "*", EXACT_BLOCK_DIAGONAL: "h"}


def variant_styles(rows) -> dict[str, dict]:
    """Colour per structure, line style per variant of it (:func:`plotting.series_styles`), and a marker
    that steps on with every variant, so that structures drawn on top of each other (``kfac`` under
    ``two_level``, ``ekfac``) keep telling apart by shape."""
    groups = {r["variant"]: r["structure"] for r in rows if r["structure"] != "exact"}
    styles = plotting.series_styles(groups, groups)
    order = list(dict.fromkeys(groups.values()))
    seen: dict[str, int] = {}
    for v, g in groups.items():  # marker (group index + member index): distinct for the first 7 structures
        k = order.index(g) + seen.get(g, 0)
        seen[g] = seen.get(g, 0) + 1
        styles[v] = {**styles[v], "marker": plotting.MARKERS[k % len(plotting.MARKERS)]}
    return styles


def _draw_front(ax, xs: Sequence[float], ys: Sequence[float]) -> None:
    """The front (points by increasing cost) as a staircase, the best value reached at each cost, with
    its points ringed."""
    ax.step(xs, ys, where="post", color=plotting.REFERENCE, lw=1.1, zorder=2, label="Pareto front")
    ax.plot(xs, ys, ls="none", marker="o", ms=11, mfc="none", mec=plotting.REFERENCE, zorder=2, label="on the front")


def _front_panel(ax, pts: list[dict], styles: dict, lower_is_better: bool) -> None:
    """One small multiple: ``pts`` = ``{variant, x, y}``; the front minimizes ``x`` and ``y`` (or ``-y``)."""
    sign = 1.0 if lower_is_better else -1.0
    front = pareto_front([p["x"] for p in pts], [sign * p["y"] for p in pts])
    if front:
        _draw_front(ax, [pts[i]["x"] for i in front], [pts[i]["y"] for i in front])
    for p in pts:
        st = styles[p["variant"]]
        ax.plot(p["x"], p["y"], ls="none", marker=st["marker"], color=st["color"], ms=6, zorder=3, label=p["variant"])
    plotting.log_limits(ax, [p["x"] for p in pts], axis="x")


def _small_multiples(points: list[dict], path: Path, ylabel: str, lower_is_better: bool):
    """Rows: kinds; columns: checkpoints; ``points`` = ``{kind, step, variant, structure, x, y}``."""
    points = [p for p in points if math.isfinite(p["x"]) and math.isfinite(p["y"])]
    kinds, steps = kinds_of(points), steps_of(points)
    styles = variant_styles(points)
    with plotting.style():
        fig, axes = plotting.subplots(
            len(kinds), len(steps), sharey=True, figsize=(3.3 * len(steps) + 2.4, 2.9 * len(kinds) + 0.4)
        )
        for i, kind in enumerate(kinds):
            for j, step in enumerate(steps):
                ax = axes[i][j]
                pts = [p for p in points if p["kind"] == kind and p["step"] == step]
                if pts:
                    _front_panel(ax, pts, styles, lower_is_better)
                ax.set_title(f"{kind}, step {step}", fontsize=9)
                if i == len(kinds) - 1:
                    ax.set_xlabel("memory of Ĉ (bytes, all layers)")
            axes[i][0].set_ylabel(ylabel)
        plotting.legend_outside(fig, axes)
        plotting.save(fig, path)
    return fig


def fig_error_vs_memory(metrics, path: Path):
    """Block-diagonal relative Frobenius error vs memory, one panel per (kind, checkpoint), Pareto fronts."""
    pts = [
        {**r, "x": as_float(r["nbytes"]), "y": as_float(r["fro_rel"])}
        for r in valid_rows(metrics)
        if r["layer"] == MODEL
    ]
    return _small_multiples(pts, path, "block-diag. ‖C−Ĉ‖_F / ‖C‖_F", lower_is_better=True)


def fig_cosine_vs_memory(directions, path: Path):
    """Whole-model ``cos((Ĉ+λI)⁻¹g, (C+λI)⁻¹g)`` (unrefined, λ = :func:`focus_damping`) vs memory, one
    panel per (kind, checkpoint), Pareto fronts (the exact reference rows have no memory: left out)."""
    rho = focus_damping(directions)
    rows = [r for r in model_directions(directions, damping_rel=rho, refine_steps=0) if r["structure"] != "exact"]
    pts = [{**r, "x": as_float(r["nbytes"]), "y": as_float(r["cos"])} for r in rows]
    return _small_multiples(pts, path, f"cosine to (C+λI)⁻¹g, λ={rho:g}·tr/D", lower_is_better=False)


def _direction_panel(ax, rows: list[dict], styles: dict) -> list[float]:
    """Each variant as a line through its refinement steps (k increasing = time increasing), the exact
    references in black, the time-vs-cosine front; returns the step times drawn (ms)."""
    front = cosine_front(rows, "step_time")
    if front:
        fr = sorted(front, key=lambda i: as_float(rows[i]["step_time"]))
        _draw_front(ax, [1e3 * as_float(rows[i]["step_time"]) for i in fr], [as_float(rows[i]["cos"]) for i in fr])
    for v in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted(
            (r["refine_steps"], 1e3 * as_float(r["step_time"]), as_float(r["cos"])) for r in rows if r["variant"] == v
        )
        if v in REFERENCE_MARKERS:
            ax.plot(
                [p[1] for p in pts],
                [p[2] for p in pts],
                ls="none",
                marker=REFERENCE_MARKERS[v],
                ms=9,
                color=plotting.REFERENCE,
                zorder=4,
                label=v,
            )
        else:
            st = styles[v]
            ax.plot(
                [p[1] for p in pts],
                [p[2] for p in pts],
                color=st["color"],
                marker=st["marker"],
                ls=st["linestyle"],
                lw=0.9,
                ms=5,
                zorder=3,
                label=v,
            )
    return [1e3 * as_float(r["step_time"]) for r in rows]


def fig_direction_pareto(directions, path: Path):
    """Final checkpoint; rows: kinds, columns: dampings; whole-model cosine vs wall-clock per step
    (fit + solve + refinement), each variant's line running through ``k = 0, 5, 20, …`` refinement steps."""
    rows = model_directions(directions)
    rows = [r for r in rows if r["step"] == max(steps_of(rows), default=0)]
    rows = [r for r in rows if math.isfinite(as_float(r["step_time"])) and as_float(r["step_time"]) > 0]
    kinds, damps = kinds_of(rows), sorted({float(r["damping_rel"]) for r in rows})
    styles = variant_styles(rows)
    with plotting.style():
        fig, axes = plotting.subplots(
            len(kinds), len(damps), sharey=True, figsize=(3.4 * len(damps) + 2.6, 3.0 * len(kinds) + 0.5)
        )
        for i, kind in enumerate(kinds):
            for j, rho in enumerate(damps):
                ax = axes[i][j]
                sel = [r for r in rows if r["kind"] == kind and math.isclose(float(r["damping_rel"]), rho)]
                if sel:
                    plotting.log_limits(ax, _direction_panel(ax, sel, styles), axis="x")
                ax.set_title(f"{kind}, λ={rho:g}·tr(C)/D", fontsize=9)
                if i == len(kinds) - 1:
                    ax.set_xlabel("ms per step (fit + solve + refinement)")
            axes[i][0].set_ylabel("cos(d, (C+λI)⁻¹g), whole model")
        plotting.legend_outside(fig, axes)
        plotting.save(fig, path)
    return fig
