"""Scaling of the data-parallel second-order step, 1 -> W processes on CPU (gloo).

    .venv/bin/python scripts/bench_distributed.py [--world 2] [--batch 512] [--steps 10] \
        [--structures kfac ekfac kron_sum]

For each structure: time per Gauss-Newton step (global batch fixed, split over the ranks), the
share of it spent inside collectives (``Comm.seconds``, waiting included) and the bytes each rank
sent per step. Each rank runs one thread. Also prints, per layer, the communication volume of the
two plans for implicit fits (gather per-sample factors vs all-reduce every implicit product).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

import tensorcurv.distributed as tdist
from tensorcurv import optim


def model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def data(n: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def kwargs(structure):
    return dict(structure=structure, damping=1e-2, decay=0.95, **({"rank": 2} if structure == "kron_sum" else {}))


def worker(rank, world, port, args, out):
    torch.set_num_threads(1)
    comm = None
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        comm = tdist.init("gloo", 120.0, rank=rank, world_size=world)
    x, y = data(args.batch)
    xs, ys = tdist.world_batch(x, rank, world), tdist.world_batch(y, rank, world)
    res = {}
    for s in args.structures:
        m = model(args.width)
        opt = optim.build("gauss_newton", m, "cross_entropy", comm=comm, **kwargs(s))
        opt.step(xs, ys)  # warm-up (first fit, allocations)
        if comm is not None:
            comm.reset_counters()
            comm.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.step(xs, ys)
        dt = (time.perf_counter() - t0) / args.steps
        res[s] = {
            "step": dt,
            "comm": (comm.seconds / args.steps) if comm else 0.0,
            "bytes": (comm.bytes / args.steps) if comm else 0,
        }
    torch.save(res, Path(out) / f"w{world}_r{rank}.pt")
    if comm is not None:
        tdist.shutdown()


def volumes(width, batch, K=10):
    """Per layer, numbers communicated per fit: gather (N·T·(n + K m)) vs implicit products
    (2·iters·p·(n² + m²), iters = 5, p = 4 for rank 2) vs K-FAC moments (n² + m²)."""
    rows = []
    for name, (m, n) in {"0": (width, 65), "2": (width, width + 1), "4": (10, width + 1)}.items():
        rows.append((name, (m, n), batch * (n + K * m), 2 * 5 * 4 * (n * n + m * m), n * n + m * m))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--structures", nargs="+", default=["kfac", "ekfac", "kron_sum"])
    ap.add_argument("--out", default=None, help="also write the table as Markdown to this file")
    args = ap.parse_args()
    out = tempfile.mkdtemp()
    results = {}
    for world in sorted({1, args.world}):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(worker, args=(world, port, args, out), nprocs=world, join=True, start_method="fork")
        per_rank = [torch.load(Path(out) / f"w{world}_r{r}.pt") for r in range(world)]
        results[world] = {
            s: {k: max(r[s][k] for r in per_rank) for k in ("step", "comm", "bytes")} for s in args.structures
        }
    lines = [
        f"MLP 64-{args.width}-{args.width}-10, Gauss-Newton (GGN, K=10), global batch {args.batch}, "
        f"{args.steps} steps, 1 thread per rank, gloo, CPUs: {os.cpu_count()}",
        "",
        "| structure | processes | time/step (ms) | speed-up | comm share | sent/rank/step (KiB) |",
        "|---|---|---|---|---|---|",
    ]
    for s in args.structures:
        base = results[1][s]["step"]
        for world, rs in results.items():
            r = rs[s]
            lines.append(
                f"| {s} | {world} | {1e3 * r['step']:.1f} | {base / r['step']:.2f} | "
                f"{100 * r['comm'] / r['step']:.0f}% | {r['bytes'] / 1024:.1f} |"
            )
    lines += [
        "",
        "per-layer numbers per fit: gather N·(n+Km) | implicit products 2·5·4·(n²+m²) | K-FAC moments n²+m²",
        "",
    ]
    for name, shape, g, p, k in volumes(args.width, args.batch):
        lines.append(f"- layer {name} {shape}: {g} | {p} | {k}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text("# Distributed benchmark\n\n`python scripts/bench_distributed.py`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
