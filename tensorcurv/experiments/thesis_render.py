"""``report.md`` of the thesis study (:mod:`tensorcurv.experiments.thesis_report` does the numbers and
figures): protocol, per-dataset tables, the thesis side by side, the two targets (#15: best second-order
method against the best modern first-order one; #17: refined natural gradient against plain K-FAC),
the curvature errors, and the hand-written discussion ``notes.md`` of the report directory if present."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tensorcurv.experiments import thesis_report as tr
from tensorcurv.experiments import thesis_study as ts


def _protocol_lines(proto: ts.Protocol, datasets: Sequence[str], out: Path) -> list[str]:
    lines = ["## Protocol", ""]
    for ds in datasets:
        lim = proto.limit[ds]
        lines.append(
            f"- **{ds}** ({ts.DATASETS[ds].label}): {proto.epochs[ds]} epochs, batch {proto.batch_size}, "
            f"{'all samples' if lim is None else f'{lim} samples per split'}, grid of {proto.grid_size[ds]} "
            f"settings per method, {proto.seeds} seeds."
        )
    lines += [
        f"- Second-order methods: natural gradient, MC Fisher, statistics and inverses every {proto.stats_interval} "
        "steps, running average 0.95, momentum 0.9, KL clip 1e-3; grid lr × damping from "
        f"{ts.SECOND_ORDER_LRS} × {ts.SECOND_ORDER_DAMPINGS}. First-order grids: lr from "
        f"{dict(ts.FIRST_ORDER_LRS)} (others {ts.DEFAULT_FIRST_ORDER_LRS}); a reduced grid keeps the central "
        "settings. Best setting: lowest final training loss on seed 0.",
        f"- torch {torch.__version__}, device {proto.device}, float32, 1 thread per run.",
    ]
    for inv in tr.read_csv(out / "invocations.csv"):
        d = {k: json.loads(v) if isinstance(v, str) else v for k, v in inv.items()}
        lines.append(
            f"- Invocation `{d['command']}`: {int(d['runs'])} runs in {d['seconds'] / 60:.1f} min; "
            f"os.getloadavg() {_load(d['loadavg_start'])} at start, {_load(d['loadavg_end'])} at end, "
            f"{int(d['cpus'])} CPUs."
        )
    return lines + [""]


def _load(xs: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in xs) + ")"


def _best(rows, ds: str, methods: Sequence[str], key: str) -> tuple[str, Mapping[str, Any]] | None:
    """The method of ``methods`` with the smallest ``key`` among those whose every seed reached the target."""
    cands = [(m, r) for (d, m), r in rows.items() if d == ds and m in methods and r["reached"] == r["seeds"]]
    cands = [(m, r) for m, r in cands if math.isfinite(r[key])]
    return min(cands, key=lambda mr: mr[1][key]) if cands else None


def _target_lines(rows, labels: Mapping[str, str]) -> list[str]:
    lines = ["## Targets", ""]
    second = [m for m, meth in ts.METHODS.items() if meth.second_order]
    for ds in dict.fromkeys(d for d, _ in rows):
        target = next(r["target"] for (d, _), r in rows.items() if d == ds)
        so, fo = _best(rows, ds, second, "wall_to_target"), _best(rows, ds, ts.MODERN_FIRST_ORDER, "wall_to_target")
        lines.append(f"- **{ds}**, target training loss {target:.4g} (best first-order final loss, worst seed):")
        if so and fo:
            ratio = so[1]["wall_to_target"] / fo[1]["wall_to_target"]
            verdict = "reaches it first" if ratio < 1 else "is slower"
            lines.append(
                f"  #15: best second-order {labels[so[0]]} {so[1]['wall_to_target']:.3g} s "
                f"({so[1]['steps_to_target']:.0f} steps) vs best of AdamW/Muon/SOAP/Shampoo/PSGD-Kron "
                f"{labels[fo[0]]} {fo[1]['wall_to_target']:.3g} s ({fo[1]['steps_to_target']:.0f} steps): "
                f"second order {verdict} (× {ratio:.2f} wall-clock)."
            )
        else:
            lines.append(
                f"  #15: every seed reaching the target: second order {labels[so[0]] if so else 'none'}, "
                f"modern first order {labels[fo[0]] if fo else 'none'}. " + _gap(rows, ds, second, target, labels)
            )
        lines.append("  " + _refine_line(rows, ds))
    return lines + [""]


def _gap(rows, ds: str, methods: Sequence[str], target: float, labels: Mapping[str, str]) -> str:
    """How far the best (lowest mean final loss) of ``methods`` ends from the target, and its step cost."""
    cands = [(m, r) for (d, m), r in rows.items() if d == ds and m in methods and math.isfinite(r["train"][0])]
    if not cands:
        return ""
    m, r = min(cands, key=lambda mr: mr[1]["train"][0])
    return (
        f"Best second-order final loss: {labels[m]} {r['train'][0]:.4g}, {100 * (r['train'][0] / target - 1):+.1f} % "
        f"from the target, at {r['vs_sgd']:.1f}× SGD's time per step."
    )


def _refine_line(rows, ds: str) -> str:
    k, r = rows.get((ds, "kfac")), rows.get((ds, "kfac_refine10"))
    if k is None or r is None:
        return "#17: K-FAC or refined K-FAC not run."

    def show(x: Mapping[str, Any]) -> str:
        if not x["reached"]:
            return f"not reached (0/{x['seeds']} seeds)"
        return (
            f"{x['steps_to_target']:.0f} steps, {x['wall_to_target']:.3g} s ({x['reached']:.0f}/{x['seeds']} seeds; "
            f"final loss {x['train'][0]:.4g})"
        )

    return f"#17: K-FAC + 10 PCG steps {show(r)}; plain K-FAC {show(k)}."


def _error_lines(errors, labels: Mapping[str, str]) -> list[str]:
    if not errors:
        return []
    lines = [
        "## Curvature errors over training (seed 1, best setting)",
        "",
        "Error 1 = ‖C − Ĉ‖_F/‖C‖_F, Error 2 = ‖C − Ĉ‖₂/‖C‖₂ on one layer, C the exact block of the MC Fisher "
        "on the first 128 training samples, Ĉ the method's structure fitted to the same statistics "
        "(`tensorcurv.study.layer_errors`); K-FAC + refinement has K-FAC's matrix; two-level is its base block "
        "on one layer.",
        "",
        "| dataset | method | layer | step | Error 1 | Error 2 |",
        "|---|---|---|---|---|---|",
    ]
    for e in errors:
        lines.append(
            f"| {e['dataset']} | {labels.get(e['method'], e['method'])} | {e['layer']} "
            f"| {e['step']:.0f} | {e['error1']:.3g} | {e['error2']:.3g} |"
        )
    return lines + ["", "![errors](errors.png)", ""]


def render(out: Path, proto: ts.Protocol) -> Path:
    """Write ``out/report.md`` and its figures from the CSVs in ``out`` (every dataset they hold, whichever
    invocation ran it); returns the report's path."""
    runs, evals, errors = (tr.read_csv(out / f) for f in ("runs.csv", "evals.csv", "errors.csv"))
    labels = {m: meth.label or m for m, meth in ts.METHODS.items()}
    first = [m for m, meth in ts.METHODS.items() if not meth.second_order]
    rows = tr.summarize(runs, evals, first)
    present = [d for d in ts.DATASETS if any(d == k[0] for k in rows)]
    lines = ["# The thesis study: K-FAC, KPSVD, two-level K-FAC, refined NG and the 2026 baselines", ""]
    lines += [f"Generated by `scripts/thesis.py` from `{out.name}/runs.csv`, `evals.csv`, `errors.csv`.", ""]
    lines += _protocol_lines(proto, present, out)
    lines += ["## Results (best setting per method, mean ± std over seeds)", ""]
    lines += [
        "Times are training time only (evaluation excluded); × SGD is the mean time per step over SGD's on the "
        "same dataset. Target: the best first-order method's final training loss on its worst seed; steps and "
        "wall-clock to it are means over the seeds that reach it (full training loss evaluated once per epoch).",
        "",
    ]
    for ds in present:
        lines += [f"### {ds}", "", tr.method_table(rows, ds, labels), ""]
    if present:
        tr.figure_loss(runs, evals, present, labels, "epoch", out / "loss_vs_epoch.png")
        tr.figure_loss(runs, evals, present, labels, "wall_time", out / "loss_vs_wall.png")
        lines += ["![loss vs epoch](loss_vs_epoch.png)", "", "![loss vs wall-clock](loss_vs_wall.png)", ""]
    lines += _target_lines(rows, labels)
    if failures := tr.failure_lines(runs):
        lines += ["## Runs that failed", "", "A failed run ranks last in its grid.", "", *failures, ""]
    for ds in (d for d in present if d.startswith("curves") and (d, "kfac") in rows):
        lines += [f"## Side by side with the thesis (CURVES, final training loss; ours: {ds})", ""]
        lines += [tr.thesis_table(rows, labels, ds), ""]
        lines += ["Thesis rows without a number here are presets not yet wired into the study.", ""]
    if tr.figure_errors(errors, labels, out / "errors.png") is not None:
        lines += _error_lines(errors, labels)
    notes = out / "notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
