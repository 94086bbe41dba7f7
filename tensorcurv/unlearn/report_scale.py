"""Report of the scale benchmark (:mod:`.scale`): ``results.csv``, one Markdown table per (preset, scenario)
with mean ± std over seeds, and two figures each — fidelity (``rel_dist``) and restored accuracy share
against the per-request time, one marker per method, retraining as a vertical line at its time."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tensorcurv.unlearn import report

COLUMNS = [
    ("time", "per request [s]", 3),
    ("cpu_time", "per request CPU [s]", 3),
    ("time_oneoff", "one-off [s]", 2),
    ("restored", "restored", 3),
    ("rel_dist", "‖θ−θ_r‖/‖θ*−θ_r‖", 3),
    ("agreement", "agree w/ θ_r", 3),
    ("test_acc", "test acc", 3),
    ("grad_residual", "‖∇L(D̃;θ)‖", 2),
    ("mia_auc", "MIA AUC on Z", 3),
    ("backdoor_acc", "backdoor success", 3),
    ("speedup", "× vs retrain", 1),
    ("speedup_cpu", "× vs retrain (CPU)", 1),
    ("time_vs_lissa", "time/LiSSA", 3),
]


TRAINING = [
    "retrain_time_wall",
    "retrain_time_cpu",
    "retrain_iterations",
    "train_grad_norm",
    "retrain_grad_norm",
    "load1",
]


def training_line(entries: list[dict[str, Any]]) -> str:
    """Retraining wall and CPU time, L-BFGS iterations, ‖∇L‖ of ``θ*`` and ``θ_r`` and the load (mean ± std over
    seeds) from the ``retrain`` entry of :func:`report.summarize`."""
    e = next((e for e in entries if e["method"] == "retrain"), None)
    if e is None or not math.isfinite(e["retrain_time_cpu"][0]):
        return ""

    def f(key: str, digits: int) -> str:
        return report.format_mean_std(e[key][0], e[key][1], digits)

    return (
        f"Retraining (mean ± std over {e['n']} seeds): {f('retrain_time_wall', 1)} s wall, "
        f"{f('retrain_time_cpu', 1)} s CPU (≈ the wall-clock of an idle machine), {f('retrain_iterations', 0)} "
        f"L-BFGS iterations; ‖∇L(D; θ*)‖ = {f('train_grad_norm', 2)}, ‖∇L(D̃; θ_r)‖ = {f('retrain_grad_norm', 2)}; "
        f"1-min load average at the start {f('load1', 1)}."
    )


def _group(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``scenario`` set to ``<preset>/<scenario>`` so :func:`report.summarize` groups per problem."""
    return [{**r, "scenario": f"{r['preset']}/{r['scenario']}"} for r in rows]


def markdown_table(entries: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(math.isfinite(e[c[0]][0]) for e in entries)]
    lines = ["| method | " + " | ".join(h for _, h, _ in cols) + " | ok |", "|" + "---|" * (len(cols) + 2)]
    for e in entries:
        cells = [report.format_mean_std(e[k][0], e[k][1], d) for k, _, d in cols]
        lines.append(f"| {e['method']} | " + " | ".join(cells) + f" | {e['n'] - e['failed']}/{e['n']} |")
    return "\n".join(lines)


def plot_metric_vs_time(
    entries: list[dict[str, Any]],
    key: str,
    ylabel: str,
    path: Path,
    title: str,
    xlabel: str = "wall-clock time per request [s] (log)",
) -> None:
    """``key`` (mean ± std over seeds) against the per-request time (log), one marker per method with the
    legend outside; retraining is the vertical dashed line at its time."""
    from tensorcurv import plotting

    shown = [
        e
        for e in entries
        if e["method"] not in ("original", "retrain") and math.isfinite(e["time"][0]) and math.isfinite(e[key][0])
    ]
    styles = plotting.series_styles(
        [e["method"] for e in shown], {e["method"]: report.method_family(e["method"]) for e in shown}
    )
    retrain = next((e for e in entries if e["method"] == "retrain"), None)
    with plotting.style():
        fig, axes = plotting.subplots(1, 1, figsize=(8.0, 4.8))
        ax = axes[0][0]
        for e in shown:
            st = styles[e["method"]]
            ax.errorbar(
                e["time"][0], e[key][0], xerr=e["time"][1] or None, yerr=e[key][1] or None, ls="none",
                marker=st["marker"], color=st["color"], ms=7, elinewidth=0.9, label=e["method"],
            )  # fmt: skip
        if key == "restored":
            ax.axhline(1.0, color=plotting.REFERENCE, ls="-", lw=0.8, label="retrained accuracy (1)")
            ax.axhline(0.0, color=plotting.REFERENCE, ls=":", lw=1.0, label="poisoned θ* (0)")
        times = [e["time"][0] for e in shown]
        if retrain is not None and math.isfinite(retrain["time"][0]):
            t = retrain["time"][0]
            ax.axvline(t, color=plotting.REFERENCE, ls="--", lw=1.2, label=f"retrain from scratch, {t:.3g} s")
            times.append(t)
        plotting.log_limits(ax, times, axis="x")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        plotting.legend_outside(fig, [ax])
        plotting.save(fig, path)


def _cpu_time_axis(entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The entries with ``time`` replaced by ``cpu_time`` when retraining's CPU time was measured (then wall-clock
    under a varying load does not distort the comparison), and the matching axis label."""
    retrain = next((e for e in entries if e["method"] == "retrain"), None)
    if retrain is None or not math.isfinite(retrain.get("cpu_time", (math.nan,))[0]):
        return entries, "wall-clock time per request [s]"
    return [{**e, "time": e["cpu_time"]} for e in entries], "CPU time per request [s] (one thread ≈ idle wall-clock)"


def write_figures(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    paths = []
    for prob, entries in report.summarize(_group(rows), [c for c, _, _ in COLUMNS]).items():
        stem = prob.replace("/", "_")
        entries, xlabel = _cpu_time_axis(entries)
        paths.append(out / f"fidelity_vs_time_{stem}.png")
        report.plot_fidelity_vs_time(entries, paths[-1], f"{prob}: fidelity vs time", xlabel)
        if any(math.isfinite(e["restored"][0]) for e in entries if e["method"] not in ("original", "retrain")):
            paths.append(out / f"restored_vs_time_{stem}.png")
            plot_metric_vs_time(
                entries, "restored", "share of lost test accuracy restored", paths[-1], f"{prob}: accuracy restored",
                xlabel + " (log)",
            )  # fmt: skip
    return paths


def write_report(
    rows: list[dict[str, Any]], out_dir: str | Path, *, command: str, header: str, descriptions: dict[str, str]
) -> Path:
    """``report.md``, ``results.csv`` and the figures into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, out / "results.csv")
    write_figures(rows, out)
    lines = ["# Unlearning where retraining hurts: scale benchmark", "", "```", command, "```", "", header, ""]
    for prob, entries in report.summarize(_group(rows), [c for c, _, _ in COLUMNS] + TRAINING).items():
        stem = prob.replace("/", "_")
        lines += [f"## {prob}", "", descriptions.get(prob, ""), "", training_line(entries), ""]
        lines += [markdown_table(entries), ""]
        lines.append(f"![fidelity vs time](fidelity_vs_time_{stem}.png)")
        if (out / f"restored_vs_time_{stem}.png").exists():
            lines.append(f"![restored vs time](restored_vs_time_{stem}.png)")
        lines.append("")
        lines += [
            f"- `{e['method']}` failed in {e['failed']}/{e['n']} runs: {e['status']}" for e in entries if e["failed"]
        ]
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
