"""Unlearning where retraining costs minutes: networks, presets and methods of ``scripts/bench_unlearn_scale.py``.

A *preset* fixes the data (``tensorcurv.experiments.data``, images resized with
:func:`~tensorcurv.unlearn.scenarios.upscale`), the model (``tensorcurv.experiments.models``: ``cnn`` =
two 3x3 conv layers with max-pooling + two linear layers, all covered by K-FAC; ``mlp``), the objective
``L(D; θ) = Σ_i CE_i + (μ/2)‖θ‖²`` and the training recipe (``epochs`` of minibatch Adam, then at most
``lbfgs_iter`` full-batch L-BFGS iterations, :func:`~tensorcurv.unlearn.training.train_adam_lbfgs`).
``θ*`` is trained on the poisoned ``D`` and the reference ``θ_r`` retrained on ``D̃`` from the same
``θ_0`` by the same recipe; both are timed, so ``retrain_time`` is the cost every method is compared with.

:func:`scale_methods` lists the methods (one :class:`~tensorcurv.unlearn.evaluate.MethodSpec` each);
:func:`run_scale` runs one (preset, scenario, seed) and returns one row per method with the metrics of
:mod:`.evaluate`, the membership-inference numbers of :mod:`.privacy` on the affected points and
``restored`` (share of the poisoning-lost test accuracy restored).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from tensorcurv.unlearn import scenarios
from tensorcurv.unlearn.evaluate import MethodSpec, Reference, evaluate_methods
from tensorcurv.unlearn.objective import Objective
from tensorcurv.unlearn.peers_kronfluence import kronfluence_update
from tensorcurv.unlearn.privacy import membership_metrics, restored_share
from tensorcurv.unlearn.training import TrainResult, cached_training, train_adam_lbfgs, training_key
from tensorcurv.unlearn.updates import AffectedSet


@dataclass(frozen=True)
class Preset:
    """Data, model and training recipe of one scale problem."""

    dataset: str
    size: int | None  # images resized to size x size (None: as loaded)
    flatten: bool  # rows as vectors (MLP)
    model: str  # tensorcurv.experiments.models name
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    mu: float = 50.0
    epochs: int = 30
    lbfgs_iter: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    gtol: float = 1e-6  # L-BFGS stops at ‖∇L‖ ≤ gtol · ‖∇L‖ after Adam
    trigger_patch: int = 3  # backdoor trigger side in pixels (after resizing)


# tanh (smooth) networks: L-BFGS reaches ‖∇L‖ of about 1 (relu CNN: stalls near 20-40); the tolerances stop where
# float32 L-BFGS stops making progress, after >= 60 s of single-thread CPU time on digits 16x16.
PRESETS: dict[str, Preset] = {
    "cnn": Preset(
        "digits",
        16,
        False,
        "cnn",
        {"channels": [16, 32], "hidden": 256, "activation": "tanh"},
        epochs=10,
        lbfgs_iter=400,
        gtol=1e-2,
    ),
    "mlp": Preset(
        "digits",
        16,
        True,
        "mlp",
        {"hidden_sizes": [1024, 512, 256], "activation": "tanh"},
        epochs=40,
        lbfgs_iter=500,
        gtol=2e-3,
    ),
    "cifar10_cnn": Preset("cifar10", None, False, "cnn", {"channels": [64, 128], "hidden": 200}, epochs=20),
}
QUICK = {"epochs": 1, "lbfgs_iter": 3}


def preset(name: str, quick: bool = False) -> Preset:
    """The preset ``name`` (``ValueError`` naming the valid ones); ``quick``: a seconds-long training recipe."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    p = PRESETS[name]
    return (
        replace(p, size=8 if p.size is not None else None, epochs=QUICK["epochs"], lbfgs_iter=QUICK["lbfgs_iter"])
        if quick
        else p
    )


