"""The thesis's method presets (``tensorcurv.experiments.thesis_methods``): they agree with their
``conf/curvature`` files, compose with the thesis protocol (``optim=thesis_ng``), train, and K-FAC / KPSVD equal
their dense definitions (the rank-2 methods: tests/structures/test_kron_rank2.py; two-level:
tests/structures/test_two_level_thesis.py; exact NG: tests/structures/test_dense_full.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import tensorcurv
from tensorcurv import optim, structures
from tensorcurv.experiments.config import validate_train
from tensorcurv.experiments.thesis_methods import THESIS_METHODS, THESIS_PROTOCOL, optimizer_kwargs
from tensorcurv.linalg.rearrange import rearrange
from tensorcurv.structures.dense import Dense

CONF = Path(__file__).resolve().parents[2] / "conf"
NAMES = sorted(THESIS_METHODS)


@pytest.mark.parametrize("name", NAMES)
def test_method_mirrors_its_curvature_preset(name):
    m = THESIS_METHODS[name]
    c = OmegaConf.to_container(OmegaConf.load(CONF / "curvature" / f"{m.config}.yaml"))
    assert c.pop("name") == m.structure
    c.pop("kind"), c.pop("damping")
    assert structures.make_hparams(m.structure, **c) == structures.make_hparams(m.structure, **m.hparams)


def test_protocol_mirrors_the_thesis_optim_preset():
    c = OmegaConf.to_container(OmegaConf.load(CONF / "optim" / "thesis_ng.yaml"))
    assert {k: c[k] for k in THESIS_PROTOCOL} == THESIS_PROTOCOL


@pytest.mark.parametrize("name", NAMES)
def test_method_composes_with_the_thesis_protocol(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["optim=thesis_ng", f"curvature={THESIS_METHODS[name].config}"])
    kw = validate_train(OmegaConf.to_container(cfg, resolve=True)).optimizer_kwargs()
    assert kw["structure"] == THESIS_METHODS[name].structure and kw["stats_fraction"] == 0.25


@pytest.mark.parametrize("name", NAMES)
def test_method_takes_finite_steps_on_a_tiny_bce_autoencoder(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 6)).double()
    x = torch.rand(16, 6, dtype=torch.float64)
    opt = optim.build("natural_gradient", model, nn.BCEWithLogitsLoss(), **optimizer_kwargs(name, stats_interval=2))
    losses = [float(opt.step(x, x)) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses) and not opt.info.get("skipped")


def _stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    return tensorcurv.Curvature(model, "diagonal", "ggn").capture(x, y, "cross_entropy").stats


def test_kfac_preset_is_the_kronecker_product_of_the_mean_factors():
    for st in _stats().values():
        a, g = st.a[:, 0], st.g[:, :, 0].reshape(-1, st.m)
        want = torch.kron(a.T @ a / st.N, st.scale * g.T @ g)
        got = structures.create("kfac", st.shape, **THESIS_METHODS["kfac"].hparams).fit(st).to_dense()
        assert float((got - want).norm() / want.norm()) < 1e-12


def test_kpsvd_preset_is_the_nearest_kronecker_product():
    # the sample-space route to its iteration cap: the power route stops once σ₁² stalls at rounding, which leaves
    # its factors ~1e-9 off (vector error ~ sqrt(energy error))
    hp = {**THESIS_METHODS["kpsvd"].hparams, "method": "gram", "tol": 1e-24, "max_iter": 200}
    for st in _stats().values():
        C = Dense(st.shape).fit(st).to_dense()
        R = rearrange(C, st.shape)
        U, S, Vh = torch.linalg.svd(R)
        m, n = st.shape
        want = (S[0] * torch.outer(U[:, 0], Vh[0])).reshape(n, n, m, m).permute(0, 2, 1, 3).reshape(n * m, n * m)
        got = structures.create("kpsvd", st.shape, **hp).fit(st).to_dense()
        assert float((got - want).norm() / want.norm()) < 1e-10
