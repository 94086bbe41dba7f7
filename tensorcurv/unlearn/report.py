"""Report of an unlearning benchmark: CSV of all rows, Markdown tables (mean ± std over seeds) and
one PNG per scenario of fidelity (``rel_dist``) against wall-clock time per method."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

COLUMNS = [("rel_dist", "‖θ−θ_r‖/‖θ*−θ_r‖", 3), ("agreement", "agree", 3), ("test_acc", "test acc", 3),
           ("affected_acc", "affected acc", 3), ("grad_residual", "‖∇L(D̃;θ)‖", 2),
           ("time", "time per request [s]", 4), ("time_oneoff", "one-off capture at θ* [s]", 4),
           ("speedup", "× vs retrain (per request)", 1), ("speedup_incl_oneoff", "× vs retrain (incl. one-off)", 1),
           ("time_vs_lissa", "time/LiSSA", 3), ("ihvp_iterations", "iters", 1)]


def _stats(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def _fmt(m: float, sd: float, digits: int) -> str:
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
            entry = {"method": name, "n": len(rs), "failed": sum(r["status"] != "ok" for r in rs),
                     "status": next((r["status"] for r in rs if r["status"] != "ok"), "ok")}
            for k in keys:
                entry[k] = _stats([r.get(k, math.nan) for r in rs])
            out[scen].append(entry)
    return out


def markdown_table(entries: list[dict[str, Any]], extra_cols: list[str] | None = None) -> str:
    cols = COLUMNS + [(c, c.replace("_acc", " success" if c == "backdoor_acc" else " acc"), 3)
                      for c in extra_cols or []]
    head = "| method | " + " | ".join(h for _, h, _ in cols) + " | ok |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for e in entries:
        cells = [_fmt(e[k][0], e[k][1], d) for k, _, d in cols]  # e[k]: (mean, std)
        ok = f"{e['n'] - e['failed']}/{e['n']}"
        lines.append(f"| {e['method']} | " + " | ".join(cells) + f" | {ok} |")
    return "\n".join(lines)


def plot_fidelity_vs_time(entries: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for e in entries:
        (t, tsd), (d, dsd) = e["time"], e["rel_dist"]
        if e["method"] == "original" or not (math.isfinite(t) and math.isfinite(d)):
            continue
        d_plot = max(d, 1e-4)  # retraining has rel_dist 0
        ax.errorbar(t, d_plot, xerr=tsd, yerr=dsd, fmt="o", capsize=2)
        ax.annotate(e["method"], (t, d_plot), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall-clock time [s] (log)")
    ax.set_ylabel("‖θ − θ_retrain‖ / ‖θ* − θ_retrain‖ (log; retrain shown at 1e-4)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, *, command: str, header: str = "",
                 descriptions: dict[str, str] | None = None) -> Path:
    """Write ``report.md``, ``results.csv`` and ``fidelity_vs_time_<scenario>.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    lines = ["# Unlearning: approximate retraining vs retraining", "",
             "Regenerate (a few minutes on 2 CPU cores):", "", "```", command, "```", ""]
    if header:
        lines += [header, ""]
    for scen, entries in summarize(rows, ["backdoor_acc"]).items():
        extra = ["backdoor_acc"] if any(math.isfinite(e["backdoor_acc"][0]) for e in entries) else []
        png = f"fidelity_vs_time_{scen}.png"
        plot_fidelity_vs_time(entries, out / png, f"{scen}: fidelity vs time (mean over seeds)")
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