def scale_methods(quick: bool = False) -> list[MethodSpec]:
    """Every method of the scale benchmark: first/second order, CG, LiSSA (auto-scaled), cached structures with
    and without refinement, the iterative K-FAC variant, two_level, and fine-tuning for 1 and 10 epochs."""
    cg_iter, depth, refine = (3, 5, 2) if quick else (40, 100, 10)
    # k PCG steps on the exact GGN of D̃ (linearized at θ* once), accepted; k = 1: K-FAC with the exact line search
    refine_kw = {"refine": refine, "refine_tol": 1e-3, "refine_strict": False, "refine_operator": "linearized"}
    ms = [
        MethodSpec("first_order", order=1, tau="cauchy"),
        MethodSpec("cg", solver="cg", solver_kwargs={"curvature": "ggn", "tol": 0.1, "max_iter": cg_iter}),
        MethodSpec("lissa", solver="lissa", solver_kwargs={"curvature": "ggn", "depth": depth, "batch_size": 128}),
        MethodSpec("kfac (cached)", solver="kfac", cached=True, solver_kwargs={"refine": 0}),
        *[
            MethodSpec(f"kfac+refine{k} (cached)", solver="kfac", cached=True, solver_kwargs={**refine_kw, "refine": k})
            for k in sorted({1, 3, 5, refine})
        ],
        MethodSpec("ekfac (cached)", solver="ekfac", cached=True, solver_kwargs={"refine": 0}),
        MethodSpec(f"ekfac+refine{refine} (cached)", solver="ekfac", cached=True, solver_kwargs=refine_kw),
        MethodSpec("kron_sum r2 (cached)", solver="kron_sum", cached=True, solver_kwargs={"refine": 0, "rank": 2}),
        MethodSpec("kron_sum r4 (cached)", solver="kron_sum", cached=True, solver_kwargs={"refine": 0, "rank": 4}),
        MethodSpec("two_level", solver="two_level"),
        MethodSpec("kfac x3", solver="kfac", steps=3),
        MethodSpec("finetune 1 ep", order=0, solver_kwargs={"epochs": 1}),
        MethodSpec("finetune 10 ep", order=0, solver_kwargs={"epochs": 2 if quick else 10}),
        # kronfluence's own damping heuristic (0.1·mean eigenvalue), and the objective's μ/N (the same
        # damped matrix as tensorcurv's ekfac): the heuristic ignores μ, so both are shown
        MethodSpec("kronfluence ekfac", runner=kronfluence_update, solver_kwargs={"damping": "heuristic"}),
        MethodSpec("kronfluence ekfac (μ/N)", runner=kronfluence_update, solver_kwargs={"damping": "objective"}),
    ]
    return ms


def select_methods(names: list[str] | None, quick: bool = False) -> list[MethodSpec]:
    """The methods named (all if None); ``ValueError`` naming the unknown ones and the valid ones."""
    ms = scale_methods(quick)
    if not names:
        return ms
    valid = [m.name for m in ms]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid: {valid}")
    return [m for m in ms if m.name in set(names)]


def build_model(p: Preset, input_shape, num_classes: int, seed: int) -> nn.Module:
    """The preset's model, initialized from ``seed`` without touching the caller's global generator."""
    from tensorcurv.experiments import models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build(p.model, tuple(input_shape), num_classes, **p.model_kwargs)


def scenario_to(sc: scenarios.Scenario, device: torch.device | str) -> scenarios.Scenario:
    """The scenario's tensors on ``device`` (affected indices stay on the CPU: they index any device)."""
    aff = sc.affected
    moved = AffectedSet(
        aff.indices,
        None if aff.X_new is None else aff.X_new.to(device),
        None if aff.y_new is None else aff.y_new.to(device),
    )
    return replace(
        sc,
        X=sc.X.to(device),
        y=sc.y.to(device),
        affected=moved,
        X_test=sc.X_test.to(device),
        y_test=sc.y_test.to(device),
        extra={k: (a.to(device), b.to(device)) for k, (a, b) in sc.extra.items()},
        heldout=None if sc.heldout is None else (sc.heldout[0].to(device), sc.heldout[1].to(device)),
    )


def load_problem(p: Preset, scenario: str, seed: int, device: str, fraction: float) -> scenarios.Scenario:
    kwargs: dict[str, Any] = {"fraction": fraction}
    if scenario == "backdoor":
        kwargs["patch"] = p.trigger_patch
    sc = scenarios.load_image_scenario(scenario, p.dataset, size=p.size, flatten=p.flatten, seed=seed, **kwargs)
    return scenario_to(sc, device)


