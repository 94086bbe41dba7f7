"""Cosine of a Gauss-Newton step's direction to the exact damped solve, against Krylov refinement steps k.

    PYTHONPATH=. python scripts/refine_cosine.py [--net mlp] [--structure kfac] [--ks 0 2 5 10] [--damping-ratio 1e-3]

Trained digits reference network (tensorcurv.experiments.reference_layers), batch 256, GGN,
λ = ratio·tr(C)/D (default 1e-3). The exact direction is ``(C + λI)⁻¹ g`` of the whole model (cross-layer GGN,
Woodbury on the per-sample factors). The direction of one step is ``θ₀ − θ₁`` (lr 1, no momentum,
no KL clip); ``(checked)`` is ``‖g − (C + λI)d‖/‖g‖`` recomputed here; the time per step is the minimum and
the median of ``--repeats`` further steps on the same batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tensorcurv.core.exact import ExactModel, ParamLayout
from tensorcurv.curvature import Curvature
from tensorcurv.experiments.reference_layers import reference_batch, reference_model
from tensorcurv.optim import GaussNewton


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="mlp")
    ap.add_argument("--structure", default="kfac")
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 2, 5, 10])
    ap.add_argument("--coupling", default="full")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--damping-ratio", type=float, default=1e-3, help="λ = ratio · tr(C)/D")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    x, t, loss_fn = reference_batch(args.net, dtype=dtype)
    model = reference_model(args.net, dtype=dtype)
    curv = Curvature(model, "kfac", "ggn")
    res = curv.capture(x, t, loss_fn, accumulate_grad=True)
    op = ExactModel.from_stats(res.stats, "full")
    layout = ParamLayout(curv.named_params, curv.adapters)
    lam = args.damping_ratio * op.trace() / op.dim
    g = torch.cat([p.grad.reshape(-1) for p in curv.params])
    exact = layout.to_flat(op.solve(layout.to_mats(g), lam)[0])
    print(f"{args.net}, {args.structure}, D = {op.dim}, λ = {lam:.3g}, coupling of the refinement: {args.coupling}")
    print(
        f"{'k':>3} {'cos(d, exact)':>14} {'residual':>10} {'(checked)':>10} {'cos(d, d0)':>11} "
        f"{'ms/step min':>11} {'median':>7}"
    )
    for k in args.ks:
        m = reference_model(args.net, dtype=dtype)
        opt = GaussNewton(
            m,
            loss_fn,
            structure=args.structure,
            lr=1.0,
            damping=lam,
            decay=None,
            refine=k,
            refine_tol=1e-12,
            refine_coupling=args.coupling,
        )
        before = flat(m)
        opt.step(x, t)
        d = before - flat(m)
        info = dict(opt.info)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            opt.step(x, t)
            times.append(time.perf_counter() - t0)
        cos = float(d @ exact / (d.norm() * exact.norm()))
        checked = float((g - layout.to_flat(op.mv(layout.to_mats(d))) - lam * d).norm() / g.norm())
        print(
            f"{k:>3} {cos:>14.4f} {info.get('refine_residual', float('nan')):>10.3g} {checked:>10.3g} "
            f"{info.get('refine_cosine', 1.0):>11.4f} {1e3 * min(times):>11.1f} "
            f"{1e3 * statistics.median(times):>7.1f}"
        )


if __name__ == "__main__":
    main()
