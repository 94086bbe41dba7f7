"""Factory, Hydra configs and learning-rate schedules of tensorcurv.optim."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import tensorcurv.optim as O
from tensorcurv.optim import schedules

CONF = Path(__file__).resolve().parents[2] / "conf" / "optim"


def test_factory_names_are_the_agreed_ones():
    assert sorted(O.names()) == sorted(
        [
            "natural_gradient",
            "gauss_newton",
            "sgd",
            "momentum",
            "nesterov",
            "adagrad",
            "rmsprop",
            "adam",
            "adamw",
            "lion",
            "muon",
            "soap",
            "shampoo",
            "psgd_kron",
        ]
    )


@pytest.mark.parametrize("name", O.names())
def test_yaml_keys_are_name_plus_the_config_fields_and_build(name):
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    fields = [f.name for f in dataclasses.fields(O.config.config_class(name))]
    assert list(cfg) == ["name"] + fields and cfg.pop("name") == name
    opt = O.build(name, nn.Linear(3, 2), nn.MSELoss(), **cfg)
    assert isinstance(opt.optimizer, torch.optim.Optimizer)
    assert opt.config == O.make_config(name, **cfg)


def test_unknown_optimizer_and_key_give_one_line_errors_naming_valid_choices():
    with pytest.raises(ValueError, match="valid: .*adam"):
        O.build("adamm", nn.Linear(2, 1), nn.MSELoss())
    with pytest.raises(ValueError, match=r"does not take \['betas'\]; valid keys: .*beta1"):
        O.build("adam", nn.Linear(2, 1), nn.MSELoss(), betas=(0.9, 0.99))


@pytest.mark.parametrize(
    "key,value", [("lr", -1.0), ("momentum", 1.0), ("stats_interval", 0), ("kind", "fisher"), ("damping_rule", "trust")]
)
def test_invalid_second_order_values_are_rejected_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        O.make_config("natural_gradient", **{key: value})


def lrs(name, total=12, **kw):
    opt = O.build("sgd", nn.Linear(2, 1), nn.MSELoss(), lr=1.0)
    sched = schedules.build(opt.optimizer, name, total, **kw)
    out = []
    for _ in range(total):
        out.append(opt.optimizer.param_groups[0]["lr"])
        opt.optimizer.step()
        sched.step()
    return out


def test_constant_and_step_schedules():
    assert lrs("constant") == [1.0] * 12
    assert lrs("step", step_size=4, gamma=0.5) == pytest.approx([1.0] * 4 + [0.5] * 4 + [0.25] * 4)


def test_cosine_warmup_rises_linearly_then_follows_the_cosine():
    got = lrs("cosine_warmup", total=12, warmup_steps=2, warmup_start=0.5)
    assert got[:3] == pytest.approx([0.5, 0.75, 1.0])
    assert got[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])


def test_cosine_restarts_returns_to_the_base_lr_every_period():
    got = lrs("cosine_restarts", total=12, T_0=4)
    assert got[0] == got[4] == got[8] == 1.0
    assert got[2] == pytest.approx(0.5)


def test_unknown_schedule_and_schedule_key_are_rejected():
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="cosine_warmup"):
        schedules.build(opt, "linear", 10)
    with pytest.raises(ValueError, match="step_size"):
        schedules.build(opt, "step", 10, size=3)
