"""PSD Kronecker sums by rank on the reference layers, and the cost of ``Curvature.update`` against K-FAC.

    python scripts/bench_psd_kron_sum.py [--ranks 1 2 3 4 5 6 7 8] [--skip-cost] [--out reports/bench_psd_kron_sum.md]

Part 1 (float64; trained digits MLP / autoencoder / CNN, GGN,
:func:`tensorcurv.experiments.reference_layers.reference_stats`):
relative Frobenius error ``‖C − Ĉ‖/‖C‖`` of ``kron_sum`` with ``psd="factors"`` (every factor PSD, or the
unconstrained truncation plus an identity shift where that is more accurate: the "route" column) and with
``psd="shrink"`` at each rank, next to the unconstrained Eckart–Young floor (singular values of ``R(C)``: for
``T = 1`` the eigenvalues of ``scale² Ka Kg`` from the sample Grams, else a dense SVD of ``R(C)``). Errors are
computed from the implicit ``R(C)`` (``‖C‖² − 2 Σ_k ⟨A_k, R(C) vec(G_k)⟩ + Σ_jk ⟨A_j, A_k⟩⟨G_j, G_k⟩``).
Part 2 (float32): the whole ``Curvature.update`` (capture + fit) on the MLP 64-1024-1024-10 (tanh, batch 2048,
digits), empirical Fisher, each timing in its own fresh process, divided by K-FAC's update in a fresh process.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from tensorcurv import structures
from tensorcurv.experiments.reference_layers import reference_stats
from tensorcurv.linalg.rearrange import RearrangedOperator, dense_rearranged, sample_grams

LAYERS = [("mlp", "1"), ("mlp", "3"), ("mlp", "5"), ("autoencoder", "3"), ("cnn", "features.3")]

COST_SNIPPET = r"""
import sys, time, torch
from torch import nn
sys.path.insert(0, "scripts")
from bench_structures import digits, mlp
import tensorcurv
structure, hp = sys.argv[1], eval(sys.argv[2])
model = mlp([64, 1024, 1024, 10], torch.float32)
x, y = digits(2048, torch.float32)
curv = tensorcurv.Curvature(model, structure, "empirical", seed=0, **hp)
t0 = time.perf_counter()
curv.update(x, y, nn.CrossEntropyLoss())
print(time.perf_counter() - t0)
"""
COSTS = [
    ("kfac", "kfac", {}),
    ("kron_sum r=1 psd=factors", "kron_sum", dict(rank=1, psd="factors")),
    ("kron_sum r=4 psd=factors", "kron_sum", dict(rank=4, psd="factors")),
    ("kron_sum r=4 psd=shrink", "kron_sum", dict(rank=4, psd="shrink")),
]


def floors(st, ranks) -> list[float]:
    if st.T == 1:
        Ka, Kg = sample_grams(st)
        ev = torch.linalg.eigvals(Ka @ Kg).real.clamp_min(0).sort(descending=True).values * st.scale**2
    else:
        ev = torch.linalg.svdvals(dense_rearranged(st)).pow(2)
    return [math.sqrt(float(ev[r:].sum() / ev.sum())) for r in ranks]


def error(op: RearrangedOperator, total: float, A, G) -> float:
    fitted = 2 * float((op.rmatvec(A) * G).sum()) - float(
        ((A.flatten(1) @ A.flatten(1).T) * (G.flatten(1) @ G.flatten(1).T)).sum()
    )
    return math.sqrt(max(total - fitted, 0.0) / total)


def accuracy_table(ranks) -> list[str]:
    rows = [
        "### PSD Kronecker sums on the reference layers (trained, GGN, batch 256, float64): relative error by rank\n",
        "| layer | r | floor (Eckart–Young) | psd=factors | ratio | route | psd=shrink | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for net, name in LAYERS:
        st = reference_stats(net, True, "ggn")[name]
        op = RearrangedOperator(st)
        total = op.frobenius_sq()
        fl = floors(st, ranks)
        for r, f in zip(ranks, fl):
            blocks = [structures.create("kron_sum", st.shape, rank=r, psd=psd).fit(st) for psd in ("factors", "shrink")]
            errs = [error(op, total, b.A, b.G) for b in blocks]
            route = "shifted truncation" if blocks[0].last_fit.get("near_psd") else "PSD factors"
            rows.append(
                f"| {net} {name} ({st.m}x{st.n}, T={st.T}) | {r} | {f:.4f} | {errs[0]:.4f} | {errs[0] / f:.3f} "
                f"| {route} | {errs[1]:.4f} | {errs[1] / f:.3f} |"
            )
            print(rows[-1], flush=True)
    return rows


BUSY_LOOP = "while True: pass"


def cost_table(repeats: int, busy: int = 0) -> list[str]:
    """Each structure's update in a fresh process, repeats interleaved, the order reversed every other repeat;
    ``busy`` busy-loop processes run meanwhile (reproducible contention), started and stopped here."""
    times: dict[str, list[float]] = {}
    load = os.getloadavg()[0]
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        for rep in range(repeats):
            order = COSTS if rep % 2 == 0 else COSTS[::-1]
            for label, structure, hp in order:
                cmd = [sys.executable, "-c", COST_SNIPPET, structure, repr(hp)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                times.setdefault(label, []).append(float(out.stdout.strip().splitlines()[-1]))
    finally:
        for proc in loops:
            proc.kill()
            proc.wait()
    base = sorted(times["kfac"])[len(times["kfac"]) // 2]
    condition = f"{busy} busy-loop processes" if busy else "quiet"
    rows = [
        f"### Whole `Curvature.update` (capture + fit), MLP 64-1024-1024-10 tanh, batch 2048, float32, empirical "
        f"Fisher, {torch.get_num_threads()} threads, fresh process each, both orders; median of {repeats}; "
        f"{condition} (1-min load {load:.2f} before)\n",
        "| structure | seconds (median, min-max) | / K-FAC update |",
        "|---|---|---|",
    ]
    for label, _, _ in COSTS:
        t = sorted(times[label])
        med = t[len(t) // 2]
        rows.append(f"| {label} | {med:.2f} ({t[0]:.2f}-{t[-1]:.2f}) | {med / base:.2f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="*", default=list(range(1, 9)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", type=int, nargs="*", default=[0, 2], help="busy loops per cost condition (0: quiet)")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    lines = []
    if not args.skip_cost:
        for busy in args.busy:
            lines += cost_table(args.repeats, busy) + [""]
        print("\n".join(lines), flush=True)
    if not args.skip_accuracy:
        lines += accuracy_table(args.ranks)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
