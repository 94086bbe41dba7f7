"""The 2026 baselines (Muon, SOAP, Shampoo, PSGD-Kron): built through the factory and the Hydra ``optim`` group,
descending on a least-squares and a classification problem, one-line errors for a mistyped key or value, and
a one-line error naming the ``baselines`` extra when pytorch-optimizer is missing."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import tensorcurv.optim as O
from tensorcurv.experiments.config import ConfigError, validate_train
from tensorcurv.optim.packaged import PACKAGED

pytestmark = pytest.mark.usefixtures("float64_default")

CONF = Path(__file__).resolve().parents[2] / "conf"
NEW = ("muon", "soap", "shampoo", "psgd_kron")
# Learning rates that make 40 full-batch steps clearly descend (not tuned beyond that).
LEAST_SQUARES_KW = {
    "muon": {"lr": 0.02, "adamw_lr": 0.02},
    "soap": {"lr": 0.02},
    "shampoo": {"lr": 0.05},
    "psgd_kron": {"lr": 0.02},
}


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_the_factory_knows_the_2026_baselines():
    assert set(NEW) <= set(O.names())


@pytest.mark.parametrize("name", NEW)
def test_hydra_group_composes_validates_and_builds(name):
    v = validate_train(compose_train(f"optim={name}"))
    assert v.optim["name"] == name
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = O.build(name, model, nn.CrossEntropyLoss(), **v.optimizer_kwargs())
    assert isinstance(opt.optimizer, torch.optim.Optimizer)
    assert opt.config == O.make_config(name, **v.optimizer_kwargs())


@pytest.mark.parametrize("name", NEW)
def test_reduces_a_least_squares_loss(name):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g)
    y = X @ torch.randn(5, 2, generator=g) + 0.1 * torch.randn(64, 2, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 2))  # a deep linear net: one matrix for Muon
    opt = O.build(name, model, nn.MSELoss(), **LEAST_SQUARES_KW[name])
    losses = [float(opt.step(X, y)) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("name", NEW)
def test_reduces_a_classification_loss(name):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(96, 6, generator=g)
    y = (X[:, :3] @ torch.randn(3, 3, generator=g)).argmax(1)  # linearly separable labels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = O.build(name, model, nn.CrossEntropyLoss(), **LEAST_SQUARES_KW[name])
    losses = [float(opt.step(X, y)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0], losses[::10]


@pytest.mark.parametrize(
    "name,typo",
    [("muon", "adam_lr"), ("soap", "precondition_freq"), ("shampoo", "epsilon"), ("psgd_kron", "update_probability")],
)
def test_a_mistyped_key_gives_one_line_naming_the_valid_keys(name, typo):
    with pytest.raises(ValueError, match=rf"does not take \['{typo}'\]; valid keys: .*lr") as e:
        O.build(name, nn.Linear(2, 1), nn.MSELoss(), **{typo: 1})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("muon", "adjust_lr", "rms"),
        ("muon", "ns_steps", 0),
        ("soap", "beta2", 1.0),
        ("soap", "precondition_frequency", 0),
        ("shampoo", "eps", 0.0),
        ("psgd_kron", "memory_save_mode", "diag"),
        ("psgd_kron", "precondition_update_probability", 0.0),
    ],
)
def test_a_bad_value_gives_one_line_naming_the_key(name, key, value):
    with pytest.raises(ValueError, match=key) as e:
        O.make_config(name, **{key: value})
    assert "\n" not in str(e.value)


def test_a_mistyped_hydra_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optim \(soap\).*precondition_freq"):
        validate_train(compose_train("optim=soap", "+optim.precondition_freq=5"))


@pytest.mark.parametrize("name", PACKAGED)
def test_without_pytorch_optimizer_the_error_names_the_extra(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pytorch-optimizer.*tensorcurv\[baselines\]") as e:
        O.build(name, nn.Linear(2, 1), nn.MSELoss())
    assert "\n" not in str(e.value)


def test_psgd_kron_param_dtype_keeps_the_preconditioner_in_float64():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = O.build("psgd_kron", model, nn.MSELoss(), precondition_dtype="param")
    opt.step(torch.randn(8, 3), torch.randn(8, 2))
    assert all(q.dtype == torch.float64 for q in opt.optimizer.state[model[0].weight]["Q"])


@pytest.mark.parametrize("name", PACKAGED)
def test_resume_from_state_dict_is_exact(name):
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).state_dict()
    kw = {"lr": 0.01, "precondition_frequency": 2} if name == "soap" else {"lr": 0.01}

    def fresh():
        with torch.random.fork_rng():  # the layers' initialization must not consume the probes' generator
            model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
        model.load_state_dict(init)
        return model, O.build(name, model, nn.MSELoss(), **kw)

    def run(split):
        torch.manual_seed(1)  # PSGD-Kron draws probes from torch's generator and balancing from NumPy's
        np.random.seed(1)
        model, opt = fresh()
        losses = [float(opt.step(X, y)) for _ in range(split)]
        if split < 6:
            buf = io.BytesIO()
            torch.save({"o": opt.state_dict(), "m": model.state_dict()}, buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=False)
            model, opt = fresh()
            model.load_state_dict(state["m"])
            opt.load_state_dict(state["o"])
            losses += [float(opt.step(X, y)) for _ in range(6 - split)]
        return losses

    assert run(3) == run(6)


def test_psgd_kron_factors_keep_float32_after_load_state_dict_of_float64_parameters():
    # torch's load_state_dict casts floating state to the parameter dtype; the factors must stay float32
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = O.build("psgd_kron", model, nn.MSELoss())
    opt.step(torch.randn(8, 3), torch.randn(8, 2))
    opt.load_state_dict(opt.state_dict())
    assert all(q.dtype == torch.float32 for q in opt.optimizer.state[model[0].weight]["Q"])


def inverse_root(M, p):
    w, V = torch.linalg.eigh(M)
    return V @ torch.diag(w ** (-1.0 / p)) @ V.T


def test_shampoo_steps_are_gupta_et_al_preconditioned_gradients():
    # W ← W − η L^{-1/4} G R^{-1/4}, L = εI + Σ G Gᵀ, R = εI + Σ GᵀG (Gupta et al. 2018, Algorithm 1)
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)
    model = nn.Linear(4, 3, bias=False)
    lr, eps = 0.1, 1e-4
    opt = O.build("shampoo", model, nn.MSELoss(), lr=lr, eps=eps)
    W, L, R = model.weight.detach().clone(), eps * torch.eye(3), eps * torch.eye(4)
    for _ in range(3):
        G = 2 * ((X @ W.T - y).T @ X) / y.numel()
        L, R = L + G @ G.T, R + G.T @ G
        W = W - lr * inverse_root(L, 4) @ G @ inverse_root(R, 4)
        opt.step(X, y)
        # eigh here, an SVD in the package: float64 rounding only (observed below 1e-15)
        torch.testing.assert_close(model.weight.detach(), W, rtol=1e-12, atol=1e-13)


def test_soap_first_step_only_initializes_its_factors():
    model = nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = O.build("soap", model, nn.MSELoss())
    opt.step(torch.randn(8, 4), torch.randn(8, 3))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
