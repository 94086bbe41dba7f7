"""A study over training: train a model with Adam and evaluate every structure variant at checkpoints,
for every curvature kind (:func:`tensorcurv.study.evaluate.evaluate`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tensorcurv.core.capture import CurvatureKind, check_kind
from tensorcurv.core.exact import ExactBlock
from tensorcurv.core.losses import as_loss_spec
from tensorcurv.curvature import Curvature
from tensorcurv.study.evaluate import evaluate
from tensorcurv.study.variants import make_variants

#: The keys of the ``study`` config passed through to :func:`~tensorcurv.study.evaluate.evaluate`.
EVALUATE_KEYS = (
    "damping_rel",
    "direction_damping_rel",
    "refine_steps",
    "floor_ranks",
    "spectral",
    "spectral_max_iter",
    "spectral_tol",
    "spectrum_layer",
    "spectrum_k",
    "chunk",
    "solve_repeats",
)


def checkpoint_steps(total: int, fractions: Sequence[float]) -> list[int]:
    """Training steps at which the metrics are taken, e.g. ``(0, 0.1, 0.5, 1)`` of ``total``."""
    return sorted({int(round(float(f) * total)) for f in fractions})


def _build_model_and_data(cfg: Mapping[str, Any], dtype: torch.dtype):
    from tensorcurv.experiments import data as tc_data
    from tensorcurv.experiments import models as tc_models

    dcfg = dict(cfg.get("data") or {})
    splits = tc_data.load(dcfg.pop("name", "digits"), dtype=dtype, seed=int(cfg.get("seed", 0)), **dcfg)
    mcfg = dict(cfg.get("model") or {})
    with torch.random.fork_rng(devices=[]):  # seeded init (torch.nn draws from the global generator), restored after
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = tc_models.build(mcfg.pop("name", "mlp"), splits.input_shape, splits.num_classes, **mcfg).to(dtype)
    return splits, model


def _val_accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


def _evaluate_checkpoint(
    model,
    Xs,
    ys,
    loss,
    kinds: Sequence[str],
    variants,
    step: int,
    last: bool,
    cfg: Mapping[str, Any],
    scfg: Mapping[str, Any],
    log,
) -> dict[str, list[dict[str, Any]]]:
    """Every table of :func:`evaluate` at one checkpoint, for every kind; rows carry ``step`` and ``kind``.
    The gradients compared are the empirical ones of the study batch. Refinement steps ``k > 0`` and the
    spectra are computed at the ``last`` checkpoint only."""
    grads_curv = Curvature(model, "diagonal", "empirical")
    grads = {k: ExactBlock(st).gradient_sum() for k, st in grads_curv.capture(Xs, ys, loss).stats.items()}
    ev_kw = {k: scfg[k] for k in EVALUATE_KEYS if k in scfg and scfg[k] is not None}
    if not last:  # refinement (the direction-vs-time front) at the final checkpoint only: k = 0 before
        ev_kw["refine_steps"] = [0]
    out: dict[str, list[dict[str, Any]]] = {"metrics": [], "floor": [], "spectra": [], "directions": []}
    for kd in kinds:
        log(f" kind {kd}")
        curv = Curvature(
            model, "diagonal", kd, mc_samples=int(scfg.get("mc_samples", 1)), seed=int(cfg.get("seed", 0)) + step
        )
        stats = curv.capture(Xs, ys, loss).stats
        res = evaluate(stats, grads, variants, log=log, spectrum=last, **ev_kw)
        for table, rows in res.items():
            out[table] += [{"step": step, "kind": kd, **r} for r in rows]
    return out


def run_study(cfg: Mapping[str, Any], log: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    """Train a model (Adam on the mean cross-entropy) and evaluate :func:`evaluate` at checkpoints,
    for every curvature kind. ``cfg``: ``seed, dtype, data{name,..}, model{name,..}, loss,
    train{steps, batch_size, lr}, study{kinds, mc_samples, batch_size, checkpoints, structures,
    hparams, sweeps, variants, damping_rel, direction_damping_rel, refine_steps, floor_ranks, spectral,
    spectral_max_iter, spectral_tol, spectrum_layer, spectrum_k, chunk, solve_repeats}``. Returns the raw
    tables (``metrics``, ``floor``, ``spectra``, ``directions``, ``training``); every row carries ``step``
    and ``kind``."""
    dtype = getattr(torch, str(cfg.get("dtype", "float64")))
    scfg, tcfg = dict(cfg.get("study") or {}), dict(cfg.get("train") or {})
    splits, model = _build_model_and_data(cfg, dtype)
    loss = as_loss_spec(str(cfg.get("loss", "cross_entropy")))
    variants = make_variants(
        scfg.get("structures", "all"), scfg.get("hparams"), scfg.get("sweeps"), scfg.get("variants")
    )
    kinds = list(scfg.get("kinds", CurvatureKind.values()))
    for kd in kinds:
        check_kind(kd, int(scfg.get("mc_samples", 1)))
    Xtr, ytr = splits.train
    nb = min(int(scfg.get("batch_size", 128)), Xtr.shape[0])
    steps = int(tcfg.get("steps", 200))
    checkpoints = checkpoint_steps(steps, scfg.get("checkpoints", (0, 0.1, 0.5, 1.0)))
    opt = torch.optim.Adam(model.parameters(), lr=float(tcfg.get("lr", 1e-3)))
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    bs = int(tcfg.get("batch_size", 64))
    out: dict[str, list[dict[str, Any]]] = {
        "metrics": [],
        "floor": [],
        "spectra": [],
        "directions": [],
        "training": [],
    }
    log(
        f"study: {len(variants)} variants x {len(kinds)} kinds at steps {checkpoints}; "
        f"structures {sorted({v.structure for v in variants})}"
    )
    train_loss = float("nan")
    for step in range(steps + 1):
        if step in checkpoints:
            model.eval()
            acc = _val_accuracy(model, *splits.val) if splits.val[0].shape[0] else float("nan")
            out["training"].append({"step": step, "train_loss": train_loss, "val_accuracy": acc})
            log(f"step {step}: train loss {train_loss:.4f}, val accuracy {acc:.3f}")
            res = _evaluate_checkpoint(
                model, Xtr[:nb], ytr[:nb], loss, kinds, variants, step, step == checkpoints[-1], cfg, scfg, log
            )
            for table, rows in res.items():
                out[table] += rows
            model.train()
        if step == steps:
            break
        idx = torch.randint(0, Xtr.shape[0], (bs,), generator=gen)
        opt.zero_grad()
        value = loss(model(Xtr[idx]), ytr[idx])
        value.backward()
        opt.step()
        train_loss = float(value.detach())
    return out
