"""Benchmark of tensorcurv.optim on digits: step cost relative to SGD, and time/steps to a target loss.

    .venv/bin/python scripts/bench_optim.py --out reports/bench_optim.md           # a few minutes
    .venv/bin/python scripts/bench_optim.py --quick                                # smoke run

Problems: the digits MLP classifier (64-64-10, tanh, cross-entropy) and the digits autoencoder
(64-128-32-128-64, sigmoid hidden layers, linear code and output, MSE), mini-batches from the
training split, float32, CPU.

(a) time per step / time per SGD step (at each of --batches, separate rows), for every structure (dense only
    where every block has mn ≤ --dense-max), at statistics+inverse interval 1 and 10; NaturalGradient (kind mc, one
    backward column) and GaussNewton (kind ggn, one column per output) for kfac. Configurations
    are run in interleaved rounds and the median per-step time of each is taken, so the ratios
    come from the same (shared, noisy) machine state; "× SGD" is the ratio of the medians, the
    spread column gives the min–max of the per-round ratios (config / SGD in the same round).
(b) wall-clock (training steps only, evaluation excluded) and steps until the full training loss
    reaches a target (runs give up after --max-wall seconds or --max-steps), for NaturalGradient /
    GaussNewton (kfac with both inverse paths; kron_sum, tt when registered and selected) with an
    lr × damping sweep (fixed: momentum, KL clip, decay schedule) and SGD-momentum / Adam with an
    lr sweep of the same size (same batches, seeds, batch size and target); the best configuration
    of each method (lowest mean time over the seeds, all seeds must reach) is reported, averaged
    over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorcurv.optim as O  # noqa: E402
from tensorcurv import structures  # noqa: E402
from tensorcurv.experiments import data as data  # noqa: E402
from tensorcurv.experiments import models as models  # noqa: E402


def problem(name: str, seed: int):
    splits = data.load("digits", seed=0, dtype=torch.float32)
    X, y = splits.train
    X = X.reshape(X.shape[0], -1)
    torch.manual_seed(seed)
    if name == "mlp":
        return models.mlp((64,), 10, hidden_sizes=(64,), activation="tanh"), nn.CrossEntropyLoss(), X, y
    return models.autoencoder((64,), hidden_sizes=[128, 32], activation="sigmoid"), nn.MSELoss(), X, X.clone()


def batches(X, Y, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0] - batch + 1, batch):
            idx = perm[i : i + batch]
            yield X[idx], Y[idx]


def dense_ok(model, limit: int) -> bool:
    return all(
        m.weight.shape[0] * (m.weight.shape[1] + 1) <= limit for m in model.modules() if isinstance(m, nn.Linear)
    )


ONLY: list[str] | None = None  # --structures
CHOLESKY = dict(damping_kind="pi", inverse="cholesky")  # kfac's alternative inverse path


def extra_structures() -> list[str]:
    return [s for s in ("kron_sum", "tt", "tucker") if s in structures.names() and (ONLY is None or s in ONLY)]


# ------------------------------------------------------------------ (a) step cost
def step_cost(args) -> list[dict]:
    rows = []
    for prob, batch in [(p, b) for p in ("mlp", "autoencoder") for b in args.batches]:
        model0, loss_fn, X, Y = problem(prob, 0)
        configs = [("sgd", "sgd", {"lr": 0.01}, 1)]
        structs = [s for s in ("diagonal", "kfac", "ekfac") if ONLY is None or s in ONLY] + extra_structures()
        if dense_ok(model0, args.dense_max) and (ONLY is None or "dense" in ONLY):
            structs = ["dense"] + structs
        for k in (1, 10):
            for s in structs:
                hp = {"rank": 2} if s == "kron_sum" else {}
                configs.append(
                    (
                        f"NG-mc {s}",
                        "natural_gradient",
                        dict(structure=s, lr=0.1, damping=1e-2, stats_interval=k, inverse_interval=k, **hp),
                        k,
                    )
                )
                if s == "kfac":  # the documented fast path: π-damped explicit inverses, 2 matmuls per solve
                    configs.append(
                        (
                            "NG-mc kfac pi+cholesky",
                            "natural_gradient",
                            dict(structure=s, lr=0.1, damping=1e-2, stats_interval=k, inverse_interval=k, **CHOLESKY),
                            k,
                        )
                    )
            configs.append(
                (
                    "GN-ggn kfac",
                    "gauss_newton",
                    dict(structure="kfac", lr=0.1, damping=1e-2, stats_interval=k, inverse_interval=k),
                    k,
                )
            )
        opts, data_it = [], []
        for _label, name, kw, _k in configs:
            model = (
                models.mlp((64,), 10, hidden_sizes=(64,))
                if prob == "mlp"
                else models.autoencoder((64,), hidden_sizes=[128, 32])
            )
            model.load_state_dict(model0.state_dict())
            opts.append(O.build(name, model, loss_fn, **kw))
            data_it.append(batches(X, Y, batch, 0))
        times = [[] for _ in configs]
        for r in range(args.rounds):
            for i, opt in enumerate(opts):
                it = data_it[i]
                b = [next(it) for _ in range(args.steps_per_round)]
                t0 = time.perf_counter()
                for xb, yb in b:
                    opt.step(xb, yb)
                if r > 0:  # round 0 is warm-up
                    times[i].append((time.perf_counter() - t0) / args.steps_per_round)
        print(f"  {prob} batch {batch}: timed {len(configs)} configurations", flush=True)
        sgd = statistics.median(times[0])
        for (label, name, _kw, k), ts in zip(configs, times):
            if name == "sgd":
                continue
            med = statistics.median(ts)
            paired = sorted(t / s for t, s in zip(ts, times[0]))  # same round: same machine state
            rows.append(
                {
                    "problem": prob,
                    "batch": batch,
                    "optimizer": label,
                    "interval": k,
                    "ms_per_step": 1e3 * med,
                    "vs_sgd": med / sgd,
                    "sgd_ms": 1e3 * sgd,
                    "spread": f"{paired[0]:.2f}–{paired[-1]:.2f}",
                }
            )
    return rows


# ------------------------------------------------------------------ (c) where a kfac step's time goes
VARIANTS = {"tikhonov+eigh": {}, "pi+cholesky": CHOLESKY}


def breakdown(args) -> list[dict]:
    """Components of one NG kfac step for each inverse path (min over repeats of a fixed batch, ms):
    forward+backward, the whole-model solve, per refresh the decompositions (eigh, or the Cholesky
    inverses) and the solver copy, per statistics step capture+fit."""

    def best(f, n=20, reps=9):
        for _ in range(2):
            f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            ts.append((time.perf_counter() - t0) / n)
        return 1e3 * min(ts)

    rows = []
    for prob in ("mlp", "autoencoder"):
        model, loss_fn, X, Y = problem(prob, 0)
        xb, yb = X[: args.batch], Y[: args.batch]
        sgd = O.build("sgd", model, loss_fn, lr=1e-12)

        def fwd_bwd():
            for p in model.parameters():
                p.grad = None
            loss_fn(model(xb), yb).backward()

        for variant, hp in VARIANTS.items():
            ng = O.build(
                "natural_gradient",
                model,
                loss_fn,
                structure="kfac",
                lr=1e-12,
                damping=1e-2,
                stats_interval=10**9,
                inverse_interval=10**9,
                **hp,
            )
            ng.step(xb, yb)  # step 0 captures, fits and refreshes; later steps are plain
            pre = ng.preconditioner
            blocks, grads = pre.solver.blocks, [p.grad.clone() for p in pre.params]

            def solve():
                pre.solver.solve(grads, damping=1e-2)

            def refresh_and_solve():  # caches dropped as after a refresh; the next solve rebuilds them
                for b in blocks.values():
                    b._after_load()
                solve()

            def capture_fit():
                pre._zero_grad()
                pre.curvature.fit_capture(xb, pre.curvature.capture(xb, yb, pre.loss, accumulate_grad=True), 0.95)

            r = {
                "problem": prob,
                "variant": variant,
                "sgd_step": best(lambda: sgd.step(xb, yb)),
                "ng_plain_step": best(lambda: ng.step(xb, yb)),
                "fwd_bwd": best(fwd_bwd),
                "solve": best(solve),
                "decomp": best(refresh_and_solve, 3, 7),
                "capture_fit": best(capture_fit, 5, 7),
                "copy": best(lambda: pre.solver.load_state_dict(pre.curvature.state_dict()), 5),
            }
            r["decomp"] = max(r["decomp"] - r["solve"], 0.0)
            r["refresh_extra"] = r["decomp"] + r["capture_fit"] - r["fwd_bwd"] + r["copy"]
            r["est_k10"] = (r["ng_plain_step"] + r["refresh_extra"] / 10) / r["sgd_step"]
            rows.append(r)
            print(
                f"  {prob} {variant}: " + ", ".join(f"{k}={v:.3f}" for k, v in r.items() if isinstance(v, float)),
                flush=True,
            )
    return rows


# ------------------------------------------------------------------ (b) time to target
def time_to_target(args) -> list[dict]:
    targets = {"mlp": args.target_mlp, "autoencoder": args.target_ae}
    k = args.interval
    methods: dict[str, list[tuple[str, str, dict]]] = {
        "SGD-momentum": [("momentum", f"lr={lr}", {"lr": lr, "momentum": 0.9}) for lr in args.sgd_lrs],
        "Adam": [("adam", f"lr={lr}", {"lr": lr}) for lr in args.adam_lrs],
    }
    so_common = dict(
        stats_interval=k,
        inverse_interval=k,
        kl_clip=args.kl_clip,
        momentum=args.so_momentum,
        decay_schedule=args.decay_schedule,
    )
    grid = [(lr, lam) for lr in args.so_lrs for lam in args.so_dampings]  # lr × damping sweep of NG/GN

    def so(name, **kw):
        return [(name, f"lr={lr} λ={lam:g}", dict(lr=lr, damping=lam, **so_common, **kw)) for lr, lam in grid]

    for s in ["kfac"] + extra_structures():
        if s == "tucker":
            continue
        if s == "kfac":
            methods["NG-mc kfac"] = so("natural_gradient", structure=s)
            methods["NG-mc kfac pi+cholesky"] = so("natural_gradient", structure=s, **CHOLESKY)
        else:  # slow structures: one configuration
            hp = {"rank": 2} if s == "kron_sum" else {}
            methods[f"NG-mc {s}"] = so("natural_gradient", structure=s, **hp)[-1:]
    methods["GN-ggn kfac"] = so("gauss_newton", structure="kfac")
    rows = []
    for prob in ("mlp", "autoencoder"):
        for method, cands in methods.items():
            best = None
            for name, label, kw in cands:
                res = []
                for seed in range(args.seeds):
                    model, loss_fn, X, Y = problem(prob, seed)
                    opt = O.build(name, model, loss_fn, **kw)
                    it = batches(X, Y, args.batch, seed)
                    wall, reached = 0.0, None
                    for step in range(1, args.max_steps + 1):
                        if wall > args.max_wall:
                            break
                        xb, yb = next(it)
                        t0 = time.perf_counter()
                        opt.step(xb, yb)
                        wall += time.perf_counter() - t0
                        if step % args.eval_every == 0:
                            with torch.no_grad():
                                out = model(X)
                                full = float(O.baselines.as_loss_spec(loss_fn)(out, Y))
                            if full <= targets[prob]:
                                reached = (step, wall)
                                break
                            if not torch.isfinite(torch.tensor(full)):
                                break
                    res.append(reached)
                if all(r is not None for r in res):
                    cand = (statistics.mean(r[1] for r in res), statistics.mean(r[0] for r in res), label)
                    if best is None or cand[0] < best[0]:
                        best = cand
            rows.append(
                {
                    "problem": prob,
                    "method": method,
                    "target": targets[prob],
                    "best": best[2] if best else "none reached",
                    "wall_s": best[0] if best else float("nan"),
                    "steps": best[1] if best else float("nan"),
                    "ms_step": 1e3 * best[0] / best[1] if best else float("nan"),
                }
            )
            print(
                f"  {prob:12s} {method:16s} {rows[-1]['best']:14s} wall={rows[-1]['wall_s']:.3f}s "
                f"steps={rows[-1]['steps']}",
                flush=True,
            )
    return rows


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(h for h, _, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(format(r[k], f) for _, k, f in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (few steps, one seed)")
    p.add_argument("--batch", type=int, default=256, help="batch size of (b) and (c)")
    p.add_argument(
        "--batches", type=int, nargs="+", default=None, help="(a) batch sizes, one set of rows each (default: --batch)"
    )
    p.add_argument("--rounds", type=int, default=3, help="(a) interleaved timing rounds (first is warm-up)")
    p.add_argument("--steps-per-round", type=int, default=5, help="(a) steps per round")
    p.add_argument("--dense-max", type=int, default=2500, help="(a) dense only if every block has mn <= this")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--interval", type=int, default=10, help="(b) stats and inverse interval of NG/GN")
    p.add_argument("--so-dampings", type=float, nargs="+", default=[1e-3, 1e-2], help="(b) NG/GN damping sweep")
    p.add_argument("--kl-clip", type=float, default=1e-2, help="(b) NG/GN KL clip")
    p.add_argument("--so-momentum", type=float, default=0.9, help="(b) NG/GN heavy-ball momentum")
    p.add_argument(
        "--decay-schedule",
        default="average",
        choices=["constant", "average"],
        help="(b) NG/GN running-average schedule (average: min(1 - 1/k, decay))",
    )
    p.add_argument("--max-wall", type=float, default=8.0, help="(b) give up a run after this many seconds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noisy on a shared machine)")
    p.add_argument("--target-mlp", type=float, default=0.01, help="(b) full training cross-entropy to reach")
    p.add_argument("--target-ae", type=float, default=0.15, help="(b) full training MSE to reach")
    p.add_argument("--sgd-lrs", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    p.add_argument("--adam-lrs", type=float, nargs="+", default=[5e-3, 1e-2, 2e-2, 5e-2])
    p.add_argument("--so-lrs", type=float, nargs="+", default=[0.3, 1.0])
    p.add_argument("--structures", nargs="+", default=None, help="restrict the structures (default: all known)")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["a", "b"],
        choices=["a", "b", "c"],
        help="which benchmarks to run (c: where an NG kfac step's time goes)",
    )
    args = p.parse_args()
    args.batches = args.batches or [args.batch]
    global ONLY
    ONLY = args.structures
    if args.quick:
        args.rounds, args.steps_per_round, args.seeds, args.max_steps, args.max_wall = 2, 2, 1, 40, 3.0
        args.sgd_lrs, args.adam_lrs, args.so_lrs = args.sgd_lrs[-1:], args.adam_lrs[-1:], args.so_lrs[:1]
        args.so_dampings = args.so_dampings[-1:]
    torch.set_num_threads(args.threads)
    t0 = time.time()
    print("(a) time per step relative to SGD", flush=True)
    cost = step_cost(args) if "a" in args.parts else []
    ta = table(
        cost,
        [
            ("problem", "problem", "s"),
            ("batch", "batch", "d"),
            ("optimizer", "optimizer", "s"),
            ("stats+inverse interval", "interval", "d"),
            ("ms/step", "ms_per_step", ".2f"),
            ("× SGD", "vs_sgd", ".2f"),
            ("per-round × SGD (min–max)", "spread", "s"),
            ("SGD ms/step", "sgd_ms", ".2f"),
        ],
    )
    print(ta, flush=True)
    print("(b) wall-clock and steps to the target training loss", flush=True)
    ttt = time_to_target(args) if "b" in args.parts else []
    tb = table(
        ttt,
        [
            ("problem", "problem", "s"),
            ("method", "method", "s"),
            ("target", "target", "g"),
            ("best config", "best", "s"),
            ("wall s (mean)", "wall_s", ".3f"),
            ("steps (mean)", "steps", ".1f"),
            ("ms/step", "ms_step", ".2f"),
        ],
    )
    print(tb, flush=True)
    parts = breakdown(args) if "c" in args.parts else []
    tc = table(
        parts,
        [
            ("problem", "problem", "s"),
            ("inverse path", "variant", "s"),
            ("SGD step", "sgd_step", ".3f"),
            ("NG kfac plain step", "ng_plain_step", ".3f"),
            ("fwd+bwd", "fwd_bwd", ".3f"),
            ("solve", "solve", ".3f"),
            ("decomposition / refresh", "decomp", ".3f"),
            ("capture+fit / stats step", "capture_fit", ".3f"),
            ("copy / refresh", "copy", ".3f"),
            ("est. × SGD at k=10", "est_k10", ".2f"),
        ],
    )
    if parts:
        print(tc, flush=True)
    cmd = "scripts/bench_optim.py " + " ".join(sys.argv[1:])
    report = (
        f"# tensorcurv.optim benchmark\n\nCommand: `{cmd}` (total {time.time() - t0:.0f} s, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch}; "
        f"(a) at batch {', '.join(map(str, args.batches))}).\n\n"
        f"## (a) time per step relative to SGD\n\n{ta}\n\n"
        f"## (b) time to target (seeds={args.seeds}, max {args.max_steps} steps, batch {args.batch} for every "
        f"method, same batches and seeds; sweeps: SGD-momentum (0.9) lr {args.sgd_lrs}, Adam lr {args.adam_lrs}, "
        f"NG/GN lr {args.so_lrs} × damping {args.so_dampings} with interval {args.interval}, momentum "
        f"{args.so_momentum}, KL clip {args.kl_clip}, decay 0.95 schedule {args.decay_schedule})\n\n{tb}\n"
    )
    if parts:
        report += (
            "\n## (c) where an NG kfac step's time goes (ms, min over repeats, fixed batch)\n\n"
            "est. = (plain step + (decomposition + capture+fit − fwd+bwd + copy)/10) / SGD step. "
            "Decomposition: eigh of both factors (tikhonov+eigh, 4 matmuls per solve) or the two "
            "Cholesky inverses (pi+cholesky, 2 matmuls per solve).\n\n" + tc + "\n"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
