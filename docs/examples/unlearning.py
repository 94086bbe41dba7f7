"""Tutorial: unlearn flipped labels with a K-FAC-preconditioned second-order update.

Logistic regression on digits, trained on data where 5 % of the labels were flipped. The owner then
corrects those labels. Three models are compared: the original ``θ*``, the unlearned one
``θ = θ* − (H + μI)⁻¹ Δg`` (``H`` approximated by K-FAC and refined by a few CG steps on the exact GGN),
and the retrained one ``θ_r`` (L-BFGS from the same initialization on the corrected data).

Run: ``python docs/examples/unlearning.py`` (``--tiny`` for the quick version the tests run). The benchmark
with every method and scenario is ``scripts/bench_unlearn.py``.
"""

from __future__ import annotations

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

from tensorcurv.unlearn import AffectedSet, Objective, build_solver, second_order_update, train_lbfgs


def main(tiny: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    n = 300 if tiny else len(X)
    X = torch.tensor(X[:n] / 16.0, dtype=torch.float64)
    y_true = torch.tensor(y[:n])
    mu = 20.0  # L(D; θ) = Σ_i ℓ_i + (μ/2)‖θ‖²

    # the training labels with 5 % flipped to another class
    flipped = torch.randperm(n)[: n // 20]
    y_noisy = y_true.clone()
    y_noisy[flipped] = (y_noisy[flipped] + 1 + torch.randint(0, 9, (len(flipped),))) % 10

    model = nn.Linear(64, 10).double()
    obj = Objective(model, "cross_entropy", mu)
    theta0 = obj.theta().detach().clone()
    theta_star = train_lbfgs(obj, X, y_noisy, theta0).theta  # trained on the noisy labels
    theta_retrained = train_lbfgs(obj, X, y_true, theta0).theta  # the reference: retrained on corrected data
    obj.load(theta_star)

    request = AffectedSet.relabel(flipped, y_true[flipped])
    result = second_order_update(model, X, y_noisy, request, build_solver("kfac", refine=50, refine_tol=1e-2), mu=mu)
    assert result.ok, result.status

    def distance(theta):  # ‖θ − θ_r‖ / ‖θ* − θ_r‖: 1 = not unlearned at all, 0 = retrained exactly
        return float((theta - theta_retrained).norm() / (theta_star - theta_retrained).norm())

    out = {"original": distance(theta_star), "unlearned": distance(result.theta)}
    print(
        f"relative distance to retraining: original {out['original']:.3f}, "
        f"K-FAC + refine {out['unlearned']:.3f} ({result.time * 1e3:.1f} ms)"
    )
    return out


if __name__ == "__main__":
    main(tiny="--tiny" in sys.argv)
