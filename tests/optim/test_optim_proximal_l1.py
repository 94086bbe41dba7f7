"""The L1 option of every optimizer (tensorcurv.optim.proximal): soft-thresholding, ISTA, FISTA and
proximal Gauss-Newton against an independent LASSO solver.

λ mapping. The library minimizes ``F(θ) = (1/N)‖Xθ − y‖² + α‖θ‖₁`` (``nn.MSELoss()``, mean over the
``N`` samples, plus ``l1 = α``). The coordinate descent below minimizes
``½‖y − Xβ‖² + μ‖β‖₁``; since ``F = (2/N)(½‖Xθ − y‖² + (Nα/2)‖θ‖₁)``, both have the same minimizer
for ``μ = Nα/2`` (the same mapping as damping λ ↔ ridge μ = Nλ/2).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tensorcurv.optim as O
from tensorcurv.optim import packaged
from tensorcurv.optim.proximal import fista_momentum, soft_threshold

N, D, ALPHA = 80, 6, 0.05
TOL = 1e-9  # ‖θ − β*‖∞ at which a run counts as converged (float64; β* is accurate to ~1e-15)


def lasso_problem():
    """``X`` with singular values ∝ 1 … 20 (``XᵀX`` has condition 400, where FISTA's extrapolation pays),
    a sparse ``β`` and noise."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(N, D, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    X = (U * torch.linspace(1.0, 20.0, D, dtype=torch.float64)) @ V.T * N**0.5 / 2
    beta = torch.tensor([1.0, -0.5, 0.0, 0.0, 0.3, 0.0], dtype=torch.float64)
    y = X @ beta + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    return X, y


def coordinate_descent_lasso(X, y, mu, sweeps=10000):
    """argmin ``½‖y − Xβ‖² + μ‖β‖₁`` by cyclic coordinate descent (exact minimization per coordinate)."""
    beta = torch.zeros(X.shape[1], dtype=X.dtype)
    r = y.clone()
    sq = (X * X).sum(0)
    for _ in range(sweeps):
        old = beta.clone()
        for j in range(X.shape[1]):
            rho = X[:, j] @ r + sq[j] * beta[j]
            new = torch.sign(rho) * torch.clamp(rho.abs() - mu, min=0.0) / sq[j]
            r -= X[:, j] * (new - beta[j])
            beta[j] = new
        if (beta - old).abs().max() < 1e-16:
            break
    return beta


@pytest.fixture(scope="module")
def problem():
    X, y = lasso_problem()
    return X, y, coordinate_descent_lasso(X, y, mu=N * ALPHA / 2)


def linear_model():
    model = nn.Linear(D, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    return model


def run(opt, model, X, y, target, max_steps):
    """Steps until ``‖θ − β*‖∞ ≤ TOL``; returns the number of steps (``max_steps + 1``: not converged)."""
    for k in range(1, max_steps + 1):
        opt.step(X, y[:, None])
        if (model.weight.detach()[0] - target).abs().max() <= TOL:
            return k
    return max_steps + 1


def smooth_lipschitz(X):
    """``L`` of ``∇(1/N)‖Xθ − y‖²``: ``λ_max((2/N)XᵀX)``."""
    return float(torch.linalg.eigvalsh(2 * X.T @ X / N).max())


def test_soft_threshold_equals_its_closed_form():
    z = torch.tensor([-3.0, -0.7, -0.5, -0.2, 0.0, 0.2, 0.5, 0.7, 3.0], dtype=torch.float64)
    tau = 0.5
    closed = torch.where(z > tau, z - tau, torch.where(z < -tau, z + tau, torch.zeros_like(z)))
    assert torch.equal(soft_threshold(z, tau), closed)


def test_soft_threshold_minimizes_the_prox_objective():
    z, tau = torch.tensor([0.9, -0.3, -2.0], dtype=torch.float64), 0.4
    u = torch.linspace(-3, 3, 60001, dtype=torch.float64)[:, None]  # grid step 1e-4
    best = u[(0.5 * (u - z) ** 2 + tau * u.abs()).argmin(0), 0]
    assert torch.allclose(soft_threshold(z, tau), best, atol=1e-4)


def test_fista_sequence_is_the_standard_one():
    t2, beta1 = fista_momentum(1.0)
    assert t2 == pytest.approx((1 + 5**0.5) / 2, abs=1e-15) and beta1 == 0.0
    t3, beta2 = fista_momentum(t2)
    assert t3 == pytest.approx((1 + (1 + 4 * t2 * t2) ** 0.5) / 2, abs=1e-15)
    assert beta2 == pytest.approx((t2 - 1) / t3, abs=1e-15)


def test_the_lasso_reference_is_sparse_and_satisfies_the_optimality_conditions(problem):
    X, y, beta = problem
    grad = 2 * X.T @ (X @ beta - y) / N  # ∇ of (1/N)‖Xβ − y‖²; optimality: −grad ∈ α ∂‖β‖₁
    on = beta != 0
    assert 0 < int(on.sum()) < D
    assert torch.allclose(-grad[on], ALPHA * torch.sign(beta[on]), atol=1e-12)
    assert bool((grad[~on].abs() <= ALPHA + 1e-12).all())


@pytest.mark.parametrize("structure", ["dense", "kfac"])
def test_proximal_gauss_newton_converges_to_the_coordinate_descent_lasso(problem, structure):
    X, y, beta = problem
    model = linear_model()
    opt = O.build("gauss_newton", model, nn.MSELoss(), structure=structure, damping=1e-3, decay=None, l1=ALPHA)
    assert run(opt, model, X, y, beta, max_steps=100) <= 100
    assert torch.allclose(model.weight.detach()[0], beta, atol=TOL, rtol=0)


@pytest.mark.parametrize("fista", [False, True])
def test_ista_and_fista_converge_to_the_coordinate_descent_lasso(problem, fista):
    X, y, beta = problem
    model = linear_model()
    opt = O.build("sgd", model, nn.MSELoss(), lr=1 / smooth_lipschitz(X), l1=ALPHA, l1_fista=fista)
    assert run(opt, model, X, y, beta, max_steps=3000) <= 3000


def test_fista_takes_fewer_iterations_than_ista(problem):
    X, y, beta = problem
    counts = {}
    for fista in (False, True):
        model = linear_model()
        opt = O.build("sgd", model, nn.MSELoss(), lr=1 / smooth_lipschitz(X), l1=ALPHA, l1_fista=fista)
        counts[fista] = run(opt, model, X, y, beta, max_steps=3000)
    assert counts[True] < counts[False] <= 3000


def available_names():
    out = []
    for name in O.names():
        try:
            packaged.check_available(name)
        except ImportError:
            continue
        out.append(name)
    return out


@pytest.mark.parametrize("name", available_names())
def test_l1_zero_leaves_every_optimizer_bitwise_unchanged(name):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    x, t = torch.randn(16, 4), torch.randint(0, 3, (16,))
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    for model, kw in zip(models, [{}, {"l1": 0.0, "l1_fista": True}]):
        torch.manual_seed(1)  # the same random stream for each (MC labels, PSGD-Kron's probes)
        opt = O.build(name, model, nn.CrossEntropyLoss(), **kw)
        for _ in range(3):
            opt.step(x, t)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


def test_l1_thresholds_with_each_group_learning_rate():
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.05, 0.02]], dtype=torch.float64))
    opt = O.build("sgd", model, nn.MSELoss(), lr=0.5, l1=0.1)
    x = torch.zeros(1, 3, dtype=torch.float64)  # zero gradient: the step is the prox alone
    opt.step(x, torch.zeros(1, 1, dtype=torch.float64))
    expected = torch.tensor([[0.25, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(model.weight.detach(), expected)


@pytest.mark.parametrize(
    "name,key,value,message",
    [
        ("sgd", "l1", -0.1, "l1 must be a finite number >= 0"),
        ("muon", "l1", float("nan"), "l1 must be a finite number >= 0"),
        ("adam", "l1_fista", "yes", "l1_fista must be true or false"),
        ("gauss_newton", "l1_prox_steps", 0, "l1_prox_steps must be an integer >= 1"),
    ],
)
def test_invalid_l1_values_are_one_line_errors_naming_the_key(name, key, value, message):
    with pytest.raises(ValueError, match=message) as e:
        O.make_config(name, **{key: value})
    assert "\n" not in str(e.value)


FIRST_ORDER = [n for n in available_names() if n not in ("gauss_newton", "natural_gradient")]


@pytest.mark.parametrize("name", FIRST_ORDER)
def test_first_order_l1_step_is_the_plain_step_then_soft_thresholding_at_each_group_lr(name):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    x, t = torch.randn(16, 4), torch.randint(0, 3, (16,))
    plain, penalized = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    opt = O.build(name, plain, nn.CrossEntropyLoss())
    opt.step(x, t)
    torch.manual_seed(1)
    O.build(name, penalized, nn.CrossEntropyLoss(), l1=0.5).step(x, t)
    lr_of = {id(p): g["lr"] for g in opt.optimizer.param_groups for p in g["params"]}
    for p, q in zip(plain.parameters(), penalized.parameters()):
        assert torch.equal(soft_threshold(p.detach(), lr_of[id(p)] * 0.5), q.detach())


def test_fista_state_round_trips_through_state_dict(problem):
    X, y, _ = problem
    runs = []
    for resume in (False, True):
        model = linear_model()
        opt = O.build("sgd", model, nn.MSELoss(), lr=1 / smooth_lipschitz(X), l1=ALPHA, l1_fista=True)
        for _ in range(5):
            opt.step(X, y[:, None])
        if resume:
            state, weights = copy.deepcopy(opt.state_dict()), model.state_dict()
            model = linear_model()
            model.load_state_dict(weights)
            opt = O.build("sgd", model, nn.MSELoss(), lr=1 / smooth_lipschitz(X), l1=ALPHA, l1_fista=True)
            opt.load_state_dict(state)
        for _ in range(5):
            opt.step(X, y[:, None])
        runs.append(model.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", ["gauss_newton", "natural_gradient"])
def test_second_order_l1_gives_exact_zeros_on_a_network(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, t = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = O.build(name, model, nn.CrossEntropyLoss(), lr=0.5, damping=0.1, l1=0.02, seed=0)
    for _ in range(5):
        opt.step(x, t)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert bool(torch.isfinite(weights).all()) and int((weights == 0).sum()) > 0
    assert opt.info["prox_lambda_max"] > 0.1  # L >= λ
