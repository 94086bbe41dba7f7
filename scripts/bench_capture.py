"""Benchmark: K-FAC statistics of tensorcurv against curvlinops, nngeometry and BackPACK, quiet and under contention.

    python scripts/bench_capture.py --out reports/bench_capture.md     # the full run (5-10 minutes on 2 quiet cores)
    python scripts/bench_capture.py --quick                            # smoke test: small model and batch

Setup: MLP 64-1024-1024-10 (tanh, float32), batch 2048 of digits, cross-entropy (mean), 2 torch threads. The
peers are a benchmark-only extra (``make bench-setup``). Each figure comes from a FRESH PROCESS per
(library, kind): it builds its own copy of the model (same seed) and times

* ``first``: the first call a user makes, including everything the library does once (no untimed warm-up
  forward/backward before it): ``Curvature(model, "kfac", kind).update(X, y, loss)``; curvlinops
  ``KFACLinearOperator(...)`` (defaults, ``check_deterministic=False``) + ``compute_kronecker_factors()``;
  nngeometry ``PMatKFAC`` of its FIM / Monte-Carlo FIM / a per-sample log-likelihood (EF); BackPACK ``extend``
  + a backward with ``KFAC`` / ``KFLR``. The library's import is timed apart (``import`` column);
* ``next``: the median of ``--repeats`` further calls per process, pooled over both orders (what a training
  loop pays).

Kinds: EF (empirical Fisher), MC (one sampled label per input), GGN (exact; for cross-entropy equal to the
Fisher: curvlinops ``type-2``, nngeometry closed-form ``FIM``, BackPACK ``KFLR``). BackPACK has no EF K-FAC.
The physical floor comes from the same run: a plain forward+backward; forward+backward plus the two factor
products ``aᵀa`` (bias column included) and ``gᵀg`` of every layer (the floor of EF and MC); and the GGN's:
forward, the backward of the ``K = C − 1 = 9`` columns of a loss-Hessian factor (the rank of
``diag(p) − ppᵀ``, the fewest columns any factor can have) as one batched input-gradient pass
written with plain matmuls (``g ← (g Wₗ) ⊙ tanh'`` on the ``(K N, width)`` stack), and the products ``aᵀa``
and ``gᵀg`` of every layer (``gᵀg`` over all ``K N`` rows). ``first / kind floor`` divides by the floor of
the same kind.

Every process list runs in both orders (tensorcurv first, then peers first); ``first`` is the mean of the two
orders. Two conditions: ``quiet`` (whatever else the machine runs: see the load average) and ``contended``,
``--busy`` busy-loop processes that this script starts and kills itself. Ratios are to the fastest peer of
the same kind and condition in this run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time

LIBRARIES = ("tensorcurv", "curvlinops", "nngeometry", "backpack")
KINDS = ("empirical", "mc", "ggn")
FLOORS = ("fwd+bwd", "fwd+bwd+aᵀa+gᵀg", "fwd + K-column bwd + grams")
KIND_FLOOR = {"empirical": FLOORS[1], "mc": FLOORS[1], "ggn": FLOORS[2]}
UNSUPPORTED = {("backpack", "empirical")}  # BackPACK's K-FAC extensions are MC (KFAC) and exact GGN (KFLR) only


# ---------------------------------------------------------------------------------------------- worker side
def digits_batch(batch: int):
    """``batch`` digits (8x8 images as 64 features in [0, 1], float32) and their labels, drawn with a fixed seed."""
    import torch
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    idx = torch.randint(0, len(X), (batch,), generator=torch.Generator().manual_seed(0))
    return (torch.tensor(X, dtype=torch.float32)[idx] / 16.0).contiguous(), torch.tensor(y)[idx].contiguous()


def _setup(width: int, batch: int, threads: int, data: str):
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    x, t = torch.load(data)  # written once by the driver (no sklearn import in every worker)
    assert len(x) == batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    return model, x, t


def _call_tensorcurv(model, x, y, kind):
    from torch import nn

    import tensorcurv

    loss_fn = nn.CrossEntropyLoss()
    curv = tensorcurv.Curvature(model, "kfac", kind, seed=0)
    curv.update(x, y, loss_fn)
    return lambda: curv.update(x, y, loss_fn)


def _call_curvlinops(model, x, y, kind):
    from curvlinops import KFACLinearOperator
    from torch import nn

    fisher = {"empirical": "empirical", "mc": "mc", "ggn": "type-2"}[kind]
    K = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        [p for p in model.parameters()],
        [(x, y)],
        fisher_type=fisher,
        mc_samples=1,
        check_deterministic=False,
    )
    K.compute_kronecker_factors()
    return K.compute_kronecker_factors


def _call_nngeometry(model, x, y, kind):
    import torch
    import torch.nn.functional as F
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatKFAC
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))

    def log_likelihood(inputs, targets):  # per-sample gradients of log p(y|x) at the true labels: the EF
        return -F.cross_entropy(model(inputs), targets, reduction="none")[:, None]

    def fit():
        if kind == "ggn":
            return FIM(model, loader, PMatKFAC, variant="classif_logits")
        if kind == "mc":
            return FIM_MonteCarlo(model, loader, PMatKFAC, variant="classif_logits", trials=1)
        backend = TorchHooksJacobianBackend(
            model=model, function=log_likelihood, layer_collection=LayerCollection.from_model(model)
        )
        return PMatKFAC(generator=backend, examples=loader)

    torch.manual_seed(0)
    fit()
    return fit


def _call_backpack(model, x, y, kind):
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR
    from torch import nn

    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    ext = KFLR if kind == "ggn" else (lambda: KFAC(mc_samples=1))

    def fit():
        for p in model.parameters():
            p.grad = None
        loss = loss_fn(model(x), y)
        with backpack(ext()):
            loss.backward()

    fit()
    return fit


def _call_floor(model, x, y, products: bool):
    import torch
    from torch import nn

    loss_fn = nn.CrossEntropyLoss()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    saved: dict = {}

    def fwd_hook(module, args, out):
        saved[module] = [args[0].detach()]
        out.register_hook(lambda g: saved[module].append(g.detach()))

    if products:
        for m in linears:
            m.register_forward_hook(fwd_hook)

    def fit():
        for p in model.parameters():
            p.grad = None
        loss_fn(model(x), y).backward()
        if products:
            for a, g in saved.values():
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
                a.T @ a, g.T @ g

    fit()
    return fit


def _call_ggn_floor(model, x, y):
    """The GGN's physical floor with plain torch on the ``Linear``/``Tanh`` stack: forward (keeping the layer
    inputs and tanh outputs), the ``K = C − 1`` columns of a factor of the cross-entropy Hessian
    ``diag(p) − ppᵀ`` (``diag(√p) − p√pᵀ`` reflected so that its dependent column vanishes), their backward as
    one ``(K N, ·)`` stack (``g ← g W`` through a Linear, ``g ← g ⊙ (1 − h²)`` through a Tanh), and per Linear
    ``aᵀa`` (bias column included) and ``gᵀg`` over all ``K N`` rows."""
    import torch
    from torch import nn

    layers = list(model)
    assert all(isinstance(m, (nn.Linear, nn.Tanh)) for m in layers), "the GGN floor covers Linear/Tanh stacks"

    @torch.no_grad()
    def fit():
        h, saved = x, []
        for m in layers:
            saved.append(h)
            h = m(h)
        p = h.softmax(-1)
        sqrt_p = p.sqrt()
        S = torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)  # (N, C, C), S Sᵀ = ∇²ℓ, rank C − 1
        u = sqrt_p.clone()
        u[:, -1] += 1  # Householder vector mapping √p (S √p = 0) to −e_C: S Q = [S', 0]
        S = S[:, :, :-1] - S[:, :, -1:] * (2 * u[:, :-1] / (u * u).sum(-1, keepdim=True)).unsqueeze(1)
        g = S.permute(2, 0, 1).reshape(-1, p.shape[-1])  # (K N, C): the output gradients of the last Linear
        N = x.shape[0]
        for i in range(len(layers) - 1, -1, -1):
            m = layers[i]
            if isinstance(m, nn.Linear):
                a = saved[i]
                a = torch.cat([a, a.new_ones(N, 1)], 1)
                a.T @ a, g.T @ g
                if i > 0:
                    g = g @ m.weight
            else:  # Tanh: its output is the next layer's input
                out = saved[i + 1]
                g = (g.view(-1, N, g.shape[-1]) * (1 - out * out)).view(g.shape)

    fit()
    return fit


IMPORTS = {
    "tensorcurv": ["tensorcurv"],
    "curvlinops": ["curvlinops"],
    "backpack": ["backpack", "backpack.extensions"],
    "nngeometry": ["nngeometry.metrics", "nngeometry.object", "nngeometry.backend", "nngeometry.layercollection"],
    "floor": [],
}


def worker(lib: str, kind: str, width: int, batch: int, threads: int, repeats: int, data: str) -> dict:
    model, x, y = _setup(width, batch, threads, data)
    t0 = time.perf_counter()
    for module in IMPORTS[lib]:  # timed apart: a script imports once, whatever it computes
        importlib.import_module(module)
    imported = time.perf_counter() - t0
    t0 = time.perf_counter()
    if lib == "floor" and kind == FLOORS[2]:
        fn = _call_ggn_floor(model, x, y)
    elif lib == "floor":
        fn = _call_floor(model, x, y, products=kind == FLOORS[1])
    else:
        fn = globals()[f"_call_{lib}"](model, x, y, kind)
    first = time.perf_counter() - t0
    nxt = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        nxt.append(time.perf_counter() - t0)
    return {"lib": lib, "kind": kind, "import": imported, "first": first, "next": nxt}


def interleaved_worker(kind: str, libraries, width: int, batch: int, threads: int, repeats: int, data: str) -> dict:
    """All ``libraries`` in one process, each on its own copy of the model, calls alternating (order reversed
    every round) after each library's first call: per library the median of ``repeats`` calls, at the same moment."""
    import copy

    model, x, y = _setup(width, batch, threads, data)
    libs = [lib for lib in libraries if (lib, kind) not in UNSUPPORTED]
    fns = {lib: globals()[f"_call_{lib}"](copy.deepcopy(model), x.clone(), y.clone(), kind) for lib in libs}
    times: dict = {lib: [] for lib in libs}
    for r in range(repeats):
        for lib in libs if r % 2 == 0 else libs[::-1]:
            t0 = time.perf_counter()
            fns[lib]()
            times[lib].append(time.perf_counter() - t0)
    return {lib: statistics.median(t) for lib, t in times.items()}


