"""GaussNewton / NaturalGradient / Preconditioner facts, float64, against independent references."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import tensorcurv.optim as O
from optim_problems import cls_batch, losses_with_resume, mlp
from tensorcurv.optim.damping import LevenbergMarquardt

pytestmark = pytest.mark.usefixtures("float64_default")  # tensors default to float64 here

COURSE_X = torch.tensor([[1.0, 1.0], [0.0, -1.0], [2.0, 0.5]], dtype=torch.float64)
COURSE_Y = torch.tensor([-1.0, 3.0, 2.0], dtype=torch.float64)


def ridge(X, y, mu):
    Xt = torch.cat([X, torch.ones(X.shape[0], 1)], 1)  # bias column last, as [W, b]
    return torch.linalg.solve(Xt.T @ Xt + mu * torch.eye(Xt.shape[1]), Xt.T @ y)


def linear_from_zero(d):
    model = nn.Linear(d, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def random_ls(seed=0, N=12, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g), torch.randn(N, generator=g)


# ---------------------------------------------------------------- least squares = damped Newton
@pytest.mark.parametrize("structure", ["dense", "kfac", "ekfac", "kron_sum"])
@pytest.mark.parametrize("data", ["course", "random"])
def test_one_gauss_newton_step_from_zero_is_the_ridge_solution(structure, data):
    X, y = (COURSE_X, COURSE_Y) if data == "course" else random_ls()
    lam = 0.3
    model = linear_from_zero(X.shape[1])
    opt = O.GaussNewton(model, nn.MSELoss(), structure=structure, lr=1.0, damping=lam)
    opt.step(X, y[:, None])
    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    expected = ridge(X, y, mu=X.shape[0] * lam / 2)  # μ = Nλ/2 for mean-reduced MSE
    torch.testing.assert_close(theta, expected, rtol=1e-12, atol=1e-12)


def test_course_ridge_solution_differs_from_least_squares_so_the_damping_mapping_matters():
    lam = 0.3
    assert not torch.allclose(ridge(COURSE_X, COURSE_Y, 3 * lam / 2), ridge(COURSE_X, COURSE_Y, lam), atol=1e-3)


# ---------------------------------------------------------------- natural gradient vs torch.func
def blockwise_fisher_step(model, X, y, lam, lr):
    """θ − η (F_l + λI)^{-1} ∇_l L per Linear layer, F_l = (1/N) Σ_s vec(dθ_s) vec(dθ_s)ᵀ (empirical)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, x, t):
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    new = {}
    for layer in ("0", "2"):
        W, b = per[f"{layer}.weight"], per[f"{layer}.bias"]
        M = torch.cat([W, b[..., None]], -1)  # (N, m, n): [dW, db]
        V = M.transpose(1, 2).reshape(M.shape[0], -1)  # column-major vec
        F = V.T @ V / X.shape[0]
        g = V.mean(0)
        step = torch.linalg.solve(F + lam * torch.eye(F.shape[0]), g)
        m, n = M.shape[1:]
        S = step.reshape(n, m).T
        new[f"{layer}.weight"] = params[f"{layer}.weight"] - lr * S[:, :-1]
        new[f"{layer}.bias"] = params[f"{layer}.bias"] - lr * S[:, -1]
    return new


def test_dense_natural_gradient_step_equals_damped_fisher_solve_from_per_sample_grads():
    model = mlp()
    X, y = cls_batch()
    lam, lr = 1e-2, 0.7
    expected = blockwise_fisher_step(model, X, y, lam, lr)
    opt = O.NaturalGradient(model, nn.CrossEntropyLoss(), structure="dense", kind="empirical", lr=lr, damping=lam)
    opt.step(X, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12)


def test_preconditioner_with_adam_replaces_covered_grads_and_keeps_uncovered_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    X, y = cls_batch()
    pre = O.Preconditioner(model, nn.CrossEntropyLoss(), "kfac", "ggn", damping=1e-2)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    pre.backward(X, y)
    raw = [p.grad.clone() for p in pre.params]
    expected = pre.curvature.solve(raw, damping=1e-2)
    pre.precondition()
    for (n, p), g, e in zip(pre.named_params, raw, expected):
        if n.startswith("1."):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)  # LayerNorm: identity fallback
        else:
            torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
            assert not torch.allclose(p.grad, g)
    before = [p.detach().clone() for p in pre.params]
    adam.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, pre.params))


