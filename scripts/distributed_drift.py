"""How far a data-parallel training run drifts from the single-process run, per structure.

    .venv/bin/python scripts/distributed_drift.py [--dtypes float64 float32] [--steps 20] [--structures kfac ...]
                                                  [--out reports/distributed_drift.md]

Natural gradient (GGN, damping 1e-3, decay 0.95, kl_clip 1e-3, lr 1) on the digits MLP 64-64-64-10,
batch 128, 2 gloo processes (1 thread each) against one process. Printed per structure: the largest
relative loss and parameter difference over the steps (data parallel vs single process), and the
same for a single process fed each batch in reversed order (summation order only: the drift a
structure shows without any process group).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

import tensorcurv.distributed as tdist
from tensorcurv import optim
from tensorcurv.experiments import data as data

BATCH = 128
HPARAMS = {"kron_sum": {"rank": 2}, "kron_sum (psd=none)": {"rank": 2, "psd": "none"}}


def structure_of(label: str) -> str:
    return label.split(" ")[0]


def run(label: str, dtype: torch.dtype, steps: int, comm=None, reverse: bool = False):
    """Losses and parameters after each step (this rank's shard when ``comm`` is given)."""
    X, y = data.load("digits", seed=0, dtype=dtype).train
    X = X.flatten(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(dtype)
    opt = optim.build(
        "natural_gradient",
        model,
        "cross_entropy",
        comm=comm,
        structure=structure_of(label),
        kind="ggn",
        damping=1e-3,
        decay=0.95,
        kl_clip=1e-3,
        lr=1.0,
        **HPARAMS.get(label, {}),
    )
    losses, params = [], []
    for t in range(steps):
        idx = torch.arange(t * BATCH, (t + 1) * BATCH) % X.shape[0]
        if reverse:
            idx = idx.flip(0)
        xb, yb = X[idx], y[idx]
        if comm is not None:
            xb = tdist.world_batch(xb, comm.rank, comm.world_size)
            yb = tdist.world_batch(yb, comm.rank, comm.world_size)
        losses.append(float(opt.step(xb, yb)))
        params.append([p.detach().clone() for p in model.parameters()])
    return losses, params


def worker(rank, port, labels, dtype, steps, out):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    comm = tdist.init("gloo", 600.0, rank=rank, world_size=2)
    torch.save({label: run(label, dtype, steps, comm) for label in labels}, Path(out) / f"rank{rank}.pt")
    tdist.shutdown()


def drift(a, b) -> tuple[float, float]:
    """Largest relative loss and parameter difference of run ``a`` from run ``b`` over the steps."""
    loss = max(abs(x - y) / abs(y) for x, y in zip(a[0], b[0]))
    par = max(float((p - q).norm() / q.norm()) for ps, qs in zip(a[1], b[1]) for p, q in zip(ps, qs))
    return loss, par


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float32", "float64"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--structures", nargs="+", default=["kfac", "ekfac", "kron_sum", "kron_sum (psd=none)"])
    ap.add_argument("--out", default=None, help="also write the table as Markdown to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    text = "\n\n".join(table(getattr(torch, name), name, args) for name in args.dtypes)
    print(text)
    if args.out:
        Path(args.out).write_text(
            f"# Data-parallel drift\n\n`python scripts/distributed_drift.py --dtypes "
            f"{' '.join(args.dtypes)} --steps {args.steps}`\n\n{text}\n"
        )


def table(dtype: torch.dtype, dtype_name: str, args) -> str:
    out = tempfile.mkdtemp()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        worker, args=(port, args.structures, dtype, args.steps, out), nprocs=2, join=True, start_method="fork"
    )
    parallel = torch.load(Path(out) / "rank0.pt", weights_only=False)
    lines = [
        f"digits MLP 64-64-64-10, natural gradient (GGN, λ 1e-3, decay 0.95, kl_clip 1e-3), batch {BATCH}, "
        f"{args.steps} steps, {dtype_name}; max over the steps of the relative difference from one process",
        "",
        "| structure | data parallel (2 gloo processes): loss | parameters | one process, batches reversed: loss "
        "| parameters |",
        "|---|---|---|---|---|",
    ]
    for label in args.structures:
        single = run(label, dtype, args.steps)
        dp, rev = drift(parallel[label], single), drift(run(label, dtype, args.steps, reverse=True), single)
        lines.append(f"| {label} | {dp[0]:.1e} | {dp[1]:.1e} | {rev[0]:.1e} | {rev[1]:.1e} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
