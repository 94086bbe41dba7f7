"""Study reports: raw CSV tables, PNG figures (matplotlib, Agg) and a ``report.md`` that embeds them.

Input: the tables of :func:`tensorcurv.study.metrics.run_study` (``metrics``, ``floor``, ``spectra``,
``training``; every row has ``step`` and ``kind``). ``metrics`` rows with ``layer="(model)"`` are the
model-level numbers (all covered layers, cross-layer blocks included in ``C``).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tensorcurv.study.pareto import pareto_front  # noqa: E402

MODEL = "(model)"
FIGURES = {
    "error_vs_rank": "Relative Frobenius error vs rank (final checkpoint), with the optimal rank-r Kronecker-sum floor",
    "error_vs_memory": "Block-diagonal relative Frobenius error vs memory, Pareto front (final checkpoint)",
    "error_over_training": "Block-diagonal relative Frobenius error at the checkpoints of the run",
    "spectrum": "Eigenvalues of the exact block vs each structure (chosen layer, final checkpoint)",
    "inverse_vs_damping": "Cosine between (Ĉ+λI)⁻¹g and (C+λI)⁻¹g vs damping λ/(tr C/dim): whole model (top), "
                          "the spectrum layer (bottom)",
}


# ----------------------------------------------------------------------------- csv
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
                            row[k] = _f(v)
                    rows.append(row)
        out[table] = rows
    return out


# ----------------------------------------------------------------------------- helpers
def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _ok(rows):
    return [r for r in rows if not r.get("skipped")]


def _final(rows, key="step"):
    return max((r[key] for r in rows), default=0)


def _kinds(rows):
    return list(dict.fromkeys(r["kind"] for r in rows))


def _variants(rows):
    return list(dict.fromkeys(r["variant"] for r in rows))


def _colors(labels):
    cmap = plt.get_cmap("tab20")
    return {v: cmap(i % 20) for i, v in enumerate(labels)}


def _rank_value(r) -> float:
    """The number on the rank axis: the ``rank`` hyper-parameter, or the largest of ``ranks``."""
    rank = r.get("rank", "")
    if rank in ("", None):
        return math.nan
    return float(max(int(x) for x in str(rank).split("x")))


def _fmt_bytes(b: float) -> str:
    if not math.isfinite(b):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def _num(v: Any, digits: int = 4) -> str:
    x = _f(v)
    if not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}" if (10 ** -digits <= abs(x) < 1e4) or x == 0 else f"{x:.2e}"


# ----------------------------------------------------------------------------- figures
def _save_with_side_legend(fig, axes, path: Path) -> None:
    """One legend (from the first panel) to the right of all panels, then save and close."""
    h, lab = axes[0][0].get_legend_handles_labels()
    fig.legend(h, lab, loc="center right", fontsize=7.5)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_error_vs_rank(metrics, floor, path: Path) -> None:
    rows = _ok(metrics)
    step = _final(rows)
    kinds = _kinds(rows)
    layers = [l for l in dict.fromkeys(r["layer"] for r in rows) if l != MODEL]
    fig, axes = plt.subplots(len(kinds), len(layers), figsize=(3.6 * len(layers), 2.9 * len(kinds)),
                             squeeze=False, sharex=True)
    colors = _colors(dict.fromkeys(r["structure"] for r in rows))
    for i, kind in enumerate(kinds):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            sel = [r for r in rows if r["step"] == step and r["kind"] == kind and r["layer"] == layer]
            fl = sorted((r["rank"], r["floor"]) for r in floor if r["step"] == step and r["kind"] == kind
                        and r["layer"] == layer)
            if fl:
                ax.plot([x for x, _ in fl], [y for _, y in fl], "k--", lw=1.5, label="floor (optimal rank-r)")
            for s in dict.fromkeys(r["structure"] for r in sel):
                pts = sorted((_rank_value(r), _f(r["fro_rel"])) for r in sel if r["structure"] == s)
                pts = [p for p in pts if math.isfinite(p[0])]
                if len(pts) > 1:
                    ax.plot(*zip(*pts), "o-", color=colors[s], label=s, ms=4)
                elif s == "kfac":
                    ax.plot([1], [_f(next(r["fro_rel"] for r in sel if r["structure"] == s))], "s", color=colors[s],
                            label="kfac (rank 1)", ms=6)
                elif len(pts) == 1 and s == "kpsvd":
                    ax.plot(*pts[0], "^", color=colors[s], label=s, ms=6)
                else:
                    y = [_f(r["fro_rel"]) for r in sel if r["structure"] == s]
                    if y and s in ("diagonal", "ekfac"):
                        ax.axhline(min(y), color=colors[s], ls=":", lw=1.2, label=f"{s} (no rank)")
            r0 = sel[0] if sel else {}
            ax.set_title(f"{kind} · layer {layer} ({r0.get('m', '')}×{r0.get('n', '')})", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("‖C−Ĉ‖_F / ‖C‖_F")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(7, len(handles)), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"Frobenius error vs rank at step {step}  (x: kron_sum rank; Tucker/TT: their ranks)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_rows(metrics, kind, step) -> tuple[list[dict], list[int]]:
    """Model-level rows of one (kind, step) and the indices of their accuracy-vs-memory Pareto front."""
    rows = [r for r in _ok(metrics) if r["layer"] == MODEL and r["kind"] == kind and r["step"] == step]
    return rows, pareto_front([_f(r["nbytes"]) for r in rows], [_f(r["fro_rel"]) for r in rows])


def fig_error_vs_memory(metrics, path: Path) -> None:
    rows = _ok(metrics)
    step = _final(rows)
    kinds = _kinds(rows)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.4), squeeze=False)
    colors = _colors(dict.fromkeys(r["structure"] for r in rows))
    for ax, kind in zip(axes[0], kinds):
        sel, front = pareto_rows(rows, kind, step)
        seen = set()
        for r in sel:
            s = r["structure"]
            ax.scatter(_f(r["nbytes"]), _f(r["fro_rel"]), color=colors[s], s=28, zorder=3,
                       label=s if s not in seen else None)
            seen.add(s)
        for i in front:  # label the front only (the rest is in the table)
            r = sel[i]
            ax.annotate(r["variant"], (_f(r["nbytes"]), _f(r["fro_rel"])), fontsize=6.5, xytext=(4, 2),
                        textcoords="offset points", rotation=20)
        if front:
            ax.step([_f(sel[i]["nbytes"]) for i in front], [_f(sel[i]["fro_rel"]) for i in front], where="post",
                    color="k", lw=1.2, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("memory of Ĉ (bytes, all layers)")
        ax.set_ylabel("block-diag. ‖C−Ĉ‖_F / ‖C‖_F")
        ax.set_title(f"{kind}, step {step}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_error_over_training(metrics, path: Path) -> None:
    rows = [r for r in _ok(metrics) if r["layer"] == MODEL]
    kinds = _kinds(rows)
    variants = _variants(rows)
    colors = _colors(variants)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 4.0), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for v in variants:
            pts = sorted((r["step"], _f(r["fro_rel"])) for r in rows if r["kind"] == kind and r["variant"] == v)
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, color=colors[v], label=v)
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("block-diag. ‖C−Ĉ‖_F / ‖C‖_F")
    _save_with_side_legend(fig, axes, path)


def fig_spectrum(spectra, path: Path) -> None:
    step = _final(spectra)
    kinds = _kinds(spectra)
    sel = [r for r in spectra if r["step"] == step]
    layer = sel[0]["layer"] if sel else ""
    labels = [v for v in dict.fromkeys(r["structure"] for r in sel) if v != "exact"]
    colors = _colors(labels)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.8 * len(kinds), 4.0), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        ex = [r["eigenvalue"] for r in sel if r["kind"] == kind and r["structure"] == "exact"]
        for v in labels:
            ev = [r["eigenvalue"] for r in sel if r["kind"] == kind and r["structure"] == v]
            ev = [e for e in ev if e > 0]
            if ev:
                ax.semilogy(range(1, len(ev) + 1), ev, ".-", ms=2.5, lw=0.8, color=colors[v], label=v)
        ex = [e for e in ex if e > 0]
        ax.semilogy(range(1, len(ex) + 1), ex, "k-", lw=2.2, label="exact C")
        ax.set_title(f"{kind} · layer {layer} · step {step}", fontsize=10)
        ax.set_xlabel("index (descending)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("eigenvalue (positive part)")
    _save_with_side_legend(fig, axes, path)


def _damping_columns(rows) -> list[tuple[float, str]]:
    cols = {k for r in rows for k in r if k.startswith("cos@")}
    return sorted((float(k[4:]), k[4:]) for k in cols)


def fig_inverse_vs_damping(metrics, path: Path, layer: str | None = None) -> None:
    """Top row: whole model vs the full ``(C+λI)⁻¹g``; bottom row: one layer vs its exact block."""
    ok = _ok(metrics)
    step = _final(ok)
    ok = [r for r in ok if r["step"] == step]
    layers = [l for l in dict.fromkeys(r["layer"] for r in ok) if l != MODEL]
    layer = layer if layer in layers else (layers[0] if layers else None)
    kinds = _kinds(ok)
    variants = _variants(ok)
    colors = _colors(variants)
    damp = _damping_columns(ok)
    panels = [(MODEL, "whole model, cross-layer blocks in C")] + ([(layer, f"layer {layer}")] if layer else [])
    fig, axes = plt.subplots(len(panels), len(kinds), figsize=(4.6 * len(kinds), 3.6 * len(panels)), squeeze=False,
                             sharey=True, sharex=True)
    for i, (lay, what) in enumerate(panels):
        for ax, kind in zip(axes[i], kinds):
            for v in variants:
                r = next((r for r in ok if r["kind"] == kind and r["variant"] == v and r["layer"] == lay), None)
                if r is None:
                    continue
                ax.semilogx([d for d, _ in damp], [_f(r.get(f"cos@{t}")) for _, t in damp], "o-", ms=3,
                            color=colors[v], label=v)
            ax.set_title(f"{kind} · {what} · step {step}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if i == len(panels) - 1:
                ax.set_xlabel("λ / (tr C / dim)")
        axes[i][0].set_ylabel("cos((Ĉ+λI)⁻¹g, (C+λI)⁻¹g)")
    _save_with_side_legend(fig, axes, path)


# ----------------------------------------------------------------------------- markdown
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def summary_table(metrics, kind: str, step: int, damping: str) -> str:
    """Model-level row per variant: memory, times, Frobenius/spectral error, inverse quality."""
    rows, front = pareto_rows(metrics, kind, step)
    layer_rows = [r for r in _ok(metrics) if r["layer"] != MODEL and r["kind"] == kind and r["step"] == step]
    on_front = {rows[i]["variant"] for i in front}
    out = []
    for r in sorted(rows, key=lambda r: _f(r["fro_rel"])):
        lr = [x for x in layer_rows if x["variant"] == r["variant"]]
        spec = max((_f(x.get("spec_rel")) for x in lr), default=math.nan)
        out.append([f"**{r['variant']}**" if r["variant"] in on_front else r["variant"], _fmt_bytes(_f(r["nbytes"])),
                    f"{1e3 * _f(r['fit_time']):.1f}", f"{1e3 * _f(r['solve_time']):.2f}", _num(r["fro_rel"]),
                    _num(spec), _num(r.get(f"cos@{damping}")), _num(r.get(f"relerr@{damping}"))])
    return _table(["variant (bold: Pareto front)", "memory", "fit ms", "solve ms", "block-diag. Frobenius rel.",
                   "max layer spectral rel.", f"cos @ λ={damping}", f"rel. err @ λ={damping}"], out)


def layer_table(metrics, floor, step: int) -> str:
    rows = [r for r in _ok(metrics) if r["layer"] != MODEL and r["step"] == step]
    kinds = _kinds(rows)
    out = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        for v in _variants(rows):
            cells = []
            for kind in kinds:
                r = next((r for r in rows if r["layer"] == layer and r["variant"] == v and r["kind"] == kind), None)
                cells.append(_num(r["fro_rel"]) if r else "–")
            r0 = next(r for r in rows if r["layer"] == layer)
            out.append([f"{layer} ({r0['m']}×{r0['n']}, T={r0['T']})", v, *cells])
        fl = [next((f["floor"] for f in floor if f["layer"] == layer and f["kind"] == k and f["step"] == step
                    and f["rank"] == 1), math.nan) for k in kinds]
        if any(math.isfinite(_f(x)) for x in fl):
            out.append(["", "*floor, rank 1*", *[_num(x) for x in fl]])
    return _table(["layer (m×n, positions)", "variant", *kinds], out)


def floor_table(floor, step: int) -> str:
    rows = [r for r in floor if r["step"] == step]
    ranks = sorted({r["rank"] for r in rows})
    out = []
    for kind in _kinds(rows):
        for layer in dict.fromkeys(r["layer"] for r in rows if r["kind"] == kind):
            vals = {r["rank"]: r["floor"] for r in rows if r["kind"] == kind and r["layer"] == layer}
            out.append([kind, layer, *[_num(vals.get(k)) for k in ranks]])
    return _table(["kind", "layer", *[f"r={k}" for k in ranks]], out)


def training_table(metrics, training, kind: str) -> str:
    rows = [r for r in _ok(metrics) if r["layer"] == MODEL and r["kind"] == kind]
    steps = sorted({r["step"] for r in rows})
    out = [[v, *[_num(next((r["fro_rel"] for r in rows if r["variant"] == v and r["step"] == s), math.nan))
                 for s in steps]] for v in _variants(rows)]
    acc = {t["step"]: t for t in training}
    out.append(["*val. accuracy*", *[_num(acc.get(s, {}).get("val_accuracy"), 3) for s in steps]])
    return _table(["variant", *[f"step {s}" for s in steps]], out)


def write_report(result: Mapping[str, list[dict]], out_dir: str | Path, *, command: str, title: str = "Study",
                 description: str = "", logger: Any = None) -> Path:
    """Write ``report.md``, ``metrics.csv``, ``floor.csv``, ``spectra.csv``, ``training.csv`` and the
    PNG figures into ``out_dir``; log the same figures/tables to ``logger`` (``tensorcurv.experiments.tracking``)
    if given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for table in ("metrics", "floor", "spectra", "training"):
        write_csv(out / f"{table}.csv", result.get(table, []))
    metrics, floor = result["metrics"], result.get("floor", [])
    fig_error_vs_rank(metrics, floor, out / "error_vs_rank.png")
    fig_error_vs_memory(metrics, out / "error_vs_memory.png")
    fig_error_over_training(metrics, out / "error_over_training.png")
    fig_spectrum(result.get("spectra", []), out / "spectrum.png")
    spectra_layers = [r["layer"] for r in result.get("spectra", [])]
    fig_inverse_vs_damping(metrics, out / "inverse_vs_damping.png", spectra_layers[0] if spectra_layers else None)

    ok = _ok(metrics)
    step = _final(ok)
    kinds = _kinds(ok)
    damp = _damping_columns([r for r in ok if r["layer"] == MODEL])
    mid = damp[len(damp) // 2][1] if damp else ""
    skipped = sorted({(r["variant"], r["skipped"]) for r in metrics if r.get("skipped")})
    md = [f"# {title}", "", "Regenerate with:", "", "```bash", command, "```", ""]
    if description:
        md += [description, ""]
    md += ["How the numbers are computed: Frobenius errors exactly (up to rounding) from Gram-matrix "
           "identities over the per-sample factors (no `C` formed); spectral errors by Lanczos on implicit "
           "products (stopped at a relative Ritz residual of `study.spectral_tol`); exact damped inverses "
           "`(C+λI)⁻¹g` from the Woodbury identity on the per-sample Gram "
           "matrix, floors from the truncated SVD of the rearranged block `R(C)`. Model-level Frobenius errors "
           "are block-diagonal, `sqrt(Σ_l ‖C_ll−Ĉ_l‖² / Σ_l ‖C_ll‖²)`; `metrics.csv` also has `fro_rel_full` "
           "against the curvature of all covered layers together (cross-layer blocks included, "
           "`offdiag_share` = ‖off-diagonal part‖/‖C‖). Model-level inverse quality compares with the full "
           "`(C+λI)⁻¹g`, cross-layer blocks included (where `two_level`'s coarse space can help). "
           "λ is given relative to `tr(C)/dim`; g is the mini-batch gradient of the loss.", ""]
    for kind in kinds:
        md += [f"## {kind}: summary at step {step}", "", summary_table(ok, kind, step, mid), ""]
    for name, caption in FIGURES.items():
        md += [f"## {caption}", "", f"![{name}]({name}.png)", ""]
    md += [f"## Per-layer relative Frobenius error at step {step}", "", layer_table(ok, floor, step), ""]
    if floor:
        md += [f"## Floor: optimal rank-r Kronecker-sum relative error at step {step}", "",
               floor_table(floor, step), ""]
    for kind in kinds:
        md += [f"## Block-diagonal relative Frobenius error over training ({kind})", "",
               training_table(ok, result.get("training", []), kind), ""]
    if skipped:
        md += ["## Skipped", "", *[f"- {v}: {why}" for v, why in skipped], ""]
    md += ["## Files", "", "`metrics.csv` (one row per step, kind, layer, variant; `cos@ρ`/`relerr@ρ` at "
           "λ = ρ·tr(C)/dim), `floor.csv`, `spectra.csv`, `training.csv`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    if logger is not None:
        for name in FIGURES:
            logger.log_figure(name, str(out / f"{name}.png"))
        logger.log_table("metrics", metrics)
        if floor:
            logger.log_table("floor", floor)
        logger.summary({f"fro_rel/{r['kind']}/{r['variant']}": _f(r["fro_rel"])
                        for r in ok if r["layer"] == MODEL and r["step"] == step})
    return path