# ---------------------------------------------------------------- options
def test_kl_clip_scales_the_step_by_sqrt_kappa_over_lr2_gPg():
    X, y = cls_batch()
    lr, kappa = 0.5, 1e-4
    runs = {}
    for clip in (None, kappa):
        model = mlp()
        theta0 = [p.detach().clone() for p in model.parameters()]
        opt = O.GaussNewton(model, nn.CrossEntropyLoss(), structure="kfac", lr=lr, damping=1e-2, kl_clip=clip)
        opt.step(X, y)
        runs[clip] = ([p.detach() - t for p, t in zip(model.parameters(), theta0)], opt.info)
    nu = runs[kappa][1]["kl_scale"]
    # Σ gᵀPg = Σ (δ/(−η))ᵀ g with the unclipped δ = −η P g; recompute it independently of the optimizer
    model = mlp()
    loss = nn.functional.cross_entropy(model(X), y)
    g = torch.autograd.grad(loss, list(model.parameters()))
    gPg = sum(float((-d / lr * gi).sum()) for d, gi in zip(runs[None][0], g))
    assert nu == pytest.approx(min(1.0, math.sqrt(kappa / (lr * lr * gPg))), rel=1e-12)
    assert nu < 1
    for a, b in zip(runs[kappa][0], runs[None][0]):
        torch.testing.assert_close(a, nu * b, rtol=1e-10, atol=1e-14)


def test_decoupled_weight_decay_adds_minus_lr_wd_theta_to_the_step():
    X, y = cls_batch()
    lr, wd = 0.5, 0.1
    deltas = {}
    for w in (0.0, wd):
        model = mlp()
        theta0 = [p.detach().clone() for p in model.parameters()]
        O.GaussNewton(model, nn.CrossEntropyLoss(), lr=lr, damping=1e-2, weight_decay=w).step(X, y)
        deltas[w] = [p.detach() - t for p, t in zip(model.parameters(), theta0)]
    for a, b, t in zip(deltas[wd], deltas[0.0], mlp().parameters()):
        torch.testing.assert_close(a, b - lr * wd * t.detach(), rtol=1e-10, atol=1e-14)


def test_stats_interval_captures_statistics_only_every_k_steps():
    model = mlp()
    X, y = cls_batch()
    opt = O.GaussNewton(model, nn.CrossEntropyLoss(), lr=0.1, damping=1e-2, stats_interval=3)
    for _ in range(7):
        opt.step(X, y)
    assert opt.curvature.num_updates == 3  # steps 0, 3, 6


def test_inverse_interval_freezes_the_solver_between_refreshes():
    model = mlp()
    opt = O.GaussNewton(model, nn.CrossEntropyLoss(), lr=0.3, damping=1e-2, inverse_interval=3, decay=0.5)
    seen = []
    for t in range(4):
        opt.step(*cls_batch(seed=t))
        seen.append(opt.preconditioner.solver.blocks["0"].A.clone())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.allclose(seen[2], seen[3])
    torch.testing.assert_close(seen[3], opt.curvature.blocks["0"].A, rtol=0, atol=0)


# ---------------------------------------------------------------- Levenberg–Marquardt
def test_lm_rule_increases_damping_when_rho_is_small_and_decreases_when_large():
    lm = LevenbergMarquardt(1.0, factor=2.0, rho_low=0.25, rho_high=0.75)
    lm.observe(0.1)
    assert lm.damping == 2.0
    lm.observe(0.9)
    lm.observe(0.9)
    assert lm.damping == 0.5
    lm.observe(0.5)
    assert lm.damping == 0.5
    lm.observe(float("nan"))
    assert lm.damping == 1.0


def test_lm_reduction_ratio_is_one_on_least_squares_so_damping_decreases():
    X, y = random_ls()
    opt = O.GaussNewton(
        linear_from_zero(X.shape[1]), nn.MSELoss(), structure="dense", damping=0.3, damping_rule="lm", lm_factor=2.0
    )
    opt.step(X, y[:, None])
    assert opt.info["rho"] == pytest.approx(1.0, abs=1e-10)  # the GGN model is exact for a linear model
    assert opt.damping == pytest.approx(0.15)


def test_lm_damping_increases_when_the_step_overshoots():
    model = mlp()
    X, y = cls_batch()
    opt = O.GaussNewton(model, nn.CrossEntropyLoss(), lr=30.0, damping=1e-3, damping_rule="lm", lm_factor=2.0)
    opt.step(X, y)
    assert opt.info["rho"] < 0.25
    assert opt.damping == pytest.approx(2e-3)