def train_pair(
    p: Preset, obj: Objective, sc: scenarios.Scenario, seed: int, log=print, cache_dir: str | None = None
) -> tuple[Reference, TrainResult, TrainResult]:
    """``θ*`` on ``D`` and ``θ_r`` on ``D̃`` from the same ``θ_0`` by the preset's recipe (timed); with
    ``cache_dir`` each training runs once per (data, ``θ_0``, recipe) and is then loaded with its times."""
    theta0 = obj.theta()
    kw = dict(epochs=p.epochs, lbfgs_iter=p.lbfgs_iter, batch_size=p.batch_size, lr=p.lr, gtol=p.gtol, seed=seed)
    key_kw = {**kw, "mu": p.mu, "model": p.model, "model_kwargs": p.model_kwargs}

    def train(X: Tensor, y: Tensor) -> TrainResult:
        key = training_key(X, y, theta0, **key_kw)
        return cached_training(cache_dir, key, lambda: train_adam_lbfgs(obj, X, y, theta0, **kw))  # type: ignore[arg-type]

    tr = train(sc.X, sc.y)
    log(
        f"  trained θ* in {tr.time:.1f} s, CPU {tr.cpu_time:.1f} s "
        f"({tr.iterations} L-BFGS it., ‖∇L‖ = {tr.grad_norm:.3g})"
    )
    rt = train(*sc.affected.apply(sc.X, sc.y))
    log(f"  retrained θ_r in {rt.time:.1f} s, CPU {rt.cpu_time:.1f} s ({rt.iterations} it., ‖∇L‖ = {rt.grad_norm:.3g})")
    ref = Reference(theta0.clone(), tr.theta, rt.theta, tr.time, rt.time, rt.grad_norm, tr.grad_norm, rt.cpu_time)
    return ref, tr, rt


def run_scale(
    preset_name: str,
    scenario: str,
    seed: int,
    methods: list[MethodSpec],
    *,
    device: str = "cpu",
    fraction: float = 0.05,
    quick: bool = False,
    log=print,
    model_cache: str | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """One row per method (plus ``original`` and ``retrain``) for (preset, scenario, seed), and a description;
    ``model_cache``: a directory where trained models are kept (:func:`train_pair`)."""
    p = preset(preset_name, quick)
    sc = load_problem(p, scenario, seed, device, fraction)
    model = build_model(p, tuple(sc.X.shape[1:]), sc.num_classes, seed).to(device=device, dtype=sc.X.dtype)
    obj = Objective(model, "cross_entropy", p.mu)
    ref, tr, rt = train_pair(p, obj, sc, seed, log, model_cache)
    obj.load(ref.theta_star)
    members = sc.affected.original(sc.X, sc.y)

    def mia(theta: Tensor) -> dict[str, float]:
        return membership_metrics(obj, theta, members, sc.heldout) if sc.heldout is not None else {}

    rows, _ = evaluate_methods(
        model, sc.X, sc.y, sc.affected, sc.X_test, sc.y_test, methods,
        mu=p.mu, extra=sc.extra, reference=ref, extra_metrics=mia,
    )  # fmt: skip
    acc_pois, acc_retr = rows[0]["test_acc"], rows[1]["test_acc"]
    info = {
        "preset": preset_name,
        "scenario": scenario,
        "seed": seed,
        "load1": os.getloadavg()[0],
        "train_grad_norm": tr.grad_norm,
        "retrain_grad_norm": rt.grad_norm,
        "train_iterations": tr.iterations,
        "retrain_iterations": rt.iterations,
        "retrain_time_wall": rt.time,
        "retrain_time_cpu": rt.cpu_time,
    }
    for r in rows:
        r["restored"] = restored_share(r["test_acc"], acc_pois, acc_retr)
        r.update(info)
    n_params = sum(t.numel() for t in model.parameters())
    desc = (
        f"{sc.description}; {len(sc.y)} training / {len(sc.y_test)} test points of {p.dataset}"
        f"{f' resized to {p.size}x{p.size}' if p.size else ''}; model {p.model} {p.model_kwargs} "
        f"({n_params} parameters), μ = {p.mu}; training: {p.epochs} Adam epochs + ≤ {p.lbfgs_iter} L-BFGS "
        f"iterations, gtol {p.gtol:g} (seed {seed}: θ* {tr.time:.1f} s wall / {tr.cpu_time:.1f} s CPU, "
        f"{tr.iterations} L-BFGS it., ‖∇L‖ = {tr.grad_norm:.3g}; retraining {rt.time:.1f} s wall / "
        f"{rt.cpu_time:.1f} s CPU, {rt.iterations} it., ‖∇L‖ = {rt.grad_norm:.3g})"
    )
    return rows, desc
