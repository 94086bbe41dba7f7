"""The digits unlearning benchmark shared by ``scripts/bench_unlearn.py`` and ``scripts/unlearn.py``.

Model: ``tensorcurv.experiments.models.build("mlp", hidden_sizes=...)`` — with no hidden layer this is
multinomial logistic regression (convex, so retraining has a unique answer); float64; objective
``Σ_i CE_i + (μ/2)‖θ‖²``. Methods (``default_methods``): first order (Cauchy step), second order with
the exact GGN, CG, LiSSA, K-FAC-preconditioned CG, every registered tensorcurv structure, and
structure-preconditioned refinement on the exact GGN from the statistics (``+refine``, relative residual
1e-2), fresh or served from a :class:`~tensorcurv.unlearn.cache.CurvatureCache` (``(cached)``: the
per-request time is ``time``, the one-off capture at ``θ*`` is ``time_oneoff``); ``dense (cached)`` is
the exact block factorized once — the reference for what a cached *exact* solve costs per request.
"""

from __future__ import annotations

from typing import Any

import torch

from tensorcurv.unlearn.evaluate import MethodSpec, evaluate_methods
from tensorcurv.unlearn.scenarios import load_digits_scenario


def default_methods(quick: bool = False, lissa_depth: int | None = None) -> list[MethodSpec]:
    from tensorcurv import structures

    depth = lissa_depth or (100 if quick else 300)
    ms = [
        MethodSpec("first_order", order=1, tau="cauchy"),
        MethodSpec("exact", solver="exact", solver_kwargs={"curvature": "ggn"}),
        MethodSpec("cg", solver="cg", solver_kwargs={"curvature": "ggn", "tol": 1e-6, "max_iter": 500}),
        MethodSpec("lissa", solver="lissa", solver_kwargs={"curvature": "ggn", "depth": depth, "batch_size": 128}),
        MethodSpec(
            "pcg:kfac",
            solver="cg",
            solver_kwargs={"curvature": "ggn", "tol": 1e-6, "max_iter": 500, "preconditioner": {"structure": "kfac"}},
        ),
    ]
    per_structure = {"kfac": {}, "ekfac": {}, "kron_sum": {"rank": 2}, "tt": {}, "two_level": {}, "dense": {}}
    for name, hp in per_structure.items():
        if name in structures.names():
            ms.append(MethodSpec(name, solver=name, solver_kwargs=hp))
    ms.append(MethodSpec("kfac x3", solver="kfac", steps=3))
    refine = {"refine": 100, "refine_tol": 1e-2}
    ms += [
        MethodSpec("kfac+refine", solver="kfac", solver_kwargs=refine),
        MethodSpec("kfac (cached)", solver="kfac", cached=True, solver_kwargs={"refine": 0}),
        MethodSpec("kfac+refine (cached)", solver="kfac", cached=True, solver_kwargs=refine),
        MethodSpec("ekfac+refine (cached)", solver="ekfac", cached=True, solver_kwargs=refine),
        MethodSpec("dense (cached)", solver="dense", cached=True, solver_kwargs={"refine": 0}),
    ]
    return ms


def build_model(input_shape, num_classes: int, hidden: list[int] | tuple[int, ...] = (), seed: int = 0):
    from tensorcurv.experiments import models as models

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global generator
        torch.manual_seed(seed)
        return models.build("mlp", input_shape, num_classes, hidden_sizes=list(hidden), activation="tanh").double()


def run(
    scenario: str,
    seeds: list[int],
    *,
    mu: float = 20.0,
    hidden=(),
    methods: list[MethodSpec] | None = None,
    quick: bool = False,
    scenario_kwargs: dict[str, Any] | None = None,
    log=print,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows for every (seed, method) of one scenario, plus the scenario description."""
    methods = methods if methods is not None else default_methods(quick)
    rows: list[dict[str, Any]] = []
    desc = ""
    for seed in seeds:
        sc = load_digits_scenario(scenario, seed=seed, **(scenario_kwargs or {}))
        model = build_model(tuple(sc.X.shape[1:]), sc.num_classes, hidden, seed)
        res, ref = evaluate_methods(
            model, sc.X, sc.y, sc.affected, sc.X_test, sc.y_test, methods, mu=mu, extra=sc.extra
        )
        desc = (
            f"{sc.description}; {len(sc.y)} training / {len(sc.y_test)} test digits; model: "
            f"{'logistic regression' if not hidden else f'MLP {list(hidden)} tanh'} "
            f"({sum(p.numel() for p in model.parameters())} parameters), μ = {mu}; "
            f"θ* and retraining: full-batch L-BFGS from the same init "
            f"(train {ref.train_time:.2f} s, retrain {ref.retrain_time:.2f} s for seed {seed})."
        )
        for r in res:
            rows.append({"scenario": scenario, "seed": seed, **r})
            log(
                f"{scenario:10s} seed={seed} {r['method']:12s} {r['status'][:40]:40s} rel_dist={r['rel_dist']:.4f} "
                f"agree={r['agreement']:.3f} time={r['time']:.3f}s"
            )
    return rows, {scenario: desc}
