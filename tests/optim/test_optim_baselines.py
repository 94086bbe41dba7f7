"""First-order baselines: recursions of the course notes, Lion's published rule, loss decrease, state."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import tensorcurv.optim as O
from tensorcurv.optim.lion import Lion

pytestmark = pytest.mark.usefixtures("float64_default")  # tensors default to float64 here

# f(θ) = θ1² + ½ θ2² (the course's Nesterov example) as mean-MSE of a bias-free linear model:
# ½[(√2 θ1)² + θ2²]; ∇f = (2θ1, θ2).
QX = torch.tensor([[math.sqrt(2.0), 0.0], [0.0, 1.0]], dtype=torch.float64)
QY = torch.zeros(2, 1, dtype=torch.float64)
THETA0 = torch.tensor([1.0, 2.0], dtype=torch.float64)


def grad_f(th):
    return torch.stack([2 * th[0], th[1]])


def quad_model():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(THETA0[None])
    return model


def run_iterates(name, steps, **kw):
    model = quad_model()
    opt = O.build(name, model, nn.MSELoss(), **kw)
    out = []
    for _ in range(steps):
        opt.step(QX, QY)
        out.append(model.weight.detach().flatten().clone())
    return out


def test_quadratic_model_has_the_course_gradient():
    model = quad_model()
    nn.MSELoss()(model(QX), QY).backward()
    torch.testing.assert_close(model.weight.grad.flatten(), grad_f(THETA0), rtol=1e-15, atol=0)


def test_momentum_matches_the_course_recursion_with_lr_times_one_minus_gamma():
    # course: v_{t+1} = γ v_t + (1−γ) ∇L(θ_t), θ_{t+1} = θ_t − η v_{t+1}, v_0 = 0
    eta, gamma = 0.3, 0.8
    th, v, expected = THETA0.clone(), torch.zeros(2), []
    for _ in range(8):
        v = gamma * v + (1 - gamma) * grad_f(th)
        th = th - eta * v
        expected.append(th)
    got = run_iterates("momentum", 8, lr=eta * (1 - gamma), momentum=gamma)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_nesterov_iterates_are_the_look_ahead_points_of_the_course_recursion():
    # course: θ_{t+1} = θ_t + γ(θ_t − θ_{t−1}) − η ∇L(θ_t + γ(θ_t − θ_{t−1})), θ_{−1} = θ_0;
    # torch's Nesterov parameter is the look-ahead point p_t = θ_t + γ(θ_t − θ_{t−1}).
    eta, gamma = 0.2, 0.7
    prev, th, expected = THETA0.clone(), THETA0.clone(), []
    for _ in range(8):
        nxt = th + gamma * (th - prev) - eta * grad_f(th + gamma * (th - prev))
        prev, th = th, nxt
        expected.append(th + gamma * (th - prev))
    got = run_iterates("nesterov", 8, lr=eta, momentum=gamma)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_adagrad_and_rmsprop_and_adam_match_the_course_recursions():
    eta, eps = 0.1, 1e-8
    th, s = THETA0.clone(), torch.zeros(2)
    for _ in range(5):
        g = grad_f(th)
        s = s + g * g
        th = th - eta * g / (s.sqrt() + eps)
    torch.testing.assert_close(run_iterates("adagrad", 5, lr=eta, eps=eps)[-1], th, rtol=1e-13, atol=1e-15)

    alpha = 0.9
    th, s = THETA0.clone(), torch.zeros(2)
    for _ in range(5):
        g = grad_f(th)
        s = alpha * s + (1 - alpha) * g * g
        th = th - eta * g / (s.sqrt() + eps)  # torch puts ε outside the root (the course: inside)
    torch.testing.assert_close(run_iterates("rmsprop", 5, lr=eta, alpha=alpha, eps=eps)[-1], th, rtol=1e-13, atol=1e-15)

    b1, b2 = 0.9, 0.999
    th, m, v = THETA0.clone(), torch.zeros(2), torch.zeros(2)
    for t in range(1, 6):
        g = grad_f(th)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        th = th - eta * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(run_iterates("adam", 5, lr=eta, eps=eps)[-1], th, rtol=1e-13, atol=1e-15)


def test_lion_matches_its_published_update_rule():
    torch.manual_seed(0)
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
    p = nn.Parameter(torch.randn(3, 4))
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    th, m = p.detach().clone(), torch.zeros(3, 4)
    for _ in range(6):
        g = torch.randn(3, 4)
        c = b1 * m + (1 - b1) * g
        th = th - lr * (torch.sign(c) + wd * th)
        m = b2 * m + (1 - b2) * g
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), th, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------- every baseline descends
LRS = {
    "sgd": 0.2,
    "momentum": 0.05,
    "nesterov": 0.05,
    "adagrad": 0.1,
    "rmsprop": 0.01,
    "adam": 0.02,
    "adamw": 0.02,
    "lion": 0.05,
}


def test_every_baseline_has_a_learning_rate_here():
    # Muon, SOAP, Shampoo and PSGD-Kron have their own specification: test_optim_baselines_2026.py
    assert set(LRS) == set(O.names()) - {"natural_gradient", "gauss_newton", "muon", "soap", "shampoo", "psgd_kron"}


@pytest.mark.parametrize("name", sorted(LRS))
def test_baseline_reduces_a_least_squares_quadratic(name):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g), torch.randn(40, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    opt = O.build(name, model, nn.MSELoss(), lr=LRS[name])
    losses = [float(opt.step(X, y)) for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0], losses[::10]


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:200]) / 16.0
    return (X - X.mean(0)) / (X.std(0) + 1e-3), torch.tensor(y[:200])


@pytest.mark.parametrize("name", sorted(LRS) + ["natural_gradient", "gauss_newton"])
def test_optimizer_reduces_the_loss_of_a_small_digits_mlp(name, digits):
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    kw = {"lr": LRS[name]} if name in LRS else {"lr": 0.5, "damping": 1e-2}
    opt = O.build(name, model, nn.CrossEntropyLoss(), **kw)
    losses = [float(opt.step(X, y)) for _ in range(10)]
    assert losses[-1] < 0.8 * losses[0], losses[::5]


# ---------------------------------------------------------------- robustness and state
def test_baseline_skips_a_non_finite_step_without_touching_state():
    model = quad_model()
    opt = O.build("adam", model, nn.MSELoss(), lr=0.1)
    opt.step(QX, QY)
    w, st = model.weight.detach().clone(), {k: v.clone() for k, v in opt.optimizer.state[model.weight].items()}
    bad = QX.clone()
    bad[0, 0] = float("inf")
    with pytest.warns(O.NonFiniteStepWarning, match="weight"):
        opt.step(bad, QY)
    assert torch.equal(model.weight.detach(), w) and opt.skipped == 1 and opt.steps == 1
    for k, v in opt.optimizer.state[model.weight].items():
        assert torch.equal(v, st[k])


@pytest.mark.parametrize("name", ["nesterov", "adam", "lion"])
def test_baseline_resume_from_state_dict_is_exact(name):
    def run(split):
        model = quad_model()
        opt = O.build(name, model, nn.MSELoss(), lr=0.05)
        losses = [float(opt.step(QX, QY)) for _ in range(split)]
        if split < 6:
            buf = io.BytesIO()
            torch.save({"o": opt.state_dict(), "m": model.state_dict()}, buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=False)
            model = nn.Linear(2, 1, bias=False)
            opt = O.build(name, model, nn.MSELoss(), lr=0.05)
            model.load_state_dict(state["m"])
            opt.load_state_dict(state["o"])
            losses += [float(opt.step(QX, QY)) for _ in range(6 - split)]
        return losses

    assert run(3) == run(6)
