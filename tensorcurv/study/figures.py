"""The PNG figures of a study report, drawn in the style of :mod:`tensorcurv.plotting` from the tables of
:func:`tensorcurv.study.runner.run_study` (or :func:`tensorcurv.study.tables.read_result`).

    python -m tensorcurv.study.figures reports/study_digits_mlp   # re-draw from the CSVs, report.md untouched
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from tensorcurv import plotting
from tensorcurv.study.front_figures import (
    fig_cosine_vs_memory,
    fig_direction_pareto,
    fig_error_vs_memory,
    variant_styles,
)
from tensorcurv.study.tables import (
    MODEL,
    as_float,
    damping_columns,
    final_step,
    kinds_of,
    rank_value,
    read_result,
    valid_rows,
)

__all__ = [
    "FIGURES",
    "fig_cosine_vs_memory",
    "fig_direction_pareto",
    "fig_error_over_training",
    "fig_error_vs_memory",
    "fig_error_vs_rank",
    "fig_inverse_vs_damping",
    "fig_spectrum",
    "write_figures",
]

FIGURES = {
    "error_vs_rank": "Relative Frobenius error vs rank (final checkpoint), with the optimal rank-r Kronecker-sum floor",
    "error_vs_memory": "Block-diagonal relative Frobenius error vs memory at every checkpoint (rows: kinds), "
    "Pareto front; two_level left out (its layer blocks are only its base)",
    "cosine_vs_memory": "Whole-model direction cosine (unrefined, λ = 1e-3·tr(C)/D) vs memory at every checkpoint "
    "(rows: kinds), Pareto front",
    "direction_pareto": "Direction study: whole-model cosine to (C+λI)⁻¹g vs wall-clock per step (fit + solve + "
    "refinement; each variant's line runs through its refinement steps k), Pareto front (final checkpoint)",
    "error_over_training": "Block-diagonal relative Frobenius error at the checkpoints of the run",
    "spectrum": "Eigenvalues of the exact block vs each structure (chosen layer, final checkpoint)",
    "inverse_vs_damping": "Cosine between (Ĉ+λI)⁻¹g and (C+λI)⁻¹g vs damping λ/(tr C/dim): whole model (top), "
    "the spectrum layer (bottom)",
}


def fig_error_vs_rank(metrics, floor, path: Path):
    """One panel per (kind, layer): relative Frobenius error vs rank for the ranked structures, the
    optimal rank-r floor (black dashes), and the structures without a rank (K-FAC, EK-FAC, ...) as dotted levels."""
    rows = [r for r in valid_rows(metrics) if math.isfinite(as_float(r.get("fro_rel")))]
    step = final_step(rows)
    kinds = kinds_of(rows)
    layers = [lay for lay in dict.fromkeys(r["layer"] for r in rows) if lay != MODEL]
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    styles = plotting.series_styles(structures)
    with plotting.style():
        fig, axes = plotting.subplots(
            len(kinds), len(layers), sharex=True, figsize=(3.4 * len(layers), 2.7 * len(kinds) + 0.8)
        )
        for i, kind in enumerate(kinds):
            for j, layer in enumerate(layers):
                ax = axes[i][j]
                sel = [r for r in rows if r["step"] == step and r["kind"] == kind and r["layer"] == layer]
                fl = sorted(
                    (r["rank"], r["floor"])
                    for r in floor
                    if r["step"] == step and r["kind"] == kind and r["layer"] == layer
                )
                if fl:
                    ax.plot(
                        [x for x, _ in fl],
                        [y for _, y in fl],
                        ls="--",
                        color=plotting.REFERENCE,
                        lw=1.5,
                        label="floor (optimal rank-r)",
                    )
                for s in dict.fromkeys(r["structure"] for r in sel):
                    st = styles[s]
                    pts = sorted((rank_value(r), as_float(r["fro_rel"])) for r in sel if r["structure"] == s)
                    pts = [p for p in pts if math.isfinite(p[0])]
                    y = [as_float(r["fro_rel"]) for r in sel if r["structure"] == s]
                    if len(pts) > 1:
                        ax.plot(*zip(*pts), color=st["color"], marker=st["marker"], ms=4, label=s)
                    elif len(pts) == 1:
                        ax.plot(*pts[0], ls="none", color=st["color"], marker=st["marker"], ms=6, label=s)
                    elif y:  # no rank hyperparameter (kfac, ekfac, diagonal, dense, two_level): a level
                        ax.axhline(min(y), color=st["color"], ls=":", lw=1.4, label=f"{s} (no rank)")
                r0 = sel[0] if sel else {}
                ax.set_title(f"{kind} · layer {layer} ({r0.get('m', '')}×{r0.get('n', '')})", fontsize=9)
                ax.set_ylim(bottom=0)
                if j == 0:
                    ax.set_ylabel("‖C−Ĉ‖_F / ‖C‖_F")
                if i == len(kinds) - 1:
                    ax.set_xlabel("rank")
        plotting.legend_outside(fig, axes, where="bottom", ncols=7)
        fig.suptitle(f"Frobenius error vs rank at step {step}  (x: kron_sum rank; Tucker/TT: their largest rank)")
        plotting.save(fig, path)
    return fig


def fig_error_over_training(metrics, path: Path):
    """One panel per kind: model-level error of every variant at the checkpoints (hollow markers, so that
    equal values of two variants stay visible; variants without a Frobenius error are left out)."""
    rows = [r for r in valid_rows(metrics) if r["layer"] == MODEL and math.isfinite(as_float(r["fro_rel"]))]
    kinds = kinds_of(rows)
    styles = variant_styles(rows)
    with plotting.style():
        fig, axes = plotting.subplots(1, len(kinds), figsize=(4.2 * len(kinds) + 1.8, 3.8), sharey=True)
        for ax, kind in zip(axes[0], kinds):
            for v, st in styles.items():
                pts = sorted(
                    (r["step"], as_float(r["fro_rel"])) for r in rows if r["kind"] == kind and r["variant"] == v
                )
                if pts:
                    ax.plot(*zip(*pts), ms=5, mfc="none", label=v, **st)
            ax.set_title(kind)
            ax.set_xlabel("training step")
        axes[0][0].set_ylabel("block-diag. ‖C−Ĉ‖_F / ‖C‖_F")
        plotting.legend_outside(fig, axes)
        plotting.save(fig, path)
    return fig


def fig_spectrum(spectra, path: Path):
    """One panel per kind: the positive eigenvalues (descending) of the exact block (thick black) and of
    each structure at the chosen layer, log scale with limits containing every plotted eigenvalue."""
    step = final_step(spectra)
    kinds = kinds_of(spectra)
    sel = [r for r in spectra if r["step"] == step]
    layer = sel[0]["layer"] if sel else ""
    labels = [v for v in dict.fromkeys(r["structure"] for r in sel) if v != "exact"]
    styles = plotting.series_styles(labels, {v: v.split("(")[0] for v in labels})
    with plotting.style():
        fig, axes = plotting.subplots(1, len(kinds), figsize=(4.4 * len(kinds) + 1.8, 3.8))
        for ax, kind in zip(axes[0], kinds):
            shown = []
            ex = [e for e in (r["eigenvalue"] for r in sel if r["kind"] == kind and r["structure"] == "exact") if e > 0]
            ax.plot(range(1, len(ex) + 1), ex, color=plotting.REFERENCE, lw=3.2, alpha=0.45, zorder=2, label="exact C")
            shown += ex
            for v in labels:
                ev = [e for e in (r["eigenvalue"] for r in sel if r["kind"] == kind and r["structure"] == v) if e > 0]
                if ev:
                    ax.plot(
                        range(1, len(ev) + 1),
                        ev,
                        lw=1.0,
                        ms=3.5,
                        markevery=max(1, len(ev) // 8),
                        zorder=3,
                        label=v,
                        **styles[v],
                    )
                    shown += ev
            if shown:
                plotting.log_limits(ax, shown)
            ax.set_title(f"{kind} · layer {layer} · step {step}")
            ax.set_xlabel("index (descending)")
        axes[0][0].set_ylabel("eigenvalue (positive part)")
        plotting.legend_outside(fig, axes)
        plotting.save(fig, path)
    return fig


def fig_inverse_vs_damping(metrics, path: Path, layer: str | None = None):
    """Top row: whole model vs the full ``(C+λI)⁻¹g``; bottom row: one layer vs its exact block."""
    ok = valid_rows(metrics)
    step = final_step(ok)
    ok = [r for r in ok if r["step"] == step]
    layers = [lay for lay in dict.fromkeys(r["layer"] for r in ok) if lay != MODEL]
    layer = layer if layer in layers else (layers[0] if layers else None)
    kinds = kinds_of(ok)
    styles = variant_styles(ok)
    damp = damping_columns(ok)
    panels = [(MODEL, "whole model vs full C")] + ([(layer, f"layer {layer} vs its block")] if layer else [])
    with plotting.style():
        fig, axes = plotting.subplots(
            len(panels), len(kinds), sharey=True, sharex=True, figsize=(4.2 * len(kinds) + 1.8, 3.4 * len(panels))
        )
        for i, (lay, what) in enumerate(panels):
            for ax, kind in zip(axes[i], kinds):
                for v, st in styles.items():
                    r = next((r for r in ok if r["kind"] == kind and r["variant"] == v and r["layer"] == lay), None)
                    if r is None:
                        continue
                    ys = [as_float(r.get(f"cos@{t}")) for _, t in damp]
                    ax.plot([d for d, _ in damp], ys, ms=5, mfc="none", label=v, **st)
                ax.set_xscale("log")
                ax.set_title(f"{kind} · {what} · step {step}", fontsize=9)
                if i == len(panels) - 1:
                    ax.set_xlabel("λ / (tr C / dim)")
            axes[i][0].set_ylabel("cos((Ĉ+λI)⁻¹g, (C+λI)⁻¹g)")
        plotting.legend_outside(fig, axes)
        plotting.save(fig, path)
    return fig


def write_figures(result: Mapping[str, list[dict]], out_dir: str | Path) -> list[Path]:
    """Draw the PNG figures of :data:`FIGURES` into ``out_dir`` from a study's tables (those of
    :func:`tensorcurv.study.runner.run_study` or :func:`read_result`); returns their paths."""
    out = Path(out_dir)
    metrics, floor, spectra = result["metrics"], result.get("floor", []), result.get("spectra", [])
    directions = result.get("directions", [])
    spectra_layers = [r["layer"] for r in spectra]
    fig_error_vs_rank(metrics, floor, out / "error_vs_rank.png")
    fig_error_vs_memory(metrics, out / "error_vs_memory.png")
    names = [n for n in FIGURES if directions or n not in ("cosine_vs_memory", "direction_pareto")]
    if directions:
        fig_cosine_vs_memory(directions, out / "cosine_vs_memory.png")
        fig_direction_pareto(directions, out / "direction_pareto.png")
    fig_error_over_training(metrics, out / "error_over_training.png")
    fig_spectrum(spectra, out / "spectrum.png")
    fig_inverse_vs_damping(metrics, out / "inverse_vs_damping.png", spectra_layers[0] if spectra_layers else None)
    return [out / f"{name}.png" for name in names]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tensorcurv.study.figures DIR...``: re-draw the PNG figures of each report directory from
    its CSVs, leaving ``report.md`` and the CSVs untouched (``scripts/study.py render_only=true`` also
    re-renders ``report.md``, from the CSVs' 6 significant digits)."""
    import sys

    dirs = list(sys.argv[1:] if argv is None else argv)
    if not dirs:
        raise SystemExit("usage: python -m tensorcurv.study.figures REPORT_DIR [REPORT_DIR ...]")
    for d in dirs:
        for path in write_figures(read_result(d), d):
            print(f"re-drew {path}")


if __name__ == "__main__":
    main()
