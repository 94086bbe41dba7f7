"""Report of an unlearning benchmark: CSV of all rows, Markdown tables (mean ± std over seeds) and
one PNG per scenario of fidelity (``rel_dist``) against wall-clock time per method."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

COLUMNS = [
    ("rel_dist", "‖θ−θ_r‖/‖θ*−θ_r‖", 3),
    ("agreement", "agree", 3),
    ("test_acc", "test acc", 3),
    ("affected_acc", "affected acc", 3),
    ("grad_residual", "‖∇L(D̃;θ)‖", 2),
    ("time", "time per request [s]", 4),
    ("time_oneoff", "one-off capture at θ* [s]", 4),
    ("speedup", "× vs retrain (per request)", 1),
    ("speedup_incl_oneoff", "× vs retrain (incl. one-off)", 1),
    ("time_vs_lissa", "time/LiSSA", 3),
    ("ihvp_iterations", "iters", 1),
]


def _stats(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def format_mean_std(m: float, sd: float, digits: int) -> str:
    """``mean ± std`` with ``digits`` decimals (scientific for very large or small values; "—" for NaN)."""
    if not math.isfinite(m):
        return "—"
    if abs(m) >= 1e4 or (0 < abs(m) < 10 ** (-digits)):
        return f"{m:.2e}" + (f" ± {sd:.1e}" if sd else "")
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")


def summarize(rows: list[dict[str, Any]], extra_cols: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Group rows by scenario then method (first-seen order); mean and std of every metric."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[r.get("scenario", "")][r["method"]].append(r)
    out: dict[str, list[dict[str, Any]]] = {}
    keys = [c for c, _, _ in COLUMNS] + (extra_cols or [])
    for scen, methods in groups.items():
        out[scen] = []
        for name, rs in methods.items():
            entry = {
                "method": name,
                "n": len(rs),
                "failed": sum(r["status"] != "ok" for r in rs),
                "status": next((r["status"] for r in rs if r["status"] != "ok"), "ok"),
            }
            for k in keys:
                entry[k] = _stats([r.get(k, math.nan) for r in rs])
            out[scen].append(entry)
    return out


def markdown_table(entries: list[dict[str, Any]], extra_cols: list[str] | None = None) -> str:
    cols = COLUMNS + [
        (c, c.replace("_acc", " success" if c == "backdoor_acc" else " acc"), 3) for c in extra_cols or []
    ]
    head = "| method | " + " | ".join(h for _, h, _ in cols) + " | ok |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for e in entries:
        cells = [format_mean_std(e[k][0], e[k][1], d) for k, _, d in cols]  # e[k]: (mean, std)
        ok = f"{e['n'] - e['failed']}/{e['n']}"
        lines.append(f"| {e['method']} | " + " | ".join(cells) + f" | {ok} |")
    return "\n".join(lines)


def method_family(name: str) -> str:
    """The solver or structure a method is built on (``"kfac+refine (cached)"`` → ``"kfac"``): one colour
    per family in the figures."""
    return name.split(" (")[0].split("+")[0].split(" x")[0]


def plot_fidelity_vs_time(
    entries: list[dict[str, Any]], path: Path, title: str, xlabel: str = "wall-clock time per request [s]"
):
    """Fidelity ``rel_dist`` (log) against time per request (log), mean ± std over seeds, one marker per
    method (legend). Retraining (``rel_dist`` 0 by definition) is the vertical black line at its time, the
    original model (``rel_dist`` 1) the horizontal dotted line. Returns the saved figure."""
    from tensorcurv import plotting

    shown = [
        e
        for e in entries
        if e["method"] not in ("original", "retrain")
        and math.isfinite(e["time"][0])
        and math.isfinite(e["rel_dist"][0])
    ]
    styles = plotting.series_styles(
        [e["method"] for e in shown], {e["method"]: method_family(e["method"]) for e in shown}
    )
    retrain = next((e for e in entries if e["method"] == "retrain" and math.isfinite(e["time"][0])), None)
    with plotting.style():
        fig, axes = plotting.subplots(1, 1, figsize=(8.0, 4.8))
        ax = axes[0][0]
        for e in shown:
            (t, tsd), (d, dsd) = e["time"], e["rel_dist"]
            st = styles[e["method"]]
            ax.errorbar(
                t,
                d,
                xerr=tsd or None,
                yerr=dsd or None,
                ls="none",
                marker=st["marker"],
                color=st["color"],
                ms=7,
                elinewidth=0.9,
                label=e["method"],
            )
        ax.axhline(1.0, color=plotting.REFERENCE, ls=":", lw=1.0, label="original θ* (rel. dist. 1)")
        times = [e["time"][0] for e in shown]
        if retrain is not None:
            t = retrain["time"][0]
            ax.axvline(t, color=plotting.REFERENCE, ls="--", lw=1.2, label=f"retrain (rel. dist. 0), {t:.3g} s")
            times.append(t)
        plotting.log_limits(
            ax,
            [e["rel_dist"][0] - e["rel_dist"][1] for e in shown]
            + [1.0]
            + [e["rel_dist"][0] + e["rel_dist"][1] for e in shown]
            + [e["rel_dist"][0] for e in shown],
        )
        plotting.log_limits(ax, times, axis="x")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("‖θ − θ_r‖ / ‖θ* − θ_r‖  (lower is better)")
        ax.set_title(title)
        plotting.legend_outside(fig, [ax])
        plotting.save(fig, path)
    return fig


def write_figures(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One ``fidelity_vs_time_<scenario>.png`` per scenario of ``rows`` (those of the benchmark or of
    :func:`read_csv`) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = []
    for scen, entries in summarize(rows).items():
        paths.append(out / f"fidelity_vs_time_{scen}.png")
        plot_fidelity_vs_time(entries, paths[-1], f"{scen}: fidelity vs time (mean ± std over seeds)")
    return paths


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``results.csv`` back, numbers as floats (empty cells NaN), to re-draw the figures
    without rerunning the benchmark."""
    text = {"scenario", "method", "status", "preset"}
    with open(path, newline="") as f:
        return [
            {k: v if k in text else (float(v) if v != "" else math.nan) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def write_report(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    command: str,
    header: str = "",
    descriptions: dict[str, str] | None = None,
) -> Path:
    """Write ``report.md``, ``results.csv`` and ``fidelity_vs_time_<scenario>.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    write_figures(rows, out)
    lines = [
        "# Unlearning: approximate retraining vs retraining",
        "",
        "Regenerate (a few minutes on 2 CPU cores):",
        "",
        "```",
        command,
        "```",
        "",
    ]
    if header:
        lines += [header, ""]
    for scen, entries in summarize(rows, ["backdoor_acc"]).items():
        extra = ["backdoor_acc"] if any(math.isfinite(e["backdoor_acc"][0]) for e in entries) else []
        png = f"fidelity_vs_time_{scen}.png"
        lines += [f"## {scen}", ""]
        if descriptions and scen in descriptions:
            lines += [descriptions[scen], ""]
        lines += [markdown_table(entries, extra), "", f"![fidelity vs time]({png})", ""]
        failed = [e for e in entries if e["failed"]]
        for e in failed:
            lines.append(f"- `{e['method']}` failed in {e['failed']}/{e['n']} runs: {e['status']}")
        if failed:
            lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
