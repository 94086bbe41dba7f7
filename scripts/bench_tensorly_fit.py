"""Implicit vs tensorly fits of ``tucker`` / ``tt`` on the digits MLP accuracy-table blocks.

For each layer of the MLP 64-32-16-10 (GGN, float64, batch 512, the blocks of
``scripts/bench_structures.py`` ``accuracy_table``) and each configuration, fits the block with
``method="implicit"`` and ``method="tensorly"`` interleaved, ``--repeats`` times, and prints the median
(min-max) fit time and the relative Frobenius error ``‖Ĉ − C‖_F / ‖C‖_F`` of the represented operator.

    .venv/bin/python scripts/bench_tensorly_fit.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import tensorcurv  # noqa: E402
from tensorcurv import structures  # noqa: E402
from bench_structures import digits, mlp  # noqa: E402

CONFIGS = [("tucker r=4", "tucker", dict(ranks=4, tol=1e-6, max_iter=20)),
           ("tucker r=16", "tucker", dict(ranks=16, tol=1e-6, max_iter=20)),
           ("tt r=1", "tt", dict(ranks=1, tol=1e-6, max_iter=20)),
           ("tt r=2", "tt", dict(ranks=2, tol=1e-6, max_iter=20)),
           ("tt r=8", "tt", dict(ranks=8, tol=1e-6, max_iter=20))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = mlp([64, 32, 16, 10], torch.float64)
    x, y = digits(args.batch, torch.float64, seed=1)
    dense = tensorcurv.Curvature(model, "dense", "ggn", seed=0)
    stats = dense.capture(x, y, nn.CrossEntropyLoss()).stats
    dense.fit_stats(stats)
    print(f"digits MLP 64-32-16-10, batch {args.batch}, GGN, float64, torch threads {torch.get_num_threads()}; "
          f"fit time median (min-max) of {args.repeats}, relative Frobenius error of the represented operator\n")
    print("| config | layer (m x n) | (mn)² | implicit s | tensorly s | speed-up | implicit err | tensorly err |")
    print("|---|---|---|---|---|---|---|---|")
    for label, sname, hp in CONFIGS:
        for name in stats:
            st, C = stats[name], dense.blocks[name].to_dense()
            times, errs = {"implicit": [], "tensorly": []}, {}
            for _ in range(args.repeats):
                for method in ("implicit", "tensorly"):
                    block = structures.create(sname, st.shape, method=method, **hp)
                    t0 = time.perf_counter()
                    block.fit(st)
                    times[method].append(time.perf_counter() - t0)
                    errs[method] = float((block.to_dense() - C).norm() / C.norm())
            med = {k: statistics.median(v) for k, v in times.items()}
            cell = {k: f"{med[k]:.3f} ({min(v):.3f}-{max(v):.3f})" for k, v in times.items()}
            print(f"| {label} | {name} ({st.m}x{st.n}) | {(st.m * st.n) ** 2} | {cell['implicit']} | "
                  f"{cell['tensorly']} | {med['implicit'] / med['tensorly']:.1f}x | {errs['implicit']:.4f} | "
                  f"{errs['tensorly']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
