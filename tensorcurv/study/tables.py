"""The tables of a study report: CSV files in and out, and the row selections that the figures and the
Markdown tables share.

Rows are dicts with ``step`` and ``kind``; ``metrics`` rows with ``layer == MODEL`` are the model-level
numbers (all covered layers, cross-layer blocks included in ``C``); a row with a non-empty ``skipped``
is a variant that did not run.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorcurv.study.pareto import pareto_front

MODEL = "(model)"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """All rows into one CSV; the header is the union of the keys in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(v) for k, v in r.items()})


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


_TEXT = {"kind", "layer", "structure", "variant", "hparams", "rank", "swept", "skipped", "scope"}
_INT = {"step", "m", "n", "T", "index", "nbytes", "refine_steps"}
#: the raw tables of a study, one CSV each
TABLES = ("metrics", "floor", "spectra", "directions", "training")
#: the damping of the issue's target, λ = 1e-3·tr(C)/dim: the cosine of the small multiples and Pareto tables
FOCUS_DAMPING = 1e-3


def read_result(out_dir: str | Path) -> dict[str, list[dict]]:
    """Read the raw CSVs of a report back into :func:`write_report`'s input (to re-render figures
    without recomputing). Text columns stay strings (layer names like ``"1"``), the rest are numbers."""
    out = {}
    for table in TABLES:
        path = Path(out_dir) / f"{table}.csv"
        rows = []
        if path.exists():
            with open(path) as f:
                for r in csv.DictReader(f):
                    row = {}
                    for k, v in r.items():
                        if v == "" or (k in _TEXT and not (table == "floor" and k == "rank")):
                            row[k] = v if v != "" or k in _TEXT else None
                        elif k in _INT or (table == "floor" and k == "rank"):
                            row[k] = int(float(v))
                        else:
                            row[k] = as_float(v)
                    rows.append(row)
        out[table] = rows
    return out


def as_float(v: Any) -> float:
    """``float(v)``; NaN for an empty or non-numeric cell."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def valid_rows(rows):
    """The rows of the variants that ran (``skipped`` empty)."""
    return [r for r in rows if not r.get("skipped")]


def final_step(rows, key="step"):
    """The last checkpoint (largest ``key``) of ``rows``; 0 when there are none."""
    return max((r[key] for r in rows), default=0)


def kinds_of(rows):
    """The curvature kinds of ``rows`` in first-seen order."""
    return list(dict.fromkeys(r["kind"] for r in rows))


def variants_of(rows):
    """The variant labels of ``rows`` in first-seen order."""
    return list(dict.fromkeys(r["variant"] for r in rows))


def rank_value(r) -> float:
    """The number on the rank axis: the ``rank`` hyper-parameter, or the largest of ``ranks``."""
    rank = r.get("rank", "")
    if rank in ("", None):
        return math.nan
    return float(max(int(x) for x in str(rank).split("x")))


def pareto_rows(metrics, kind, step) -> tuple[list[dict], list[int]]:
    """Model-level rows of one (kind, step) and the indices of their accuracy-vs-memory Pareto front."""
    rows = [r for r in valid_rows(metrics) if r["layer"] == MODEL and r["kind"] == kind and r["step"] == step]
    return rows, pareto_front([as_float(r["nbytes"]) for r in rows], [as_float(r["fro_rel"]) for r in rows])


def damping_columns(rows) -> list[tuple[float, str]]:
    """``(ρ, "ρ")`` of every ``cos@ρ`` column by increasing ρ (the damping is λ = ρ·tr(C)/dim)."""
    cols = {k for r in rows for k in r if k.startswith("cos@")}
    return sorted((float(k[4:]), k[4:]) for k in cols)


def steps_of(rows) -> list[int]:
    """The checkpoints of ``rows``, increasing."""
    return sorted({int(r["step"]) for r in rows})


def focus_damping(rows) -> float:
    """:data:`FOCUS_DAMPING` if ``rows`` (direction rows) have it, else their middle ``damping_rel``."""
    grid = sorted({float(r["damping_rel"]) for r in rows})
    if not grid:
        return FOCUS_DAMPING
    return min(grid, key=lambda d: abs(math.log(d / FOCUS_DAMPING)))


def model_directions(directions, *, kind=None, step=None, damping_rel=None, refine_steps=None) -> list[dict]:
    """The whole-model direction rows matching every given filter (``None``: any)."""
    want = {"kind": kind, "step": step, "refine_steps": refine_steps}
    out = []
    for r in directions:
        if r.get("scope") != "model" or any(v is not None and r.get(k) != v for k, v in want.items()):
            continue
        if damping_rel is not None and not math.isclose(float(r["damping_rel"]), damping_rel, rel_tol=1e-9):
            continue
        out.append(r)
    return out


def cosine_front(rows, cost_key: str) -> list[int]:
    """Indices of the rows on the front of ``cost_key`` (minimized) against the cosine (maximized)."""
    return pareto_front([as_float(r[cost_key]) for r in rows], [1.0 - as_float(r["cos"]) for r in rows])
