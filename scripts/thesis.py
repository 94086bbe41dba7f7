"""The thesis study: every method and baseline, 3 seeds, on the CURVES-like autoencoder, digits and MNIST-1D.

    python scripts/thesis.py                               # CPU protocol (reduced budget), reports/thesis/
    python scripts/thesis.py --full --device cuda          # the thesis protocol: 200 epochs, all samples
    python scripts/thesis.py --quick --datasets digits     # smoke run (seconds)
    python scripts/thesis.py --render-only                 # redraw report.md and figures from the CSVs
    python scripts/thesis.py --methods kfac kfac_refine10 sgd --datasets curves

For each dataset and method: the method's tuning grid on seed 0 (the same number of settings for
every method), then the best setting on the other seeds; for second-order methods the curvature
errors (Error 1, Error 2 on one layer, against the exact block) along the seed-1 run. Every run is a
row of ``runs.csv`` as soon as it ends, with its evaluations in ``evals.csv`` (and errors in
``errors.csv``): an interrupted study restarted with the same arguments skips what is recorded.
Methods, datasets, grids and protocols are data in ``tensorcurv.experiments.thesis_study``; tables and
figures come from ``tensorcurv.experiments.thesis_report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tensorcurv.experiments import thesis_report as report  # noqa: E402
from tensorcurv.experiments import thesis_study as study  # noqa: E402
from tensorcurv.experiments.thesis_errors import snapshot_callback, trajectory_errors  # noqa: E402
from tensorcurv.experiments.thesis_render import render  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help=f"default: all ({', '.join(study.METHODS)})")
    p.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help=f"default: {' '.join(study.DEFAULT_DATASETS)}; all: {', '.join(study.DATASETS)}",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the thesis protocol (200 epochs, all samples; use a GPU)")
    mode.add_argument("--quick", action="store_true", help="smoke run: 1 epoch of 64 samples, 1 setting, 2 seeds")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<i>")
    p.add_argument("--seeds", type=int, default=None, help="override the protocol's number of seeds")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (every dataset)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "thesis", help="report directory")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "outputs" / "thesis", help="run directories")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data")
    p.add_argument(
        "--error-datasets", nargs="*", default=None, help="datasets with Error 1 / Error 2 (default: all; none: skip)"
    )
    p.add_argument("--render-only", action="store_true", help="only redraw report.md and figures from the CSVs")
    return p.parse_args(argv)


def protocol(args: argparse.Namespace) -> study.Protocol:
    proto = study.PROTOCOLS["full" if args.full else "quick" if args.quick else "cpu"]
    proto = dataclasses.replace(proto, device=args.device)
    if args.seeds is not None:
        proto = dataclasses.replace(proto, seeds=args.seeds)
    if args.epochs is not None:
        proto = dataclasses.replace(proto, epochs=dict.fromkeys(study.DATASETS, args.epochs))
    return proto


def composer(overrides_base: list[str]):
    """``compose(overrides) -> cfg`` of ``conf/train.yaml`` (Hydra's compose API, no run directory)."""
    from hydra import compose, initialize_config_dir

    initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3")
    return lambda ovr: compose("train", overrides=overrides_base + ovr)


class Study:
    """One invocation: runs what ``runs.csv`` lacks, appending every finished run."""

    def __init__(self, args: argparse.Namespace, proto: study.Protocol) -> None:
        self.args, self.proto, self.out = args, proto, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.runs = report.read_csv(self.out / "runs.csv")
        self.compose = composer([])
        self.t0, self.count = time.time(), 0
        self.error_datasets = list(study.DATASETS) if args.error_datasets is None else args.error_datasets

    def done(self, key: dict) -> dict | None:
        return next((r for r in self.runs if all(r[k] == v for k, v in key.items())), None)

    def run(self, ds: str, name: str, setting: dict, seed: int, callback=None) -> dict:
        key = {"dataset": ds, "method": name, "setting": study.setting_key(setting), "seed": seed}
        if (row := self.done({**key, "seed": float(seed)})) is not None:
            return row
        method = study.METHODS[name]
        ovr = study.overrides(ds, method, setting, seed, self.proto, self.args.data_dir)
        if callback is not None:
            ovr = [o for o in ovr if not o.startswith("checkpoint_every=")] + [callback.override]
        rdir = self.args.runs_dir / self.proto.name / ds / name / f"{key['setting'].replace(' ', '_')}_seed{seed}"
        t = time.time()
        row, evals = study.run_setting(self.compose, rdir, key, ovr, callback)
        row["loadavg_1m"] = os.getloadavg()[0]
        report.append_csv(self.out / "evals.csv", evals)
        report.append_csv(self.out / "runs.csv", [row])
        self.runs.append({**row, "seed": float(seed)})
        self.count += 1
        print(
            f"[{time.time() - self.t0:7.0f}s] {ds:8s} {name:22s} {key['setting']:22s} seed {seed}: "
            f"train {row['train_loss']:.4g} test {row['test_loss']:.4g} ({time.time() - t:.0f}s, {row['status']})",
            flush=True,
        )
        return row

    def method(self, ds: str, name: str) -> None:
        """Grid on seed 0, then the best setting on the other seeds (errors along seed 1)."""
        method = study.METHODS[name]
        settings = study.grid(method, self.proto.grid_size[ds])
        rows = [self.run(ds, name, s, 0) for s in settings]
        best_key = study.best_setting(rows)
        if best_key is None:
            print(f"  {ds} {name}: every setting diverged", flush=True)
            return
        best = next(s for s in settings if study.setting_key(s) == best_key)
        for seed in range(1, self.proto.seeds):
            want_errors = seed == 1 and method.second_order and ds in self.error_datasets
            steps = max(int(r["steps"]) for r in rows)
            if want_errors and steps > 0 and self.done({"dataset": ds, "method": name, "seed": 1.0}) is None:
                cb = snapshot_callback(steps)
                self.run(ds, name, best, seed, cb)
                self.errors(ds, name, best, cb)
            else:
                self.run(ds, name, best, seed)

    def errors(self, ds: str, name: str, setting: dict, cb) -> None:
        ovr = study.overrides(ds, study.METHODS[name], setting, 1, self.proto, self.args.data_dir)
        try:
            rows = trajectory_errors(self.compose(ovr), cb.snapshots, study.DATASETS[ds].error_layer)
        except (RuntimeError, ArithmeticError, ValueError) as e:
            print(f"  {ds} {name}: curvature errors failed: {type(e).__name__}: {e}", flush=True)
            return
        report.append_csv(self.out / "errors.csv", [{"dataset": ds, "method": name, **r} for r in rows])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        study.check_choices("method", args.methods or [], study.METHODS)
        study.check_choices("dataset", args.datasets or [], study.DATASETS)
        study.check_choices("dataset", args.error_datasets or [], study.DATASETS)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    proto = protocol(args)
    methods, datasets = args.methods or list(study.METHODS), args.datasets or list(study.DEFAULT_DATASETS)
    command = "python scripts/thesis.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    if not args.render_only:
        s, load0 = Study(args, proto), os.getloadavg()
        print(f"thesis study, protocol {proto.name}: {len(methods)} methods x {datasets}", flush=True)
        for ds in datasets:
            for name in methods:
                s.method(ds, name)
        meta = {"command": command, "protocol": proto.name, "seconds": time.time() - s.t0, "runs": s.count}
        meta.update(loadavg_start=load0, loadavg_end=os.getloadavg(), cpus=os.cpu_count())
        report.append_csv(args.out / "invocations.csv", [{k: json.dumps(v) for k, v in meta.items()}])
    path = render(args.out, proto)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
