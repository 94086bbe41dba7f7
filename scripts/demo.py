"""`make demo`: natural gradient with K-FAC vs Adam on digits, end to end, on CPU in seconds.

Two races through ``tensorcurv.experiments.runner.run_training``: the MLP classifier (``digits_mlp_kfac`` vs
``digits_mlp_adam``) and the autoencoder (``digits_autoencoder_ng_kfac`` vs ``digits_autoencoder_adam``,
conf/experiment/); prints a comparison table and writes
``reports/demo/loss_curves.png`` and ``reports/demo/demo.md``. Run directories: ``outputs/demo/<name>``.
Extra arguments are Hydra overrides applied to every run, e.g. ``python scripts/demo.py epochs=3``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from tensorcurv.experiments.cli import report_errors  # noqa: E402
from tensorcurv.experiments.config import validate_train  # noqa: E402
from tensorcurv.experiments.runner import run_training  # noqa: E402

#: (race, optimizer label) -> (experiment, extra overrides). The autoencoder's Adam runs at the batch size and
#: learning rate that won its sweep in ``scripts/bench_optim.py`` part (b) (batch 256, lr 1e-2), like NG there.
RACES = {
    ("classifier: MLP 64-64-64-10 tanh, cross-entropy", "NaturalGradient + K-FAC"): ("digits_mlp_kfac", []),
    ("classifier: MLP 64-64-64-10 tanh, cross-entropy", "Adam"): ("digits_mlp_adam", []),
    ("autoencoder: 64-128-32-128-64 sigmoid, MSE", "NaturalGradient + K-FAC"): ("digits_autoencoder_ng_kfac", []),
    ("autoencoder: 64-128-32-128-64 sigmoid, MSE", "Adam"): (
        "digits_autoencoder_adam",
        ["batch_size=256", "optim.lr=0.01"],
    ),
}
OUT = ROOT / "reports" / "demo"


def _evals(summary: dict) -> list[dict]:
    import csv

    with open(Path(summary["run_dir"]) / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["train_loss"]]


def loss_curves_figure(curves: dict[tuple[str, str], list[dict]], path: Path):
    """``curves``: ``{(race, optimizer): evaluation rows (epoch, wall_time, train_loss, test_loss)}``. One row
    of panels per (race, split): train loss and test loss apart (they nearly coincide for the autoencoder),
    against epoch (left) and training wall-clock (right); the two panels of a race share their y-axis."""
    from tensorcurv import plotting

    races = list(dict.fromkeys(race for race, _ in curves))
    styles = plotting.series_styles(label for _, label in curves)
    with plotting.style():
        fig, axes = plotting.subplots(2 * len(races), 2, figsize=(10, 2.7 * 2 * len(races)))
        for i, race in enumerate(races):
            ylabel = "cross-entropy loss" if race.startswith("classifier") else "MSE"
            for j, split in enumerate(("train", "test")):
                row = axes[2 * i + j]
                for (r, label), evals in curves.items():
                    if r != race:
                        continue
                    y = [float(e[f"{split}_loss"]) for e in evals]
                    for ax, xkey in zip(row, ("epoch", "wall_time")):
                        ax.plot([float(e[xkey]) for e in evals], y, ms=3.5, label=label, **styles[label])
                for ax, xlabel in zip(row, ("epoch", "training wall-clock [s]")):
                    ax.set_yscale("log")
                    ax.set_xlabel(xlabel)
                    ax.set_ylabel(f"{split} {ylabel}")
                    ax.set_title(f"{race.split(':')[0]}, {split} loss", fontsize=9.5)
            for ax in axes[2 * i + 1]:
                ax.sharey(axes[2 * i][0])
            axes[2 * i][1].sharey(axes[2 * i][0])
        plotting.legend_outside(fig, axes, where="bottom")
        fig.suptitle("digits (sklearn): natural gradient with K-FAC vs Adam\n" + "; ".join(races))
        plotting.save(fig, path)
    return fig


def main(extra: list[str], out: Path = OUT, runs_dir: Path = ROOT / "outputs" / "demo") -> dict:
    """Run every race's experiments (``extra``: Hydra overrides applied to all), write ``out``/{loss_curves.png,
    demo.md}; returns ``{(race, optimizer): summary}``."""
    results = {}
    t_all = time.perf_counter()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfgs = {
            key: compose(
                "train",
                overrides=[
                    f"experiment={exp}",
                    "resume=false",
                    "logger=csv",
                    f"run_dir={Path(runs_dir) / exp}",
                    *own,
                    *extra,
                ],
            )
            for key, (exp, own) in RACES.items()
        }
    for cfg in cfgs.values():  # every race's config is checked before the first one runs
        validate_train(cfg)
    for (race, label), (exp, own) in RACES.items():
        print(f"\n== {race} | {label}: experiment={exp} {' '.join(own)} ==", flush=True)
        results[(race, label)] = run_training(cfgs[(race, label)])

    header = [
        "problem",
        "optimizer",
        "train loss",
        "train acc",
        "test loss",
        "test acc",
        "steps",
        "batch",
        "wall-clock [s]",
        "time/step [ms]",
    ]
    acc = lambda s, k: f"{s[k]:.3f}" if k in s else "-"  # noqa: E731
    rows = [
        [
            race.split(":")[0],
            label,
            f"{s['train_loss']:.4f}",
            acc(s, "train_acc"),
            f"{s['test_loss']:.4f}",
            acc(s, "test_acc"),
            str(s["steps"]),
            str(s["batch_size"]),
            f"{s['wall_time']:.2f}",
            f"{1e3 * s['time_per_step']:.1f}",
        ]
        for (race, label), s in results.items()
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print("\n" + line(header) + "\n" + line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loss_curves_figure({key: _evals(s) for key, s in results.items()}, out / "loss_curves.png")

    cpu = (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    exps = ", ".join(f"`{exp}`" + (f" ({' '.join(own)})" if own else "") for exp, own in RACES.values())
    md = [
        "# Demo: natural gradient with K-FAC vs Adam on digits",
        "",
        f"`make demo` (= `python scripts/demo.py`): experiments {exps} (conf/experiment/); within a problem the "
        "same data split, model initialisation and batch order. Classifier: K-FAC statistics and inverses every "
        "step, exact Tikhonov damping. Autoencoder: the setting of `scripts/bench_optim.py` part (b) — statistics "
        "and inverses every 10 steps, π-damped Cholesky inverses, momentum 0.9, KL clip 1e-2; Adam at the "
        "learning rate that won its sweep there.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [
        "",
        f"Measured on {cpu}; total demo time {time.perf_counter() - t_all:.0f} s. Wall-clock is training "
        "time only (evaluation excluded); timings on a shared 2-core machine vary by about 2x between runs.",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    (out / "demo.md").write_text("\n".join(md))
    print(f"\nwrote {out / 'loss_curves.png'} and {out / 'demo.md'} ({time.perf_counter() - t_all:.0f} s)")
    return results


if __name__ == "__main__":
    with report_errors():  # a bad override or a failed run: one line, exit status 2 or 1
        main(sys.argv[1:])
