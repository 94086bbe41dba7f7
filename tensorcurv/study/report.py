"""Study reports: a ``report.md`` that embeds the figures of :mod:`tensorcurv.study.figures`, with the
raw CSV tables of :mod:`tensorcurv.study.tables` next to it.

Input: the tables of :func:`tensorcurv.study.runner.run_study` (``metrics``, ``floor``, ``spectra``,
``training``; every row has ``step`` and ``kind``). ``metrics`` rows with ``layer="(model)"`` are the
model-level numbers (all covered layers, cross-layer blocks included in ``C``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorcurv.study.direction_report import direction_sections
from tensorcurv.study.figures import FIGURES, write_figures
from tensorcurv.study.tables import (
    MODEL,
    TABLES,
    as_float,
    damping_columns,
    final_step,
    kinds_of,
    pareto_rows,
    read_result,
    valid_rows,
    variants_of,
    write_csv,
)

__all__ = ["FIGURES", "MODEL", "read_result", "write_csv", "write_figures", "write_report"]


def _fmt_bytes(b: float) -> str:
    if not math.isfinite(b):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def _num(v: Any, digits: int = 4) -> str:
    x = as_float(v)
    if not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}" if (10**-digits <= abs(x) < 1e4) or x == 0 else f"{x:.2e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def summary_table(metrics, kind: str, step: int, damping: str) -> str:
    """Model-level row per variant: memory, times, Frobenius/spectral error, inverse quality."""
    rows, front = pareto_rows(metrics, kind, step)
    layer_rows = [r for r in valid_rows(metrics) if r["layer"] != MODEL and r["kind"] == kind and r["step"] == step]
    on_front = {rows[i]["variant"] for i in front}
    out = []
    for r in sorted(rows, key=lambda r: (not math.isfinite(as_float(r["fro_rel"])), as_float(r["fro_rel"]))):
        lr = [x for x in layer_rows if x["variant"] == r["variant"]]
        spec = max((as_float(x.get("spec_rel")) for x in lr), default=math.nan)
        out.append(
            [
                f"**{r['variant']}**" if r["variant"] in on_front else r["variant"],
                _fmt_bytes(as_float(r["nbytes"])),
                f"{1e3 * as_float(r['fit_time']):.1f}",
                f"{1e3 * as_float(r['solve_time']):.2f}",
                _num(r["fro_rel"]),
                _num(spec),
                _num(r.get(f"cos@{damping}")),
                _num(r.get(f"relerr@{damping}")),
            ]
        )
    return _table(
        [
            "variant (bold: Pareto front)",
            "memory",
            "fit ms",
            "solve ms",
            "block-diag. Frobenius rel.",
            "max layer spectral rel.",
            f"cos @ λ={damping}",
            f"rel. err @ λ={damping}",
        ],
        out,
    )


def layer_table(metrics, floor, step: int) -> str:
    rows = [r for r in valid_rows(metrics) if r["layer"] != MODEL and r["step"] == step]
    kinds = kinds_of(rows)
    out = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        for v in variants_of(rows):
            cells = []
            for kind in kinds:
                r = next((r for r in rows if r["layer"] == layer and r["variant"] == v and r["kind"] == kind), None)
                cells.append(_num(r["fro_rel"]) if r else "–")
            r0 = next(r for r in rows if r["layer"] == layer)
            out.append([f"{layer} ({r0['m']}×{r0['n']}, T={r0['T']})", v, *cells])
        fl = [
            next(
                (
                    f["floor"]
                    for f in floor
                    if f["layer"] == layer and f["kind"] == k and f["step"] == step and f["rank"] == 1
                ),
                math.nan,
            )
            for k in kinds
        ]
        if any(math.isfinite(as_float(x)) for x in fl):
            out.append(["", "*floor, rank 1*", *[_num(x) for x in fl]])
    return _table(["layer (m×n, positions)", "variant", *kinds], out)


def floor_table(floor, step: int) -> str:
    rows = [r for r in floor if r["step"] == step]
    ranks = sorted({r["rank"] for r in rows})
    out = []
    for kind in kinds_of(rows):
        for layer in dict.fromkeys(r["layer"] for r in rows if r["kind"] == kind):
            vals = {r["rank"]: r["floor"] for r in rows if r["kind"] == kind and r["layer"] == layer}
            out.append([kind, layer, *[_num(vals.get(k)) for k in ranks]])
    return _table(["kind", "layer", *[f"r={k}" for k in ranks]], out)


def training_table(metrics, training, kind: str) -> str:
    rows = [r for r in valid_rows(metrics) if r["layer"] == MODEL and r["kind"] == kind]
    steps = sorted({r["step"] for r in rows})
    out = [
        [
            v,
            *[
                _num(next((r["fro_rel"] for r in rows if r["variant"] == v and r["step"] == s), math.nan))
                for s in steps
            ],
        ]
        for v in variants_of(rows)
    ]
    acc = {t["step"]: t for t in training}
    out.append(["*val. accuracy*", *[_num(acc.get(s, {}).get("val_accuracy"), 3) for s in steps]])
    return _table(["variant", *[f"step {s}" for s in steps]], out)


#: the paragraph under the regeneration command: how every number of the report is computed
METHOD_NOTE = (
    "How the numbers are computed: Frobenius errors exactly (up to rounding) from Gram-matrix "
    "identities over the per-sample factors (no `C` formed); spectral errors by Lanczos on implicit "
    "products (stopped at a relative Ritz residual of `study.spectral_tol`); exact damped inverses `(C+λI)⁻¹g` "
    "from the Woodbury identity on the per-sample Gram "
    "matrix, floors from the truncated SVD of the rearranged block `R(C)`. Model-level Frobenius errors "
    "are block-diagonal, `sqrt(Σ_l ‖C_ll−Ĉ_l‖² / Σ_l ‖C_ll‖²)`; `metrics.csv` also has `fro_rel_full` "
    "against the curvature of all covered layers together (cross-layer blocks included, "
    "`offdiag_share` = ‖off-diagonal part‖/‖C‖). Model-level inverse quality compares with the full "
    "`(C+λI)⁻¹g`, cross-layer blocks included (where `two_level`'s coarse space can help). "
    "λ is given relative to `tr(C)/dim`; g is the mini-batch gradient of the loss."
)


def _header(title: str, command: str, description: str) -> list[str]:
    """Title, the command that regenerates the report, the description and :data:`METHOD_NOTE`."""
    md = [f"# {title}", "", "Regenerate with:", "", "```bash", command, "```", ""]
    if description:
        md += [description, ""]
    return md + [METHOD_NOTE, ""]


def _sections(result: Mapping[str, list[dict]], ok: list[dict], step: int) -> list[str]:
    """The tables and figures of the report: summaries per kind, figures, per-layer errors, floor,
    errors over training, skipped variants and the list of files."""
    metrics, floor = result["metrics"], result.get("floor", [])
    kinds = kinds_of(ok)
    damp = damping_columns([r for r in ok if r["layer"] == MODEL])
    mid = damp[len(damp) // 2][1] if damp else ""
    skipped = sorted({(r["variant"], r["skipped"]) for r in metrics if r.get("skipped")})
    md: list[str] = []
    for kind in kinds:
        md += [f"## {kind}: summary at step {step}", "", summary_table(ok, kind, step, mid), ""]
    for name, caption in FIGURES.items():
        if result.get("directions") or name not in ("cosine_vs_memory", "direction_pareto"):
            md += [f"## {caption}", "", f"![{name}]({name}.png)", ""]
    md += direction_sections(result.get("directions", []), kinds, step)
    md += [f"## Per-layer relative Frobenius error at step {step}", "", layer_table(ok, floor, step), ""]
    if floor:
        md += [
            f"## Floor: optimal rank-r Kronecker-sum relative error at step {step}",
            "",
            floor_table(floor, step),
            "",
        ]
    for kind in kinds:
        md += [
            f"## Block-diagonal relative Frobenius error over training ({kind})",
            "",
            training_table(ok, result.get("training", []), kind),
            "",
        ]
    if skipped:
        md += ["## Skipped", "", *[f"- {v}: {why}" for v, why in skipped], ""]
    return md + [
        "## Files",
        "",
        "`metrics.csv` (one row per step, kind, layer, variant; `cos@ρ`/`relerr@ρ` at "
        "λ = ρ·tr(C)/dim), `directions.csv` (one row per step, kind, scope/layer, variant, ρ, refinement "
        "steps k: `cos`, `rel_err`, `fit_time`, `solve_time`, `refine_time`, `step_time` in s), `floor.csv`, "
        "`spectra.csv`, `training.csv`.",
        "",
    ]


def _log(logger: Any, out: Path, result: Mapping[str, list[dict]], ok: list[dict], step: int) -> None:
    """The report's figures, tables and final model-level Frobenius errors to a tracking ``logger``."""
    metrics, floor = result["metrics"], result.get("floor", [])
    for name in FIGURES:
        logger.log_figure(name, str(out / f"{name}.png"))
    logger.log_table("metrics", metrics)
    if floor:
        logger.log_table("floor", floor)
    logger.summary(
        {
            f"fro_rel/{r['kind']}/{r['variant']}": as_float(r["fro_rel"])
            for r in ok
            if r["layer"] == MODEL and r["step"] == step
        }
    )


def write_report(
    result: Mapping[str, list[dict]],
    out_dir: str | Path,
    *,
    command: str,
    title: str = "Study",
    description: str = "",
    logger: Any = None,
) -> Path:
    """Write ``report.md``, the CSV tables of :data:`~tensorcurv.study.tables.TABLES` and the
    PNG figures into ``out_dir``; log the same figures/tables to ``logger``
    (``tensorcurv.experiments.tracking``) if given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for table in TABLES:
        write_csv(out / f"{table}.csv", result.get(table, []))
    metrics = result["metrics"]
    write_figures(result, out)
    ok = valid_rows(metrics)
    step = final_step(ok)
    path = out / "report.md"
    path.write_text("\n".join(_header(title, command, description) + _sections(result, ok, step)))
    if logger is not None:
        _log(logger, out, result, ok, step)
    return path
