"""Tables, targets and figures of the thesis study, from its CSV records (``runs.csv``, ``evals.csv``, ``errors.csv``).

* per method and dataset, at the best grid setting: final training and test loss (mean ± std over
  seeds), training wall-clock, time per step and its ratio to SGD's;
* the target loss of a dataset: the best first-order method's final training loss on its worst seed
  (the lowest, over the first-order methods, of the largest final loss over seeds: the best
  first-order method reaches it on every seed); per method the steps and the wall-clock at which
  each seed's full training loss (evaluated once per epoch) first reaches it, averaged over the seeds
  that reach it;
* the thesis's reference numbers side by side (ratios to K-FAC, since the data is regenerated);
* figures: training loss against epochs and against wall-clock (mean over seeds), Error 1 / Error 2
  over training.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorcurv import plotting
from tensorcurv.experiments.thesis_study import best_setting

#: Final training loss after 200 epochs in the thesis (Koroko et al.), CURVES autoencoder, BCE.
THESIS_CURVES = {
    "kfac": 0.0752,
    "kpsvd": 0.0750,
    "kfac_corrected": 0.0705,
    "deflation": 0.0746,
    "lanczos": 0.0705,
    "sgd": 0.0769,
    "adam": 0.0796,
}


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV with numeric fields as floats (missing file: no rows)."""
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _num(v: str) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def append_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows (header written with the first); columns are those of the file's header."""
    if not rows:
        return
    new = not path.exists()
    with path.open("a", newline="") as f:
        fields = list(rows[0]) if new else next(csv.reader(path.open()))
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def best_runs(runs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """``(dataset, method) -> rows`` of the best setting, every seed: the setting of the lowest final
    training loss on seed 0 (diverged runs count as infinite loss)."""
    seed0: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in runs:
        if r["seed"] == 0:
            seed0.setdefault((r["dataset"], r["method"]), []).append(r)
    out = {}
    for key, rs in seed0.items():
        setting = best_setting(rs)
        if setting is not None:
            out[key] = [r for r in runs if (r["dataset"], r["method"]) == key and r["setting"] == setting]
    return out


def summarize(runs: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]], first_order: Sequence[str]):
    """Per ``(dataset, method)``: the summary row (losses, times, steps and wall-clock to the target)."""
    best = best_runs(runs)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for (ds, m), rs in best.items():
        tr, te = _mean_std([r["train_loss"] for r in rs]), _mean_std([r["test_loss"] for r in rs])
        rows[ds, m] = {
            "dataset": ds,
            "method": m,
            "setting": rs[0]["setting"],
            "seeds": len(rs),
            "train": tr,
            "test": te,
            "wall": _mean_std([r["wall_time"] for r in rs])[0],
            "tps": _mean_std([r["time_per_step"] for r in rs])[0],
        }
    for ds in {d for d, _ in rows}:
        worst = [max(r["train_loss"] for r in best[d, m]) for d, m in rows if d == ds and m in first_order]
        target = min((x for x in worst if math.isfinite(x)), default=math.nan)
        sgd = rows.get((ds, "sgd"), {}).get("tps", math.nan)
        for (d, m), row in rows.items():
            if d == ds:
                row["target"], row["vs_sgd"] = target, row["tps"] / sgd
                row.update(_to_target(evals, best[d, m], target))
    return rows


