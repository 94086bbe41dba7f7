"""Benchmark of the tensor structures: fit cost relative to K-FAC, memory, and accuracy.

    python scripts/bench_structures.py [--quick] [--out reports/bench_structures.md]

Part 1 (float32): MLP 64-W-W-10 tanh (W = 1024, batch 2048; digits upsampled by sampling with
replacement), empirical Fisher. Per layer: fit time of each structure from the same captured
statistics divided by the time to compute the K-FAC factors, a warm-started second fit, memory
relative to K-FAC, and the operator products / iterations the fit used. Each fit time is divided by
the K-FAC factor time measured immediately before it (same process, same load); the table gives the
median and the range over ``--repeats`` repeats (the machine is shared; expect noise). "warm refit"
fits the next step's batch warm-started from this one (what training does every step); the "update"
rows time ``update(next batch, decay=0.95)`` instead (the 1st after the fit, or the 5th after four
untimed ones on alternating batches). K-FAC's factors (``LayerStats.kron_factors``) use the same
symmetric upper-block-triangle products (:func:`tensorcurv.linalg.gram`) as the Gram route, so the
ratios are like for like.
Part 2 (float64): digits MLP 64-32-16-10, GGN: relative Frobenius error vs the exact block and
memory for every registered layer structure.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import tensorcurv
from tensorcurv import structures

CONFIGS = [
    ("kpsvd r=1", "kron_sum", dict(rank=1)),
    ("kron_sum r=2", "kron_sum", dict(rank=2)),
    ("kron_sum r=2 psd_proof=samples", "kron_sum", dict(rank=2, psd_proof="samples")),
    ("kron_sum r=4", "kron_sum", dict(rank=4)),
    ("kron_sum r=4 psd_proof=spectral", "kron_sum", dict(rank=4, psd_proof="spectral")),
    ("kron_sum r=4 warm update (decay 0.95), 1st after the fit", "kron_sum", dict(rank=4, _update=0.95)),
    ("kron_sum r=4 warm update (decay 0.95), 5th", "kron_sum", dict(rank=4, _update=0.95, _warmup=4)),
    ("tucker r=4 (3 sweeps)", "tucker", dict(ranks=4, max_iter=3)),
    ("tt r=2 (3 sweeps)", "tt", dict(ranks=2, max_iter=3)),
]


def digits(batch: int, dtype, seed: int = 0):
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=dtype) / 16.0
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, X.shape[0], (batch,), generator=g)
    return X[idx], torch.tensor(y)[idx]


def mlp(widths, dtype):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def _med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def _cell(ratios):
    """Median ratio and its spread over the repeats."""
    return f"{_med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def floor_time(st, rank: int, weights: torch.Tensor) -> float:
    """Seconds of the bare torch ops of the Gram route at rank ``r`` (T = 1): the two sample Grams
    ``(a aᵀ)∘²``, ``(g gᵀ)∘²`` as plain gemms and the ``r`` weighted covariances ``Σ_s w_ks a_s a_sᵀ``,
    ``Σ_s w_ks g_s g_sᵀ`` as one gemm per side ``Xᵀ [w_1 ⊙ X, …, w_r ⊙ X]`` — its arithmetic floor without
    exploiting symmetry (the implementation computes only the upper block triangles)."""
    a, g = st.a[:, 0], st.g[:, :, 0].reshape(-1, st.m)
    w = weights[:, :rank]
    t0 = time.perf_counter()
    (a @ a.T).square_(), (g @ g.T).square_()
    for X in (a, g):
        X.T @ (X[:, None, :] * w[:, :, None]).reshape(X.shape[0], -1)
    return time.perf_counter() - t0


def _interval_note(info) -> str:
    """For ``update`` rows: the scale the free interval certificate proved (used only if not too loose)."""
    if "interval_scale" not in info:
        return ""
    t = info["interval_scale"]
    return "; interval certificate: none" if t is None else f"; interval certificate t = {t:.3g}"


def cost_table(width: int, batch: int, repeats: int, only: list[str] | None = None) -> list[str]:
    model = mlp([64, width, width, 10], torch.float32)
    curv = tensorcurv.Curvature(model, "kfac", "empirical", seed=0)
    stats = curv.capture(*digits(batch, torch.float32), nn.CrossEntropyLoss()).stats
    nxt = curv.capture(*digits(batch, torch.float32, seed=1), nn.CrossEntropyLoss()).stats  # the next step's batch
    rows = [
        f"### Fit cost vs K-FAC factors: MLP 64-{width}-{width}-10, batch {batch}, float32, empirical Fisher, "
        f"{torch.get_num_threads()} threads; median (min-max) of {repeats} repeats, each ratio against the "
        "K-FAC factor time measured right before it\n",
        "| layer (m x n) | structure | cold fit / K-FAC | warm refit (next batch) / K-FAC "
        "| of which SVD (warm) / K-FAC "
        "| of which PSD (warm) / K-FAC | floor (Gram + r covariances, plain gemms) / K-FAC "
        "| memory / K-FAC | iterations cold / warm | products cold / warm | method | PSD (t) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in stats.items():
        kfac = structures.create("kfac", st.shape).fit(st)
        kfac_times = []
        for label, sname, hp in CONFIGS:
            if only and sname not in only:
                continue
            hp = dict(hp)
            decay = hp.pop("_update", None)  # the row times update(next batch, decay) instead of a refit
            warmup = hp.pop("_warmup", 0)  # untimed updates before it (batches alternating), as in training
            cold, warm, svd, psd, floor = [], [], [], [], []
            rank = hp.get("rank") if sname == "kron_sum" and st.T == 1 else None
            weights = torch.randn(st.N, rank or 1, dtype=st.a.dtype)
            for _ in range(repeats):
                block = structures.create(sname, st.shape, **hp)
                t0 = time.perf_counter()
                st.kron_factors()
                t1 = time.perf_counter()
                block.fit(st)
                t2 = time.perf_counter()
                info = dict(block.last_fit)
                for i in range(warmup):
                    block.update((nxt if i % 2 == 0 else stats)[name], decay)
                ts1 = time.perf_counter()  # the next step: K-FAC, then the warm refit / update
                nxt[name].kron_factors()
                t3 = time.perf_counter()
                if decay is None:
                    block.fit(nxt[name])  # warm start from the previous step's fit
                else:
                    block.update(nxt[name], decay)  # warm refit + recompression of the running average
                t4 = time.perf_counter()
                winfo = dict(block.last_fit)
                kfac_times += [t1 - t0, t3 - ts1]
                cold.append((t2 - t1) / (t1 - t0))
                warm.append((t4 - t3) / (t3 - ts1))
                svd.append(winfo.get("svd_time", float("nan")) / (t3 - ts1))
                psd.append(winfo.get("psd_time", float("nan")) / (t3 - ts1))
                if rank is not None:  # the floor against its own K-FAC time, measured right before it
                    t5 = time.perf_counter()
                    st.kron_factors()
                    t6 = time.perf_counter()
                    floor.append(floor_time(st, rank, weights) / (t6 - t5))
                    kfac_times.append(t6 - t5)
            t = winfo.get("psd_scale")
            rows.append(
                f"| {name} ({st.m}x{st.n}) | {label} | {_cell(cold)} | {_cell(warm)} | "
                f"{_cell(svd)} | "
                f"{_cell(psd) if 'psd_time' in winfo else '-'} | {_cell(floor) if floor else '-'} | "
                f"{block.nbytes / kfac.nbytes:.2f} | {info.get('iterations')} / {winfo.get('iterations')} | "
                f"{info.get('products', '-')} / {winfo.get('products', '-')} | "
                f"{info.get('method', 'als/hooi')} | "
                f"{winfo.get('psd_method', '-')}{f' ({t:.3f})' if t is not None else ''}"
                f"{_interval_note(winfo)} |"
            )
        if kfac_times:
            rows.append(
                f"| {name} | (K-FAC factor time median {_med(kfac_times) * 1e3:.1f} ms, "
                f"{min(kfac_times) * 1e3:.1f}-{max(kfac_times) * 1e3:.1f}) "
                "| 1 | 1 | | | | 1 | | | | |"
            )
    return rows


def accuracy_table(batch: int) -> list[str]:
    torch.manual_seed(0)
    model = mlp([64, 32, 16, 10], torch.float64)
    x, y = digits(batch, torch.float64, seed=1)
    dense = tensorcurv.Curvature(model, "dense", "ggn", seed=0)
    stats = dense.capture(x, y, nn.CrossEntropyLoss()).stats
    dense.fit_stats(stats)
    configs = [
        ("dense", "dense", {}),
        ("diagonal", "diagonal", {}),
        ("kfac", "kfac", {}),
        ("ekfac", "ekfac", {}),
        ("kpsvd", "kpsvd", dict(tol=1e-10, max_iter=500)),
        ("kron_sum r=2", "kron_sum", dict(rank=2, tol=1e-10, max_iter=500)),
        ("kron_sum r=2 psd=none", "kron_sum", dict(rank=2, psd="none", tol=1e-10, max_iter=500)),
        ("kron_sum r=4", "kron_sum", dict(rank=4, tol=1e-10, max_iter=500)),
        ("kron_sum r=4 psd_proof=dense", "kron_sum", dict(rank=4, psd_proof="dense", tol=1e-10, max_iter=500)),
        ("kron_sum r=4 psd=none", "kron_sum", dict(rank=4, psd="none", tol=1e-10, max_iter=500)),
        ("tucker r=4", "tucker", dict(ranks=4, tol=1e-6, max_iter=20)),
        ("tucker r=16", "tucker", dict(ranks=16, tol=1e-6, max_iter=20)),
        ("tt r=2", "tt", dict(ranks=2, tol=1e-6, max_iter=20)),
        ("tt r=8", "tt", dict(ranks=8, tol=1e-6, max_iter=20)),
    ]
    names = list(stats)
    rows = [
        f"### Accuracy / memory: digits MLP 64-32-16-10, batch {batch}, float64, GGN "
        "(relative Frobenius error vs the exact block; memory in KiB)\n",
        "| structure | " + " | ".join(f"{n} ({stats[n].m}x{stats[n].n}) err" for n in names) + " | memory KiB |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for label, sname, hp in configs:
        errs, mem = [], 0
        for n in names:
            block = structures.create(sname, stats[n].shape, **hp).fit(stats[n])
            C = dense.blocks[n].to_dense()
            errs.append(float((block.to_dense() - C).norm() / C.norm()))
            mem += block.nbytes
        rows.append(f"| {label} | " + " | ".join(f"{e:.4f}" for e in errs) + f" | {mem / 1024:.1f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="width 128, batch 256, one repeat (seconds)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="structures for the cost table (e.g. kron_sum)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the digits accuracy table")
    p.add_argument("--out", type=Path, default=None, help="write the tables as Markdown here")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.repeats = 128, 256, 1
    torch.manual_seed(0)
    lines = cost_table(args.width, args.batch, args.repeats, args.only)
    if not args.no_accuracy:
        lines += [""] + accuracy_table(256 if args.quick else 512)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
