"""Dead units (ReLU layers that never fire) give zero or rank-deficient blocks: every fit route and PSD
mode handles them, a zero block solves to ``g / λ``, and a partly dead layer still reaches the optimum."""

import pytest
import torch
from torch import nn

import tensorcurv
from structure_problems import KINDS, rel
from tensorcurv.linalg.rearrange import rearrange

PSD = ["shrink", "factors", "none"]


def dead_relu_mlp(dead: int) -> nn.Module:
    """8-6-4 ReLU MLP in float64 whose first ``dead`` hidden units never fire (bias -100)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    with torch.no_grad():
        model[0].bias[:dead] = -100.0
    return model


def fitted(model: nn.Module, kind: str, structure: str = "kron_sum", **hp) -> tensorcurv.Curvature:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,), generator=g)
    curv = tensorcurv.Curvature(model, structure=structure, kind=kind, seed=0, **hp)
    curv.update(x, y, nn.CrossEntropyLoss())
    curv.update(x, y, nn.CrossEntropyLoss())  # the running-average path too
    return curv


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("psd", PSD)
@pytest.mark.parametrize("method", ["gram", "power"])
def test_a_zero_block_solves_to_the_gradient_over_the_damping(method, psd, kind):
    model = dead_relu_mlp(dead=6)  # layer 0's output gradients are all zero
    curv = fitted(model, kind, rank=2, psd=psd, method=method)
    grads = [torch.randn_like(p) for p in model.parameters()]
    out = curv.solve(grads, damping=1e-2)
    assert torch.equal(curv.blocks["0"].to_dense(), torch.zeros(54, 54, dtype=torch.float64))
    for d, g in zip(out[:2], grads[:2]):  # layer 0's weight and bias
        assert rel(d, g / 1e-2) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_a_partly_dead_layer_reaches_the_eckart_young_optimum(kind):
    model = dead_relu_mlp(dead=3)
    dense = fitted(model, kind, "dense")
    ks = fitted(model, kind, rank=2, psd="none", tol=1e-12, max_iter=200)
    for name, block in ks.blocks.items():
        C = dense.blocks[name].to_dense()
        s = torch.linalg.svdvals(rearrange(C, block.shape))
        assert rel(block.to_dense(), C) <= float(s[2:].pow(2).sum().sqrt() / C.norm()) * (1 + 1e-6) + 1e-12, name
