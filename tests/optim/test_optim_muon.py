"""Muon on the hidden matrices and AdamW on the rest, as one optimizer: the split, the equivalence with the two
torch optimizers run side by side, schedules, state, and loss decrease."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import tensorcurv.optim as O
from tensorcurv.optim import schedules
from tensorcurv.optim.muon import MuonAdamW, split_parameters

pytestmark = pytest.mark.usefixtures("float64_default")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g)
    return X, X @ torch.randn(5, 3, generator=g) + 0.1 * torch.randn(64, 3, generator=g)


def ids(params):
    return [id(p) for p in params]


def test_default_split_puts_every_weight_matrix_but_the_output_layer_on_muon():
    model = mlp()
    muon, adamw = split_parameters(model)
    assert ids(muon) == ids([model[0].weight, model[2].weight])
    assert ids(adamw) == ids([model[0].bias, model[2].bias, model[4].weight, model[4].bias])


def test_first_layer_option_moves_the_input_layer_to_adamw():
    model = mlp()
    muon, adamw = split_parameters(model, adamw_first_layer=True)
    assert ids(muon) == ids([model[2].weight]) and id(model[0].weight) in ids(adamw)


def test_last_layer_option_moves_the_output_layer_to_muon():
    model = mlp()
    muon, _ = split_parameters(model, adamw_last_layer=False)
    assert ids(muon) == ids([model[0].weight, model[2].weight, model[4].weight])


def test_embedding_tables_and_convolution_kernels_stay_on_adamw():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(8, 6), nn.Linear(6, 2))
    muon, adamw = split_parameters(model)
    assert ids(muon) == ids([model[3].weight])
    assert {id(model[0].weight), id(model[1].weight)} <= set(ids(adamw))


def test_a_model_without_hidden_matrix_warns_and_runs_on_adamw_alone():
    with pytest.warns(UserWarning, match="no hidden weight matrix"):
        opt = O.build("muon", nn.Linear(3, 1), nn.MSELoss())
    assert opt.optimizer.muon is None and len(opt.optimizer.param_groups) == 1


def test_one_step_equals_torch_muon_and_adamw_stepped_separately():
    X, y = problem()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01, adamw_lr=0.02, adamw_weight_decay=0.001)
    model = mlp()
    opt = O.build("muon", model, nn.MSELoss(), **kw)
    twin = mlp()
    muon_p, adamw_p = split_parameters(twin)
    ref_muon = torch.optim.Muon(muon_p, lr=0.05, momentum=0.9, weight_decay=0.01)
    ref_adamw = torch.optim.AdamW(adamw_p, lr=0.02, weight_decay=0.001)
    for _ in range(3):
        opt.step(X, y)
        for o in (ref_muon, ref_adamw):
            o.zero_grad()
        nn.MSELoss()(twin(X), y).backward()
        ref_muon.step()
        ref_adamw.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)  # the same operations in the same order: bitwise equal


def test_an_lr_scheduler_scales_both_learning_rates():
    opt = O.build("muon", mlp(), nn.MSELoss(), lr=0.02, adamw_lr=0.001)
    sched = schedules.build(opt.optimizer, "step", 10, step_size=1, gamma=0.5)
    opt.optimizer.step()
    sched.step()
    assert opt.optimizer.muon.param_groups[0]["lr"] == 0.01
    assert opt.optimizer.adamw.param_groups[0]["lr"] == 0.0005


def test_resume_from_state_dict_is_exact():
    X, y = problem()

    def run(split):
        model = mlp()
        opt = O.build("muon", model, nn.MSELoss())
        losses = [float(opt.step(X, y)) for _ in range(split)]
        if split < 6:
            buf = io.BytesIO()
            torch.save({"o": opt.state_dict(), "m": model.state_dict()}, buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=False)
            model = mlp()
            opt = O.build("muon", model, nn.MSELoss())
            model.load_state_dict(state["m"])
            opt.load_state_dict(state["o"])
            assert isinstance(opt.optimizer, MuonAdamW)
            assert opt.optimizer.param_groups[0] is opt.optimizer.muon.param_groups[0]
            losses += [float(opt.step(X, y)) for _ in range(6 - split)]
        return losses

    assert run(3) == run(6)


def test_muon_reduces_a_least_squares_loss():
    X, y = problem()
    opt = O.build("muon", mlp(), nn.MSELoss(), lr=0.02, adamw_lr=0.01)
    losses = [float(opt.step(X, y)) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0], losses[::10]