# ---------------------------------------------------------------------------------------------- driver side
def _busy() -> None:
    while True:
        pass


def run_one(lib: str, kind: str, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        lib,
        kind,
        "--width",
        str(args.width),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--data",
        args.data,
        "--libraries",
        *args.libraries,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"worker {lib} {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def jobs(libraries) -> list[tuple[str, str]]:
    out = [("floor", f) for f in FLOORS]
    for lib in libraries:
        out += [(lib, k) for k in KINDS if (lib, k) not in UNSUPPORTED]
    return out


def run_condition(name: str, args) -> dict:
    procs = []
    if name == "contended":
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_busy, daemon=True) for _ in range(args.busy)]
    load_before = os.getloadavg()[0]
    results: dict = {}
    try:
        for p in procs:
            p.start()
        if procs:
            time.sleep(1.0)
        order = [job for job in jobs(args.libraries) if job[0] == "floor" or job[1] in args.kinds]
        if args.interleaved:
            for kind in args.kinds:
                r = run_one("interleaved", kind, args)
                results[("interleaved", kind)] = r
                print(
                    f"  [{name}, interleaved] {kind}: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in r.items()),
                    flush=True,
                )
            return {"load_before": load_before, "results": results}
        for label, seq in (("tensorcurv first", order), ("peers first", order[::-1])):
            for lib, kind in seq:
                r = run_one(lib, kind, args)
                results.setdefault((lib, kind), []).append(r)
                print(
                    f"  [{name}, {label}] {lib:10s} {kind:16s} first {1e3 * r['first']:8.1f} ms   "
                    f"next {1e3 * statistics.median(r['next']):8.1f} ms",
                    flush=True,
                )
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.join()
    return {"load_before": load_before, "results": results}


