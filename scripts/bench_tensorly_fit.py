"""Implicit vs tensorly fits of ``tucker`` / ``tt`` on the digits MLP accuracy-table blocks.

For each layer of the MLP 64-32-16-10 (GGN, float64, batch 512, the blocks of
``scripts/bench_structures.py`` ``accuracy_table``) and each configuration, fits the block with
``method="implicit"`` and ``method="tensorly"`` interleaved, ``--repeats`` times, and prints the median
(min-max) fit time and the relative Frobenius error ``‖Ĉ − C‖_F / ‖C‖_F`` of the represented operator.

    .venv/bin/python scripts/bench_tensorly_fit.py [--repeats 5]

``--break-even``: instead, synthetic Linear blocks (N = 512, K = 10) of growing ``(mn)²`` around the
``method="auto"`` bounds ``dense_tensor_fit.AUTO_ENTRIES`` (min fit time of ``--repeats``).
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
from bench_structures import digits, mlp  # noqa: E402

import tensorcurv  # noqa: E402
from tensorcurv import structures  # noqa: E402
from tensorcurv.core.stats import LayerStats  # noqa: E402
from tensorcurv.structures.split import dense_fit as dtf  # noqa: E402

CONFIGS = [
    ("tucker r=4", "tucker", dict(ranks=4, tol=1e-6, max_iter=20)),
    ("tucker r=16", "tucker", dict(ranks=16, tol=1e-6, max_iter=20)),
    ("tt r=1", "tt", dict(ranks=1, tol=1e-6, max_iter=20)),
    ("tt r=2", "tt", dict(ranks=2, tol=1e-6, max_iter=20)),
    ("tt r=8", "tt", dict(ranks=8, tol=1e-6, max_iter=20)),
]


def timed_pair(sname, shape, stats, hp, repeats):
    """Fit times (implicit, tensorly), ``repeats`` each, interleaved."""
    times = {"implicit": [], "tensorly": []}
    for _ in range(repeats):
        for method in times:
            block = structures.create(sname, shape, method=method, **hp)
            t0 = time.perf_counter()
            block.fit(stats)
            times[method].append(time.perf_counter() - t0)
    return times


def break_even(repeats):
    dtf.MAX_ENTRIES = 2**25  # this study only: form tensors above the library's bound
    g = torch.Generator().manual_seed(0)
    N, K = 512, 10
    print(
        f"synthetic Linear blocks, N={N}, K={K}, float64, min fit time of {repeats} (s); "
        f"auto bounds {dtf.AUTO_ENTRIES}\n"
    )
    print("| config | block (m x n) | (mn)² | implicit s | tensorly s | speed-up |")
    print("|---|---|---|---|---|---|")
    for m, n in [(16, 33), (16, 65), (24, 65), (32, 65), (44, 65), (64, 65)]:
        a = torch.randn(N, 1, n, generator=g, dtype=torch.float64)
        gg = torch.randn(N, K, 1, m, generator=g, dtype=torch.float64) * torch.rand(
            1, 1, 1, m, generator=g, dtype=torch.float64
        )
        st = LayerStats(a, gg, 1.0 / N)
        for label, sname, hp in [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[4]]:
            t = {k: min(v) for k, v in timed_pair(sname, (m, n), st, hp, repeats).items()}
            print(
                f"| {label} | {m}x{n} | {(m * n) ** 2} | {t['implicit']:.3f} | {t['tensorly']:.3f} | "
                f"{t['implicit'] / t['tensorly']:.2f}x |",
                flush=True,
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--break-even", action="store_true", help="synthetic blocks around the auto bounds")
    args = p.parse_args(argv)
    if args.break_even:
        return break_even(args.repeats)
    torch.manual_seed(0)
    model = mlp([64, 32, 16, 10], torch.float64)
    x, y = digits(args.batch, torch.float64, seed=1)
    dense = tensorcurv.Curvature(model, "dense", "ggn", seed=0)
    stats = dense.capture(x, y, nn.CrossEntropyLoss()).stats
    dense.fit_stats(stats)
    print(
        f"digits MLP 64-32-16-10, batch {args.batch}, GGN, float64, torch threads {torch.get_num_threads()}; "
        f"fit time median (min-max) of {args.repeats}, relative Frobenius error of the represented operator\n"
    )
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
            print(
                f"| {label} | {name} ({st.m}x{st.n}) | {(st.m * st.n) ** 2} | {cell['implicit']} | "
                f"{cell['tensorly']} | {med['implicit'] / med['tensorly']:.1f}x | {errs['implicit']:.4f} | "
                f"{errs['tensorly']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
