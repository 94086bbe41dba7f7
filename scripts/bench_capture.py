"""Benchmark: cost of capturing curvature statistics relative to a plain forward+backward.

    python scripts/bench_capture.py               # MLP 64-1024-1024-10 and a small CNN, batch 2048
    python scripts/bench_capture.py --quick       # smaller, seconds
    python scripts/bench_capture.py --out reports/bench_capture.md

All times are medians over ``--repeats`` interleaved repetitions in one process, reported as
ratios to the plain forward+backward of the same batch (so machine noise mostly cancels):

* ``fwd+bwd``: ``loss.backward()`` alone (1.00 by definition);
* ``floor``: fwd+bwd plus the K-FAC factor products ``aᵀa``, ``gᵀg`` of the same shapes, timed alone;
* ``update``: ``curv.update`` (statistics + K-FAC factors, no parameter gradient);
* ``update+grad``: ``curv.update(..., accumulate_grad=True)`` — what a training step pays;
* ``ggn loop``: the same GGN update with one backward per output class instead of one
  ``vmap``-batched backward over the columns of ``S`` (ratio loop / batched > 1: batching wins);
* ``step@10``: amortized training step with statistics every 10 steps: (update+grad + 9·fwd+bwd)/10.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import tensorcurv
import tensorcurv.capture as capture_module
from tensorcurv.linalg import gram


def digits_batch(batch: int, image: bool, seed: int = 0):
    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(X), (batch,), generator=g)
    x = torch.tensor(X, dtype=torch.float32)[idx] / 16.0
    x = x.reshape(-1, 1, 8, 8) if image else x
    return x, torch.tensor(y)[idx]


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def cnn(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.Tanh(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(2 * width * 16, 10),
    )


def _looped_vjp(outputs, zs, grad_outputs):
    """Reference for the benchmark: ``Jᵀ v`` one backward per column (what batching replaces)."""
    cols = [torch.autograd.grad(outputs, zs, v, retain_graph=True) for v in grad_outputs]
    return [torch.stack(c) for c in zip(*cols)]


def timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(label: str, model: nn.Module, x, y, repeats: int) -> list[dict]:
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    curvs = {k: tensorcurv.Curvature(model, "kfac", k, seed=0) for k in ("empirical", "mc", "ggn")}
    stats = curvs["ggn"].capture(x, y, loss_fn).stats
    pairs = []
    for st in stats.values():  # the same factor products K-FAC computes (expand; K=1 as for empirical)
        pairs.append((st.a.reshape(-1, st.n).clone(), st.g[:, :1].reshape(-1, st.m).clone()))

    def plain():
        for p in params:
            p.grad = None
        loss_fn(model(x), y).backward()

    def factors():
        for a, g in pairs:
            gram(a)
            gram(g)

    def ggn_loop():  # the same update, with the GGN columns as one backward per output class
        batched = capture_module._batched_vjp
        capture_module._batched_vjp = _looped_vjp
        try:
            curvs["ggn"].update(x, y, loss_fn)
        finally:
            capture_module._batched_vjp = batched

    runs = {
        "fwd+bwd": plain,
        "factors": factors,
        "ggn loop": ggn_loop,
        **{f"update {k}": (lambda c=c: c.update(x, y, loss_fn)) for k, c in curvs.items()},
        **{f"update+grad {k}": (lambda c=c: c.update(x, y, loss_fn, accumulate_grad=True)) for k, c in curvs.items()},
    }
    for fn in runs.values():  # warm-up
        fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(timeit(fn))
    t = {k: statistics.median(v) for k, v in times.items()}
    base = t["fwd+bwd"]
    floor = base + t["factors"]
    rows = []
    for kind in ("empirical", "mc", "ggn"):
        up, upg = t[f"update {kind}"], t[f"update+grad {kind}"]
        rows.append({
            "model": label, "kind": kind, "fwd+bwd [ms]": 1e3 * base,
            "floor / fwd+bwd": floor / base, "update / fwd+bwd": up / base, "update / floor": up / floor,
            "update+grad / floor": upg / floor, "step@10 / fwd+bwd": (upg + 9 * base) / 10 / base,
            "ggn loop / batched": t["ggn loop"] / up if kind == "ggn" else float("nan"),
        })
    return rows


def to_markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--cnn-width", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--quick", action="store_true", help="batch 256, width 128, 3 repeats")
    ap.add_argument("--out", default=None, help="write the table as Markdown to this file")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.width, args.cnn_width, args.repeats = 256, 128, 8, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = bench_model(f"MLP 64-{args.width}-{args.width}-10", mlp(args.width), *digits_batch(args.batch, False),
                       args.repeats)
    rows += bench_model(f"CNN c{args.cnn_width}", cnn(args.cnn_width), *digits_batch(args.batch, True), args.repeats)
    table = to_markdown(rows)
    header = (f"batch {args.batch}, float32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"median of {args.repeats}\n\n")
    print(header + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Capture benchmark\n\n`python scripts/bench_capture.py" + (" --quick" if args.quick else "")
                    + "`\n\n" + header + table + "\n")


if __name__ == "__main__":
    main()
