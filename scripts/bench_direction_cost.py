"""Issue #17: direction quality and step cost of K-FAC, K-FAC + Krylov refinement and ``exact_batch``.

On the three trained reference networks (``tensorcurv.experiments.reference_layers``: mlp, cnn, autoencoder),
GGN, damping ``λ = 1e-3 tr(C)/D`` of the batch, gradient ``g`` = the mini-batch gradient:

* cosines (float64, in this process): the whole-model cosine between the direction one ``NaturalGradient``
  step takes and the exact full damped solve ``(C + λI)⁻¹ g`` (cross-layer blocks included; Woodbury on the
  float64 per-sample factors), at batch sizes ``--cosine-batches``; ``exact_batch`` also in float32 (its
  rounding error);
* wall-clock of ONE FULL ``NaturalGradient`` step (forward + capture + fit + solve + update, statistics every
  step) in float32, each (net, method) in a fresh subprocess, methods in both orders, quiet and with two
  busy-loop processes started by this script; first step and the median of the next ones; ``os.getloadavg()``
  before each subprocess.

    nice -n 19 env PYTHONPATH=$PWD .venv/bin/python scripts/bench_direction_cost.py          # full (~5 min quiet)
    nice -n 19 env PYTHONPATH=$PWD .venv/bin/python scripts/bench_direction_cost.py --quick  # one order, quiet

Writes ``reports/direction_cost.md`` (``--out``). The trained weights are cached in ``--cache`` (training them
takes seconds per network; the timed subprocesses only load them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

NETS = ("mlp", "cnn", "autoencoder")
#: (label, structure, refine)
METHODS = (
    ("kfac", "kfac", 0),
    ("kfac+refine5", "kfac", 5),
    ("kfac+refine20", "kfac", 20),
    ("exact_batch", "exact_batch", 0),
)
#: exact_batch's float32 runs: the default (J x J work in float64) and solve_dtype=stats (all in float32)
EXTRA = ("exact_batch (float32)", "exact_batch (float32, solve_dtype=stats)")
MAX_TERMS = 16384  # exact_batch.max_terms for the benchmark (the autoencoder's J = 64 N)


def _optimizer(model, loss_fn, structure: str, refine: int, damping: float, **kw):
    from tensorcurv.optim import NaturalGradient

    if structure == "exact_batch":
        kw["max_terms"] = MAX_TERMS
    return NaturalGradient(model, loss_fn, structure, kind="ggn", lr=1e-3, damping=damping, refine=refine, **kw)


def _model(net: str, state: Path, dtype: torch.dtype):
    from tensorcurv.experiments.reference_layers import reference_model

    model = reference_model(net, trained=False, dtype=torch.float64)  # architecture; the trained weights follow
    model.load_state_dict(torch.load(state))
    return model.to(dtype)


# ---------------------------------------------------------------------- timed worker (a fresh process)
def worker(args) -> None:
    from tensorcurv.experiments.reference_layers import reference_batch

    model = _model(args.net, Path(args.state), torch.float32)
    x, y, loss_fn = reference_batch(args.net, args.batch * args.steps, torch.float32)
    opt = _optimizer(model, loss_fn, args.structure, args.refine, args.damping)
    times = []
    for i in range(args.steps):
        sl = slice(i * args.batch, (i + 1) * args.batch)
        t0 = time.perf_counter()
        opt.step(x[sl], y[sl])
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "skipped": bool(opt.info.get("skipped", False))}))


# ---------------------------------------------------------------------- cosines (this process, float64)
def _flat_direction(params) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1).double() for p in params])


def cosines(net: str, state: Path, batch: int) -> dict:
    from tensorcurv import Curvature
    from tensorcurv.core.exact import ExactModel, ParamLayout
    from tensorcurv.experiments.reference_layers import reference_batch

    model = _model(net, state, torch.float64)
    x, y, loss_fn = reference_batch(net, batch, torch.float64)
    curv = Curvature(model, "kfac", "ggn")
    res = curv.capture(x, y, loss_fn, accumulate_grad=True)
    assert res.grads is not None
    layout = ParamLayout(curv.named_params, curv.adapters)
    g = torch.cat([t.reshape(-1) for t in res.grads])
    op = ExactModel.from_stats(res.stats, "full", cache_layer_grams=False)
    lam = 1e-3 * op.trace() / op.dim
    t0 = time.perf_counter()
    exact = layout.to_flat(op.solve(layout.to_mats(g), lam, method="cholesky")[0])
    exact_time = time.perf_counter() - t0
    first = next(iter(res.stats.values()))
    row = {"net": net, "batch": batch, "J": first.N * first.K, "D": op.dim, "damping": lam, "exact_time": exact_time}
    for label, structure, refine in METHODS:
        dtypes = (torch.float64,)
        if structure == "exact_batch":  # float64: the exact solve itself (cosine 1 up to rounding; skipped for large J)
            dtypes = (torch.float64, torch.float32) if row["J"] <= 4096 else (torch.float32,)
        variants = [(dtype, {}, label if dtype == torch.float64 else f"{label} (float32)") for dtype in dtypes]
        if structure == "exact_batch":  # the J x J work in float32 too
            variants.append((torch.float32, {"solve_dtype": "stats"}, f"{label} (float32, solve_dtype=stats)"))
        for dtype, kw, key in variants:
            m = _model(net, state, dtype)
            opt = _optimizer(m, loss_fn, structure, refine, lam, **kw)
            opt.step(x.to(dtype), y.to(dtype) if y.is_floating_point() else y)
            d = _flat_direction(opt.params)
            row[key] = float(d @ exact / (d.norm() * exact.norm()))
    return row


# ---------------------------------------------------------------------- driver
def _busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def _time_one(net, label, structure, refine, batch, steps, lam, state) -> dict:
    load = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--worker", "--net", net, "--structure", structure, "--refine", str(refine)]
    cmd += ["--batch", str(batch), "--steps", str(steps), "--damping", repr(lam), "--state", str(state)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    times = res["times"]
    return {
        "net": net,
        "method": label,
        "first": times[0],
        "next": statistics.median(times[1:]) if len(times) > 1 else math.nan,
        "n_next": len(times) - 1,
        "load": load,
        "process": wall,
        "skipped": res["skipped"],
    }


def _states(cache: Path) -> dict[str, Path]:
    from tensorcurv.experiments.reference_layers import reference_model

    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for net in NETS:
        path = cache / f"{net}.pt"
        if not path.exists():
            torch.save(reference_model(net, trained=True, dtype=torch.float64).state_dict(), path)
        out[net] = path
    return out


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report(args, cos_rows, time_rows, lams, started, wall) -> str:
    labels = [m[0] for m in METHODS]
    lines = [
        "# Direction quality and step cost: K-FAC, K-FAC + refinement, exact_batch (issue #17)",
        "",
        f"Command: `nice -n 19 env PYTHONPATH=$PWD .venv/bin/python scripts/bench_direction_cost.py"
        f"{' --quick' if args.quick else ''}` ({wall:.0f} s, started {started} UTC, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs).",
        "",
        "Trained reference networks (`tensorcurv/experiments/reference_layers.py`), GGN, "
        "λ = 1e-3·tr(C)/D of the batch, g = the mini-batch gradient. The exact direction is the full "
        "(cross-layer) damped solve (C + λI)⁻¹g on the float64 per-sample factors. `exact_batch` is that "
        "solve (Woodbury, J×J Cholesky, J = N·K: K = 10 for the cross-entropy nets, 64 for the autoencoder's "
        f"MSE), run with `max_terms={MAX_TERMS}`; `refine=k`: k PCG steps on (C + λI)d = g preconditioned by K-FAC.",
        "",
        "## Whole-model cosine to the exact damped direction (float64; one NaturalGradient step)",
        "",
        "| net | batch | J | D | λ | " + " | ".join(labels) + " | " + " | ".join(EXTRA) + " |",
        "|---|---|---|---|---|" + "---|" * (len(labels) + len(EXTRA)),
    ]
    for r in cos_rows:
        vals = " | ".join(_fmt(r.get(label), 4) for label in labels)
        lines.append(
            f"| {r['net']} | {r['batch']} | {r['J']} | {r['D']} | {r['damping']:.3g} | {vals} | "
            + " | ".join(_fmt(r.get(k), 4) for k in EXTRA)
            + " |"
        )
    lines += [
        "",
        f"## Wall-clock of one full NaturalGradient step (float32, batch {args.batch})",
        "",
        "Each (net, method) in a fresh subprocess: import, model and optimizer built untimed, then "
        f"{args.steps} steps on consecutive batches (2 for exact_batch where J > 4096), each timed alone: `first` is "
        "the first step (what a user waits for first), `next` the median of the following ones. "
        "`×kfac`: the ratio to K-FAC's time of the same run (same condition and order). "
        "`load`: the 1-minute load average before the subprocess. "
        "Contended: two busy-loop processes started by the script. The machine has "
        f"{os.cpu_count()} CPUs shared with other jobs: read the load column.",
        "",
    ]
    for cond in dict.fromkeys(r["condition"] for r in time_rows):
        for order in dict.fromkeys(r["order"] for r in time_rows if r["condition"] == cond):
            rows = [r for r in time_rows if r["condition"] == cond and r["order"] == order]
            lines += [
                f"### {cond}, methods {order}",
                "",
                "| net | method | first (s) | ×kfac | next (s) | ×kfac | load |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                base = next(b for b in rows if b["net"] == r["net"] and b["method"] == "kfac")
                lines.append(
                    f"| {r['net']} | {r['method']} | {r['first']:.4f} | {r['first'] / base['first']:.2f} | "
                    f"{_fmt(r['next'], 4)} | {_fmt(r['next'] / base['next'], 2)} | {r['load']:.2f} |"
                )
            lines.append("")
    lines += [
        "## Summary: next-step ratio to K-FAC (median over the runs above)",
        "",
        "| net | " + " | ".join(labels[1:]) + " |",
        "|---|" + "---|" * (len(labels) - 1),
    ]
    for net in NETS:
        cells = []
        for label in labels[1:]:
            ratios = []
            for r in time_rows:
                if r["net"] == net and r["method"] == label:
                    base = next(
                        b
                        for b in time_rows
                        if (b["net"], b["method"], b["condition"], b["order"])
                        == (net, "kfac", r["condition"], r["order"])
                    )
                    ratios.append(r["next"] / base["next"])
            cells.append(_fmt(statistics.median(ratios) if ratios else math.nan, 2))
        lines.append(f"| {net} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Damping per net (batch " + str(args.batch) + "): " + ", ".join(f"{k} {v:.3g}" for k, v in lams.items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--net", default="mlp")
    p.add_argument("--structure", default="kfac")
    p.add_argument("--refine", type=int, default=0)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--state", default="")
    p.add_argument("--quick", action="store_true", help="one order, quiet only, 3 steps, cosines at batch 128 only")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps per subprocess (default 4, quick 3)")
    p.add_argument("--cosine-batches", type=int, nargs="*", default=None)
    p.add_argument("--cache", default="/tmp/tensorcurv_bench_direction_cost")
    p.add_argument("--out", default="reports/direction_cost.md")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    args.steps = args.steps or (3 if args.quick else 4)
    cos_batches = args.cosine_batches if args.cosine_batches is not None else ([128] if args.quick else [64, 128, 256])
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    t_start = time.perf_counter()
    states = _states(Path(args.cache))

    cos_rows = []
    for batch in cos_batches:
        for net in NETS:
            if (64 if net == "autoencoder" else 10) * batch > 8192:
                continue  # the float64 exact reference of J > 8192 takes minutes
            cos_rows.append(cosines(net, states[net], batch))
            print(json.dumps(cos_rows[-1]), flush=True)

    lams, terms = {}, {}
    for net in NETS:  # the damping of the timed batch size (float64 trace of the first batch)
        row = next((r for r in cos_rows if r["net"] == net and r["batch"] == args.batch), None)
        row = row or cosines(net, states[net], args.batch)
        lams[net], terms[net] = row["damping"], row["J"]

    conditions = [("quiet", 0)] if args.quick else [("quiet", 0), ("contended (2 busy loops)", 2)]
    orders = [("in order", list(METHODS))] + ([] if args.quick else [("reversed", list(METHODS)[::-1])])
    time_rows = []
    for cond, busy in conditions:
        procs = _busy_loops(busy)
        try:
            for order, methods in orders:
                for net in NETS:
                    for label, structure, refine in methods:
                        steps = 2 if structure == "exact_batch" and terms[net] > 4096 else args.steps  # (J³ budget)
                        r = _time_one(net, label, structure, refine, args.batch, steps, lams[net], states[net])
                        r.update(condition=cond, order=order)
                        time_rows.append(r)
                        print(json.dumps(r), flush=True)
        finally:
            _stop(procs)
    wall = time.perf_counter() - t_start
    text = report(args, cos_rows, time_rows, lams, started, wall)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