# ---------------------------------------------------------------- robustness
def full_state(opt, model):
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_non_finite_batch_skips_the_step_and_leaves_all_state_untouched(where):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    X, y = cls_batch()
    Y = torch.randn(16, 2)
    opt = O.NaturalGradient(
        model,
        nn.MSELoss(),
        kind="mc",
        lr=0.3,
        damping=1e-2,
        momentum=0.9,
        seed=0,
        damping_rule="lm",
        inverse_interval=2,
    )
    opt.step(X, Y)
    before = full_state(opt, model)
    Xb, Yb = X.clone(), Y.clone()
    (Xb if where == "inputs" else Yb)[3, 1] = float("nan")
    lam = opt.damping
    with pytest.warns(O.NonFiniteStepWarning, match=r"0\.weight"):
        opt.step(Xb, Yb)
    assert opt.info["skipped"] and opt.preconditioner.skipped == 1
    assert opt.damping == pytest.approx(lam * 1.5)  # LM raises damping on a skipped step
    opt.preconditioner.damping.damping = lam  # the only intended change; everything else is bit-identical
    opt.preconditioner.skipped = 0
    assert full_state(opt, model) == before


def test_singular_factor_and_tiny_damping_never_produce_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        model[2].weight.zero_()  # first layer's G is zero, A singular (input column always zero)
    X, y = cls_batch()
    X[:, 2] = 0.0
    for kind in ("tikhonov", "pi"):
        m = copy.deepcopy(model)
        opt = O.GaussNewton(m, nn.CrossEntropyLoss(), structure="kfac", damping=1e-12, damping_kind=kind)
        for _ in range(3):
            opt.step(X, y)
        assert all(torch.isfinite(p).all() for p in m.parameters()), kind


# ---------------------------------------------------------------- state
@pytest.mark.parametrize(
    "name,kw",
    [
        (
            "natural_gradient",
            dict(
                kind="mc",
                structure="kfac",
                lr=0.2,
                damping=1e-2,
                momentum=0.5,
                damping_rule="lm",
                stats_interval=2,
                inverse_interval=2,
                seed=3,
            ),
        ),
        ("gauss_newton", dict(structure="ekfac", lr=0.5, damping=1e-2, decay=0.9, weight_decay=1e-3)),
    ],
)
def test_resume_from_state_dict_reproduces_an_uninterrupted_run(name, kw):
    batches = [cls_batch(seed=s) for s in range(6)]
    run = lambda split: losses_with_resume(name, kw, batches, split)  # noqa: E731
    assert run(3) == run(6)


# ---------------------------------------------------------------- configuration
def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ValueError, match="damping_rule"):
        O.build("gauss_newton", mlp(), nn.CrossEntropyLoss(), dampnig=1e-3)


def test_negative_damping_is_rejected_with_the_key_name():
    with pytest.raises(ValueError, match="damping must be"):
        O.build("natural_gradient", mlp(), nn.CrossEntropyLoss(), damping=-1.0)


def test_invalid_structure_hparam_is_rejected_by_the_structure():
    with pytest.raises(ValueError, match="chunk"):
        O.build("gauss_newton", mlp(), nn.CrossEntropyLoss(), structure="ekfac", chunk=0)
    with pytest.raises(ValueError, match="unknown structure|is not one of"):
        O.build("gauss_newton", mlp(), nn.CrossEntropyLoss(), structure="nope")


def test_callable_lr_and_damping_are_evaluated_at_each_step():
    X, y = cls_batch()
    opt = O.GaussNewton(mlp(), nn.CrossEntropyLoss(), lr=lambda t: 0.1 * (t + 1), damping=lambda t: 10.0**-t)
    for t in range(3):
        opt.step(X, y)
        assert opt.info["lr"] == pytest.approx(0.1 * (t + 1)) and opt.info["damping"] == 10.0**-t


def test_preconditioner_skip_clears_grads_so_a_torch_optimizer_step_is_a_no_op():
    torch.manual_seed(0)
    model = mlp()
    X, y = cls_batch()
    pre = O.Preconditioner(model, nn.CrossEntropyLoss(), "kfac", "ggn", damping=1e-2)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    pre.backward(X, y)
    pre.precondition()
    adam.step()
    before = full_state(adam, model)
    X[0, 0] = float("inf")
    with pytest.warns(O.NonFiniteStepWarning):
        pre.backward(X, y)
    assert pre.precondition() is False
    adam.step()
    assert all(p.grad is None for p in model.parameters())
    assert full_state(adam, model) == before and pre.steps == 1 and pre.skipped == 1


@pytest.mark.parametrize("structure", __import__("tensorcurv").structures.names())
def test_every_registered_structure_gives_a_finite_descent_direction(structure):
    model = mlp()
    X, y = cls_batch()
    pre = O.Preconditioner(model, nn.CrossEntropyLoss(), structure, "ggn", damping=1e-2, inverse_interval=2)
    pre.backward(X, y)
    raw = [p.grad.clone() for p in pre.params]
    assert pre.precondition()
    gPg = sum(float((g * p.grad).sum()) for g, p in zip(raw, pre.params))
    assert all(torch.isfinite(p.grad).all() for p in pre.params) and gPg > 0
