"""Krylov refinement of NaturalGradient / GaussNewton on the exact mini-batch curvature (float64, tiny MLPs).

The reference is the dense damped solve ``(C + λI)⁻¹ g`` with ``C`` from ``torch.func`` (tests/reference.py).
One step from a fresh optimizer with ``lr = 1``, no momentum and no KL clip moves ``θ`` by exactly ``−d``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorcurv.optim as O
from optim_problems import cls_batch
from reference import full_block

LAM = 1e-2


def mlp3(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batch():
    X, y = cls_batch(N=24)
    return X.double(), y


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def one_step(model, X, y, **kw):
    """The direction ``d`` of one step (``θ ← θ − d``) and the optimizer's info."""
    opt = O.GaussNewton(model, nn.CrossEntropyLoss(), lr=1.0, damping=LAM, **kw)
    before = flat_params(model)
    opt.step(X, y)
    return before - flat_params(model), opt.info


def gradient(model, X, y):
    model.zero_grad()
    nn.CrossEntropyLoss()(model(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    return g


def block_diagonal(model, C):
    """``C`` with the entries between parameters of different layers set to zero."""
    layer_of = torch.cat([torch.full((p.numel(),), i // 2) for i, p in enumerate(model.parameters())])
    return C * (layer_of[:, None] == layer_of[None, :])


def exact_system(model, X, y, coupling="full"):
    C, _, _ = full_block(model, X, y, "cross_entropy", "ggn")
    C = C if coupling == "full" else block_diagonal(model, C)
    return C + LAM * torch.eye(C.shape[0], dtype=C.dtype), gradient(model, X, y)


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("operator", ["stats", "func"])
@pytest.mark.parametrize("coupling", ["full", "block"])
def test_refinement_with_enough_steps_equals_the_dense_exact_damped_solve(operator, coupling):
    X, y = batch()
    model = mlp3()
    A, g = exact_system(model, X, y, coupling)
    d, info = one_step(model, X, y, refine=300, refine_tol=1e-12, refine_operator=operator, refine_coupling=coupling)
    assert info["refine_residual"] <= 1e-12
    bound = 1e-12 * float(g.norm()) / float(torch.linalg.eigvalsh(A)[0])  # ‖d − d*‖ ≤ ‖r‖ / λ_min(A)
    assert float((d - torch.linalg.solve(A, g)).norm()) <= bound


def test_reported_residual_is_the_relative_residual_of_the_step_taken():
    X, y = batch()
    model = mlp3()
    A, g = exact_system(model, X, y)
    d, info = one_step(model, X, y, refine=4)
    true = float((g - A @ d).norm() / g.norm())
    assert info["refine_residual"] == pytest.approx(true, rel=1e-9)
    assert info["refine_residuals"][-1] == info["refine_residual"]


def test_residual_history_starts_at_one_and_has_one_entry_per_iteration():
    X, y = batch()
    d, info = one_step(mlp3(), X, y, refine=6, refine_tol=1e-14)
    hist = info["refine_residuals"]
    assert hist[0] == 1.0 and len(hist) == info["refine_iterations"] + 1 == 7


def test_refinement_residual_ends_far_below_the_unrefined_directions():
    X, y = batch()
    model = mlp3()
    A, g = exact_system(model, X, y)
    d0, _ = one_step(mlp3(), X, y)
    _, info = one_step(model, X, y, refine=10)
    assert info["refine_residual"] < 0.1 * float((g - A @ d0).norm() / g.norm())


def test_zero_steps_give_exactly_the_unrefined_step():
    X, y = batch()
    d0, info0 = one_step(mlp3(), X, y)
    d, info = one_step(mlp3(), X, y, refine=0)
    assert torch.equal(d, d0) and not any(k.startswith("refine") for k in info)


def test_one_step_is_the_unrefined_direction_rescaled_by_the_exact_line_search():
    X, y = batch()
    model = mlp3()
    A, g = exact_system(model, X, y)
    d0, _ = one_step(mlp3(), X, y)
    d, info = one_step(model, X, y, refine=1)
    alpha = float(g @ d0 / (d0 @ A @ d0))
    torch.testing.assert_close(d, alpha * d0, rtol=1e-10, atol=1e-13)
    assert info["refine_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_reported_cosine_is_the_cosine_to_the_unrefined_direction():
    X, y = batch()
    d0, _ = one_step(mlp3(), X, y)
    d, info = one_step(mlp3(), X, y, refine=5)
    assert info["refine_cosine"] == pytest.approx(cosine(d, d0), abs=1e-12)


@pytest.mark.parametrize("structure", ["kfac", "diagonal"])
def test_refined_direction_is_closer_to_the_exact_solve_than_the_unrefined_one(structure):
    X, y = batch()
    A, g = exact_system(mlp3(), X, y)
    exact = torch.linalg.solve(A, g)
    d0, _ = one_step(mlp3(), X, y, structure=structure)
    d5, _ = one_step(mlp3(), X, y, structure=structure, refine=5)
    assert cosine(d5, exact) > cosine(d0, exact)


def test_refinement_composes_with_kl_clipping_and_scales_the_refined_direction():
    X, y = batch()
    d, info = one_step(mlp3(), X, y, refine=5)
    dc, infoc = one_step(mlp3(), X, y, refine=5, kl_clip=1e-6)
    assert infoc["kl_scale"] < 1.0
    torch.testing.assert_close(dc, infoc["kl_scale"] * d, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(refine=-1), "refine must be"),
        (dict(refine=2, refine_coupling="cross"), "refine_coupling"),
        (dict(refine=2, refine_operator="hvp"), "refine_operator"),
        (dict(refine=2, stats_interval=2), "stats_interval"),
        (dict(refine=2, refine_operator="func", kind="empirical"), "empirical"),
    ],
)
def test_invalid_refinement_options_are_rejected_naming_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        O.make_config("natural_gradient", **kw)


def test_func_operator_refines_steps_without_statistics():
    X, y = batch()
    opt = O.GaussNewton(mlp3(), nn.CrossEntropyLoss(), damping=LAM, stats_interval=2, refine=3, refine_operator="func")
    opt.step(X, y)
    opt.step(X, y)
    assert opt.info["stats"] is False and opt.info["refine_iterations"] == 3


@pytest.mark.parametrize("operator", ["stats", "func"])
def test_uncovered_parameters_keep_their_unrefined_direction(operator):
    X, y = batch()

    def directions(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
        before = [p.detach().clone() for p in model.parameters()]
        O.GaussNewton(model, nn.CrossEntropyLoss(), damping=LAM, **kw).step(X, y)
        return [b - p.detach() for b, p in zip(before, model.parameters())]

    d0, d = directions(), directions(refine=3, refine_operator=operator)
    same = [torch.equal(a, b) for a, b in zip(d0, d)]
    assert same == [False, False, True, True, False, False]  # the LayerNorm's weight and bias are uncovered
