"""Unlearning updates: influence formula, first order, exactness on quadratics, failure safety, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian

from tensorcurv.unlearn import (
    AffectedSet,
    CGSolver,
    ExactSolver,
    StructureSolver,
    first_order_update,
    gradient_difference,
    second_order_update,
)
from unlearn_problems import data, logreg, mlp, trained

MU = 0.5


def _logreg_loss(theta, X, y, mu):
    """Independent regularized sum loss of a 4->3 linear model, θ = [vec_rowmajor(W), b]."""
    W, b = theta[:12].reshape(3, 4), theta[12:]
    return F.cross_entropy(X @ W.T + b, y, reduction="sum") + 0.5 * mu * theta.dot(theta)


def test_exact_removal_update_equals_influence_formula():
    X, y = data()
    model = logreg()
    obj = trained(model, X, y, MU)
    theta_star = obj.theta()
    i = 7
    keep = torch.arange(len(X)) != i
    H = hessian(lambda t: _logreg_loss(t, X[keep], y[keep], MU), theta_star)
    g_i = torch.autograd.functional.jacobian(lambda t: _logreg_loss(t, X[i : i + 1], y[i : i + 1], 0.0), theta_star)
    expected = theta_star + torch.linalg.solve(H, g_i)
    res = second_order_update(model, X, y, AffectedSet.removal([i]), ExactSolver("hessian"), mu=MU, inplace=False)
    assert res.ok
    torch.testing.assert_close(res.theta, expected, rtol=1e-10, atol=1e-12)


def test_gradient_difference_is_sum_of_corrected_minus_sum_of_original_point_gradients():
    X, y = data()
    obj = trained(logreg(), X, y, MU)
    th = obj.theta()
    idx = torch.tensor([1, 4, 9])
    y_new = (y[idx] + 1) % 3
    grad = lambda Xs, ys: torch.autograd.functional.jacobian(lambda t: _logreg_loss(t, Xs, ys, 0.0), th)
    expected = grad(X[idx], y_new) - grad(X[idx], y[idx])
    got = gradient_difference(obj, th, X, y, AffectedSet.relabel(idx, y_new))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    removal = gradient_difference(obj, th, X, y, AffectedSet.removal(idx))
    torch.testing.assert_close(removal, -grad(X[idx], y[idx]), rtol=1e-12, atol=1e-12)


def test_gradient_difference_plus_full_gradient_is_gradient_of_corrected_objective():
    X, y = data()
    obj = trained(logreg(), X, y, MU)
    th = obj.theta()
    aff = AffectedSet.relabel([2, 3], (y[[2, 3]] + 1) % 3)
    Xr, yr = aff.apply(X, y)
    dg = gradient_difference(obj, th, X, y, aff)
    torch.testing.assert_close(dg + obj.grad(th, X, y), obj.grad(th, Xr, yr), rtol=1e-12, atol=1e-12)


def test_first_order_update_equals_theta_star_minus_tau_grad_difference():
    X, y = data()
    model = logreg()
    obj = trained(model, X, y, MU)
    th = obj.theta()
    aff = AffectedSet.removal([0, 5])
    dg = gradient_difference(obj, th, X, y, aff)
    res = first_order_update(model, X, y, aff, mu=MU, tau=0.03, inplace=False)
    torch.testing.assert_close(res.theta, th - 0.03 * dg, rtol=0, atol=1e-14)


def test_first_order_cauchy_step_minimizes_quadratic_model_along_grad_difference():
    X, y = data()
    model = logreg()
    obj = trained(model, X, y, MU)
    aff = AffectedSet.removal([0, 5])
    Xr, yr = aff.apply(X, y)
    dg = gradient_difference(obj, obj.theta(), X, y, aff)
    H = obj.hessian(obj.theta(), Xr, yr)
    res = first_order_update(model, X, y, aff, mu=MU, inplace=False)
    assert res.tau == pytest.approx(float(dg @ dg / (dg @ H @ dg)), rel=1e-10)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind", ["removal", "relabel"])
def test_second_order_update_is_exact_retraining_for_ridge_regression(kind, steps):
    """L is quadratic for a linear model with MSE, so Newton steps land on the retrained optimum."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(20, 2, generator=g, dtype=torch.float64)
    model = logreg(4, 2)
    trained(model, X, Y, MU, loss="mse")
    idx = torch.tensor([3, 8, 11, 15])
    if kind == "removal":
        aff = AffectedSet.removal(idx)
    else:
        aff = AffectedSet(idx, X_new=torch.zeros(4, 4, dtype=torch.float64))
    Xr, Yr = aff.apply(X, Y)
    Xa = torch.cat([Xr, torch.ones(len(Xr), 1, dtype=torch.float64)], 1)
    # per-sample MSE ℓ = (1/C) Σ_c (z − y)² (losses.py, C = 2), summed: Xaᵀ(Xa Wᵀ − Y) + μ Wᵀ = 0
    Wt = torch.linalg.solve(Xa.T @ Xa + MU * torch.eye(5, dtype=torch.float64), Xa.T @ Yr)
    expected = torch.cat([Wt[:4].T.reshape(-1), Wt[4]])
    res = second_order_update(model, X, Y, aff, ExactSolver("hessian"), loss="mse", mu=MU, steps=steps, inplace=False)
    torch.testing.assert_close(res.theta, expected, rtol=1e-9, atol=1e-10)


def test_successful_update_is_written_into_the_model():
    X, y = data()
    model = logreg()
    trained(model, X, y, MU)
    res = second_order_update(model, X, y, AffectedSet.removal([1]), ExactSolver("ggn"), mu=MU)
    assert res.ok and res.applied
    torch.testing.assert_close(torch.cat([model.weight.reshape(-1), model.bias]).detach(), res.theta)


def test_model_unchanged_when_cg_does_not_converge():
    X, y = data()
    model = mlp()
    trained(model, X, y, MU)
    before = [p.detach().clone() for p in model.parameters()]
    res = second_order_update(model, X, y, AffectedSet.removal([1, 2]), CGSolver("ggn", tol=1e-14, max_iter=1), mu=MU)
    assert not res.ok and not res.applied and "not converged" in res.status
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_affected_indices_out_of_range_raise():
    X, y = data()
    model = logreg()
    with pytest.raises(ValueError, match="out of range"):
        first_order_update(model, X, y, AffectedSet.removal([3, 30]), mu=MU)


def test_corrected_labels_of_wrong_size_raise():
    with pytest.raises(ValueError, match="same size"):
        AffectedSet.relabel([1, 2, 3], torch.tensor([0, 1]))


def test_duplicate_indices_raise():
    with pytest.raises(ValueError, match="duplicates"):
        AffectedSet.removal([1, 1])


def test_structure_solver_used_before_fitting_raises():
    with pytest.raises(RuntimeError, match="prepare"):
        StructureSolver("kfac").solve(torch.zeros(15, dtype=torch.float64))


def test_too_many_steps_raise():
    X, y = data()
    with pytest.raises(ValueError, match="steps"):
        second_order_update(logreg(), X, y, AffectedSet.removal([1, 2]), ExactSolver(), mu=MU, steps=3)