def summarize(cond: dict) -> dict:
    """Per (library, kind): first call per order, their mean, the median of the further calls, the import time."""
    out = {}
    for key, runs in cond["results"].items():
        firsts = [r["first"] for r in runs]
        out[key] = {
            "firsts": firsts,
            "first": statistics.mean(firsts),
            "import": statistics.mean(r["import"] for r in runs),
            "next": statistics.median(t for r in runs for t in r["next"]),
        }
    return out


def _fastest_peer(s: dict, kind: str, libraries, field: str) -> tuple[str, float]:
    peers = [(s[(p, kind)][field], p) for p in libraries if p != "tensorcurv" and (p, kind) not in UNSUPPORTED]
    return min(peers)[::-1] if peers else ("none", float("nan"))


def tables(conditions: dict, args) -> str:
    ms = lambda t: f"{1e3 * t:.0f}"  # noqa: E731
    head = [
        "| condition (load before) | kind | tensorcurv first call / fastest peer | next calls / fastest peer "
        "| tensorcurv first / kind floor | fastest peer first / kind floor |",
        "|---|---|---|---|---|---|",
    ]
    full = [
        "| condition (load before) | kind | library | first call [ms] (tc first / peers first) | next calls [ms] "
        "| first / fastest peer | next / fastest peer | first / fwd+bwd | first / kind floor | import [ms] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cond in conditions.items():
        s = summarize(cond)
        label = f"{name} ({cond['load_before']:.2f})"
        fb = s[("floor", FLOORS[0])]["first"]
        for floor in FLOORS:
            v = s[("floor", floor)]
            full.append(
                f"| {label} | floor | {floor} | {ms(v['first'])} ({' / '.join(map(ms, v['firsts']))}) "
                f"| {ms(v['next'])} | | | {v['first'] / fb:.2f} | | |"
            )
        for kind in args.kinds:
            pf, best_first = _fastest_peer(s, kind, args.libraries, "first")
            pn, best_next = _fastest_peer(s, kind, args.libraries, "next")
            tc = s[("tensorcurv", kind)]
            kf = s[("floor", KIND_FLOOR[kind])]["first"]
            head.append(
                f"| {label} | {kind} | **{tc['first'] / best_first:.2f}** ({ms(tc['first'])} vs {pf} "
                f"{ms(best_first)} ms) | {tc['next'] / best_next:.2f} ({ms(tc['next'])} vs {pn} "
                f"{ms(best_next)} ms) | {tc['first'] / kf:.2f} ({ms(kf)} ms) | {best_first / kf:.2f} |"
            )
            for lib in args.libraries:
                if (lib, kind) in UNSUPPORTED:
                    full.append(f"| {label} | {kind} | {lib} | n/a | n/a | | | | | |")
                    continue
                v = s[(lib, kind)]
                full.append(
                    f"| {label} | {kind} | {lib} | {ms(v['first'])} ({' / '.join(map(ms, v['firsts']))}) "
                    f"| {ms(v['next'])} | {v['first'] / best_first:.2f} | {v['next'] / best_next:.2f} "
                    f"| {v['first'] / fb:.2f} | {v['first'] / kf:.2f} | {ms(v['import'])} |"
                )
    return "\n".join(head) + "\n\nAll figures:\n\n" + "\n".join(full)


def interleaved_table(conditions: dict, args) -> str:
    rows = [
        "| condition (load before) | kind | "
        + " | ".join(f"{lib} [ms]" for lib in args.libraries)
        + " | tensorcurv / fastest peer |",
        "|---|---|" + "---|" * (len(args.libraries) + 1),
    ]
    for name, cond in conditions.items():
        for kind in args.kinds:
            r = cond["results"][("interleaved", kind)]
            peers = [v for lib, v in r.items() if lib != "tensorcurv"]
            cells = " | ".join(f"{1e3 * r[lib]:.0f}" if lib in r else "n/a" for lib in args.libraries)
            ratio = f"{r['tensorcurv'] / min(peers):.2f}" if peers else ""
            rows.append(f"| {name} ({cond['load_before']:.2f}) | {kind} | {cells} | {ratio} |")
    return "\n".join(rows)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("torch", "curvlinops-for-pytorch", "nngeometry", "backpack-for-pytorch"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    ap.add_argument("--repeats", type=int, default=2, help="further calls per process after the first")
    ap.add_argument("--busy", type=int, default=2, help="busy-loop processes of the contended condition")
    ap.add_argument("--conditions", nargs="+", default=["quiet", "contended"], choices=["quiet", "contended"])
    ap.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument(
        "--interleaved",
        action="store_true",
        help="instead: all libraries in one process per kind, calls alternating (steady state, no drift "
        "between processes); --repeats calls each",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: width 128, batch 256, 1 repeat")
    ap.add_argument("--out", default=None, help="write the table as Markdown to this file")
    ap.add_argument("--worker", nargs=2, metavar=("LIB", "KIND"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        lib, kind = args.worker
        if lib == "interleaved":
            out = interleaved_worker(
                kind, args.libraries, args.width, args.batch, args.threads, args.repeats, args.data
            )
        else:
            out = worker(lib, kind, args.width, args.batch, args.threads, args.repeats, args.data)
        print(json.dumps(out))
        return
    if "tensorcurv" not in args.libraries:
        ap.error("--libraries must include tensorcurv")
    if args.quick:
        args.width, args.batch, args.repeats = 128, 256, 1
    import torch

    t0 = time.time()
    conditions = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.data = os.path.join(tmp, "digits.pt")
        torch.save(digits_batch(args.batch), args.data)
        for name in args.conditions:
            print(f"{name}: load average {os.getloadavg()[0]:.2f}", flush=True)
            conditions[name] = run_condition(name, args)
    cmd = "python " + " ".join(["scripts/bench_capture.py"] + sys.argv[1:])
    header = (
        f"MLP 64-{args.width}-{args.width}-10 (tanh, float32), batch {args.batch} of digits, cross-entropy; "
        f"{args.threads} torch threads; {versions()}; {os.cpu_count()} CPUs; a fresh process per "
        f"(library, kind), both orders; next = median of {args.repeats} further calls per process and order; "
        f"contended = {args.busy} busy-loop processes; load average (1 min) before each condition; "
        f"total {time.time() - t0:.0f} s.\n\n"
    )
    if args.interleaved:
        header = header.replace(
            "a fresh process per (library, kind), both orders; next = median of "
            f"{args.repeats} further calls per process and order",
            f"interleaved: all libraries in one process per kind, median of {args.repeats} "
            "alternating calls each after the first",
        )
        text = header + interleaved_table(conditions, args)
    else:
        text = header + tables(conditions, args)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Capture benchmark: K-FAC statistics against the peers\n\n`{cmd}`\n\n{text}\n")


if __name__ == "__main__":
    main()