def _to_target(evals: Sequence[Mapping[str, Any]], rs: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """Mean steps / wall-clock to the first evaluation with ``train_loss <= target`` (seeds that reach it)."""
    hits = []
    for r in rs:
        curve = _curve(evals, r)
        hit = next((e for e in curve if e["train_loss"] <= target * (1 + 1e-9)), None)
        if hit is not None:
            hits.append(hit)
    return {
        "reached": len(hits),
        "steps_to_target": _mean_std([h["step"] for h in hits])[0],
        "wall_to_target": _mean_std([h["wall_time"] for h in hits])[0],
    }


def _curve(evals: Sequence[Mapping[str, Any]], run: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    keys = ("dataset", "method", "setting", "seed")
    return sorted((e for e in evals if all(e[k] == run[k] for k in keys)), key=lambda e: e["step"])


def mean_curve(evals, rs, x: str) -> tuple[list[float], list[float]]:
    """Mean over the runs ``rs`` of ``train_loss`` at each evaluation (common prefix), against ``x``."""
    curves = [_curve(evals, r) for r in rs]
    n = min((len(c) for c in curves), default=0)
    xs = [statistics.mean(c[i][x] for c in curves) for i in range(n)]
    ys = [statistics.mean(c[i]["train_loss"] for c in curves) for i in range(n)]
    return xs, ys


def figure_loss(runs, evals, datasets: Sequence[str], labels: Mapping[str, str], x: str, path: Path) -> Path:
    """Training loss (mean over seeds, best setting) against ``x`` (``epoch`` or ``wall_time``), one panel
    per dataset."""
    best = best_runs(runs)
    methods = list(dict.fromkeys(m for _, m in best))
    styles = plotting.series_styles(methods)
    with plotting.style():
        fig, axes = plotting.subplots(1, len(datasets), figsize=(4.2 * len(datasets) + 2.2, 3.6))
        for ax, ds in zip(axes[0], datasets):
            ys_all = []
            for m in methods:
                if (ds, m) not in best:
                    continue
                xs, ys = mean_curve(evals, best[ds, m], x)
                ys_all += ys
                st = styles[m]
                ax.plot(
                    xs,
                    ys,
                    label=labels.get(m, m),
                    color=st["color"],
                    linestyle=st["linestyle"],
                    marker=st["marker"],
                    markersize=3,
                    markevery=max(1, len(xs) // 6),
                )
            if ys_all:
                plotting.log_limits(ax, ys_all)
            ax.set_title(ds)
            ax.set_xlabel("epoch" if x == "epoch" else "training wall-clock (s)")
            ax.set_ylabel("training loss (mean over seeds)")
        plotting.legend_outside(fig, axes)
        return plotting.save(fig, path)


def figure_errors(errors, labels: Mapping[str, str], path: Path) -> Path | None:
    """Error 1 and Error 2 against the training step, one row of two panels per dataset."""
    datasets = list(dict.fromkeys(e["dataset"] for e in errors))
    if not datasets:
        return None
    methods = list(dict.fromkeys(e["method"] for e in errors))
    styles = plotting.series_styles(methods)
    with plotting.style():
        fig, axes = plotting.subplots(len(datasets), 2, figsize=(10, 3.2 * len(datasets)))
        for row, ds in zip(axes, datasets):
            for ax, key, name in zip(row, ("error1", "error2"), ("Error 1 (Frobenius)", "Error 2 (spectral)")):
                vals = []
                for m in methods:
                    pts = sorted((e["step"], e[key]) for e in errors if e["dataset"] == ds and e["method"] == m)
                    if pts:
                        st = styles[m]
                        ax.plot(
                            *zip(*pts),
                            label=labels.get(m, m),
                            color=st["color"],
                            marker=st["marker"],
                            linestyle=st["linestyle"],
                            markersize=4,
                        )
                        vals += [p[1] for p in pts]
                if vals:
                    plotting.log_limits(ax, vals)
                layer = next(e["layer"] for e in errors if e["dataset"] == ds)
                ax.set_title(f"{ds}: {name}")
                ax.set_ylabel(f"relative error, layer {layer}")
                ax.set_xlabel("training step")
        plotting.legend_outside(fig, axes)
        return plotting.save(fig, path)


def _pm(ms: tuple[float, float], digits: int = 4) -> str:
    return "—" if not math.isfinite(ms[0]) else f"{ms[0]:.{digits}g} ± {ms[1]:.2g}"


def _g(x: float, fmt: str = ".3g") -> str:
    return "—" if not isinstance(x, float) or not math.isfinite(x) else format(x, fmt)


def failure_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """One Markdown row per run that diverged or raised (dataset, method, setting, seed, status)."""
    bad = [r for r in runs if r.get("status") != "ok"]
    if not bad:
        return []
    lines = ["| dataset | method | setting | seed | status |", "|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['method']} | {r['setting']} | {r['seed']:.0f} | {r['status']} |" for r in bad]
    return lines


def method_table(rows: Mapping[tuple[str, str], Mapping[str, Any]], ds: str, labels: Mapping[str, str]) -> str:
    """One dataset's Markdown table, methods sorted by final training loss."""
    head = (
        "| method | best setting | final train loss | final test loss | wall s | ms/step | × SGD "
        "| steps to target | wall s to target | seeds reaching |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    body = []
    for (d, m), r in sorted(
        rows.items(), key=lambda kv: kv[1]["train"][0] if math.isfinite(kv[1]["train"][0]) else 9e99
    ):
        if d != ds:
            continue
        body.append(
            f"| {labels.get(m, m)} | {r['setting']} | {_pm(r['train'])} | {_pm(r['test'])} | {_g(r['wall'])} "
            f"| {_g(1e3 * r['tps'])} | {_g(r['vs_sgd'], '.2f')} | {_g(r['steps_to_target'], '.0f')} "
            f"| {_g(r['wall_to_target'])} | {r['reached']}/{r['seeds']} |"
        )
    return "\n".join([head, *body])


def thesis_table(rows: Mapping[tuple[str, str], Mapping[str, Any]], labels: Mapping[str, str], ds: str) -> str:
    """CURVES: the thesis's final training losses and ours on ``ds``, each as a ratio to its own K-FAC."""
    ours_k = rows.get((ds, "kfac"), {}).get("train", (math.nan, 0))[0]
    head = "| method | thesis loss | thesis / K-FAC | ours | ours / K-FAC |\n|---|---|---|---|---|"
    body = []
    for m, ref in THESIS_CURVES.items():
        o = rows.get((ds, m), {}).get("train", (math.nan, 0))[0]
        body.append(
            f"| {labels.get(m, m)} | {ref} | {ref / THESIS_CURVES['kfac']:.3f} | {_g(o, '.4g')} "
            f"| {_g(o / ours_k, '.3f')} |"
        )
    return "\n".join([head, *body])
