"""``stats_fraction``: the curvature comes from the first ``⌈fN⌉`` samples, the gradient from the whole batch
(the thesis's MC Fisher on a quarter of the mini-batch). float64, exact ``dense`` blocks, tolerance 1e-12."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorcurv
import tensorcurv.optim as O
from optim_problems import cls_batch, mlp

pytestmark = pytest.mark.usefixtures("float64_default")


def test_statistics_come_from_the_first_quarter_and_the_step_from_the_whole_gradient():
    x, y = cls_batch(N=16)
    model, ref_model = mlp(), mlp()
    opt = O.GaussNewton(model, nn.CrossEntropyLoss(), structure="dense", lr=1.0, damping=0.1, stats_fraction=0.25)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(x, y)
    ref = tensorcurv.Curvature(ref_model, "dense", "ggn")
    ref.fit_stats(ref.capture(x[:4], y[:4], nn.CrossEntropyLoss()).stats)
    for name, block in opt.curvature.blocks.items():
        assert torch.allclose(block.to_dense(), ref.blocks[name].to_dense(), rtol=1e-12, atol=0)
    nn.CrossEntropyLoss()(ref_model(x), y).backward()
    want = ref.solve([p.grad for p in ref_model.parameters()], damping=0.1)
    for p, p0, d in zip(model.parameters(), before, want):
        assert torch.allclose(p0 - p.detach(), d, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.25])
def test_fraction_outside_the_unit_interval_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=r"^stats_fraction must be in \(0, 1\]"):
        O.NaturalGradient(mlp(), nn.CrossEntropyLoss(), stats_fraction=bad)
