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


_TEXT = {"kind", "layer", "structure", "variant", "hparams", "rank", "swept", "skipped"}
_INT = {"step", "m", "n", "T", "index", "nbytes"}


def read_result(out_dir: str | Path) -> dict[str, list[dict]]:
    """Read the raw CSVs of a report back into :func:`write_report`'s input (to re-render figures
    without recomputing). Text columns stay strings (layer names like ``"1"``), the rest are numbers."""
    out = {}
    for table in ("metrics", "floor", "spectra", "training"):
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
