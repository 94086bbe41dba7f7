"""Facts about the speed options of the optimizers: the early-average decay schedule and the
K-FAC Cholesky (explicit π-damped inverse) path; float64, against independent dense formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tensorcurv
import tensorcurv.optim as O
from optim_problems import cls_batch, losses_with_resume, mlp
from tensorcurv import structures
from tensorcurv.linalg import vec

pytestmark = pytest.mark.usefixtures("float64_default")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def fitted_kfac(**hp):
    curv = tensorcurv.Curvature(mlp(), "kfac", "ggn", **hp)
    curv.update(*cls_batch(), nn.CrossEntropyLoss())
    return curv.blocks["0"]


# ---------------------------------------------------------------- decay schedule
def test_average_decay_schedule_weights_the_kth_update_by_min_one_minus_one_over_k_and_decay():
    # first layer: A_t = mean over the batch of [x, 1][x, 1]ᵀ, independent of the weights
    decay, batches = 0.6, [cls_batch(seed=s) for s in range(5)]
    opt = O.GaussNewton(mlp(), nn.CrossEntropyLoss(), lr=0.1, damping=1e-2, decay=decay, decay_schedule="average")
    expected = None
    for k, (X, y) in enumerate(batches, start=1):
        opt.step(X, y)
        a = torch.cat([X, torch.ones(X.shape[0], 1)], 1)
        A_batch = a.T @ a / X.shape[0]
        rho = min(1 - 1 / k, decay)
        expected = A_batch if expected is None else rho * expected + (1 - rho) * A_batch
        torch.testing.assert_close(opt.curvature.blocks["0"].A, expected, rtol=1e-13, atol=1e-15)


def test_average_schedule_is_the_plain_mean_while_one_minus_one_over_k_is_below_decay():
    batches = [cls_batch(seed=s) for s in range(4)]
    opt = O.GaussNewton(mlp(), nn.CrossEntropyLoss(), lr=0.1, damping=1e-2, decay=0.95, decay_schedule="average")
    for X, y in batches:
        opt.step(X, y)
    a = [torch.cat([X, torch.ones(X.shape[0], 1)], 1) for X, _ in batches]
    mean = sum(t.T @ t / t.shape[0] for t in a) / len(a)
    torch.testing.assert_close(opt.curvature.blocks["0"].A, mean, rtol=1e-13, atol=1e-15)


def test_constant_decay_schedule_keeps_the_first_batch_weight_decay_to_the_k_minus_1():
    decay, batches = 0.9, [cls_batch(seed=s) for s in range(3)]
    opt = O.GaussNewton(mlp(), nn.CrossEntropyLoss(), lr=0.1, damping=1e-2, decay=decay)
    for X, y in batches:
        opt.step(X, y)
    A = [torch.cat([X, torch.ones(X.shape[0], 1)], 1) for X, _ in batches]
    A = [t.T @ t / t.shape[0] for t in A]
    expected = decay**2 * A[0] + decay * (1 - decay) * A[1] + (1 - decay) * A[2]
    torch.testing.assert_close(opt.curvature.blocks["0"].A, expected, rtol=1e-13, atol=1e-15)


def test_unknown_decay_schedule_is_rejected_with_the_valid_choices():
    with pytest.raises(ValueError, match=r"decay_schedule='ema'.*constant.*average"):
        O.build("natural_gradient", mlp(), nn.CrossEntropyLoss(), decay_schedule="ema")


def test_resume_with_the_average_schedule_reproduces_an_uninterrupted_run():
    kw = dict(
        structure="kfac", lr=0.3, damping=1e-2, decay_schedule="average", stats_interval=2, inverse_interval=2, seed=1
    )
    batches = [cls_batch(seed=s) for s in range(6)]
    run = lambda split: losses_with_resume("natural_gradient", kw, batches, split)  # noqa: E731
    assert run(3) == run(6)


# ---------------------------------------------------------------- kfac inverse="cholesky"
def test_kfac_cholesky_solve_equals_the_dense_pi_damped_inverse():
    block = fitted_kfac(damping_kind="pi", inverse="cholesky")
    m, n = block.shape
    lam = 3e-2
    pi = math.sqrt((torch.trace(block.A) / n) / (torch.trace(block.G) / m))
    dense = torch.linalg.inv(
        torch.kron(block.A + pi * math.sqrt(lam) * torch.eye(n), block.G + math.sqrt(lam) / pi * torch.eye(m))
    )
    V = torch.randn(m, n)
    assert rel(vec(block.solve(V, lam)), dense @ vec(V)) < 1e-12
    assert block.last_solve["method"] == "kron-cholesky" and block.last_solve["damping"] == "pi"


def test_kfac_cholesky_and_eigh_paths_are_the_same_operator():
    V = torch.randn(fitted_kfac().shape)
    a = fitted_kfac(damping_kind="pi", inverse="cholesky").solve(V, 1e-2)
    b = fitted_kfac(damping_kind="pi", inverse="eigh").solve(V, 1e-2)
    assert rel(a, b) < 1e-12


def test_kfac_cholesky_solve_costs_half_the_flops_of_the_eigen_solve():
    assert 2 * fitted_kfac(damping_kind="pi", inverse="cholesky").solve_flops() == fitted_kfac().solve_flops()


def test_kfac_cholesky_inverse_is_recomputed_when_the_factors_change():
    curv = tensorcurv.Curvature(mlp(), "kfac", "ggn", damping_kind="pi", inverse="cholesky")
    curv.update(*cls_batch(seed=0), nn.CrossEntropyLoss())
    block = curv.blocks["0"]
    V = torch.randn(block.shape)
    before = block.solve(V, 1e-2)
    curv.update(*cls_batch(seed=1), nn.CrossEntropyLoss(), decay=0.5)
    fresh = structures.create("kfac", block.shape, damping_kind="pi", inverse="cholesky")
    fresh.load_state_dict(block.state_dict())
    after = block.solve(V, 1e-2)
    assert rel(after, before) > 1e-3 and rel(after, fresh.solve(V, 1e-2)) < 1e-14


def test_kfac_cholesky_falls_back_to_clamped_eigenvalues_for_an_indefinite_factor():
    block = fitted_kfac(damping_kind="pi", inverse="cholesky")
    m, n = block.shape
    Q, _ = torch.linalg.qr(torch.randn(n, n))
    lamA = torch.linspace(-1.0, 2.0, n)  # indefinite: A + π√λ I is not positive definite
    block.A = (Q * lamA) @ Q.T
    block._after_load()
    lam = 1e-2
    pi, sq = block.pi(), math.sqrt(lam)
    A_inv = (Q / (lamA.clamp_min(0) + pi * sq)) @ Q.T
    G_inv = torch.linalg.inv(block.G + sq / pi * torch.eye(m))
    V = torch.randn(m, n)
    out = block.solve(V, lam)
    assert rel(out, G_inv @ V @ A_inv) < 1e-12 and torch.isfinite(out).all()
    assert block.last_solve["method"] == "kron-cholesky+eigh-fallback"


def test_kfac_cholesky_inverse_needs_pi_damping():
    with pytest.raises(ValueError, match="inverse='cholesky' needs damping_kind='pi'"):
        structures.create("kfac", (3, 4), inverse="cholesky")


def test_natural_gradient_takes_the_cholesky_path_through_structure_hparams():
    opt = O.NaturalGradient(
        mlp(),
        nn.CrossEntropyLoss(),
        structure="kfac",
        lr=0.1,
        damping=1e-2,
        damping_kind="pi",
        inverse="cholesky",
        inverse_interval=2,
        stats_interval=2,
    )
    for s in range(3):
        opt.step(*cls_batch(seed=s))
    assert all(b.last_solve["method"] == "kron-cholesky" for b in opt.preconditioner.solver.blocks.values())


# ---------------------------------------------------------------- KL clipping's ⟨g, Δ⟩ as finiteness check
@pytest.mark.parametrize("kl_clip", [None, 1e-3])
def test_non_finite_solve_is_skipped_and_named_with_or_without_kl_clipping(kl_clip):
    model = mlp()
    pre = O.Preconditioner(model, nn.CrossEntropyLoss(), "kfac", "ggn", damping=1e-2, kl_clip=kl_clip)
    pre.backward(*cls_batch())
    solve = pre.solver.solve

    def poisoned(grads, damping, **kw):
        out = solve(grads, damping=damping, **kw)
        out[2] = out[2].clone()
        out[2][0, 0] = float("inf")  # "2.weight"
        return out

    pre.solver.solve = poisoned
    with pytest.warns(O.NonFiniteStepWarning, match=r"2\.weight"):
        assert pre.precondition(0.5) is False
    assert all(p.grad is None for p in model.parameters()) and pre.steps == 0
