"""Model-level Curvature: coverage, fallbacks, whole-model solve and clear errors."""

import pytest
import torch
from torch import nn

import tensorcurv
from models_tiny import MODELS, batch
from reference import full_block
from tensorcurv import structures


class Mixed(nn.Module):
    """A covered Linear, an uncovered LayerNorm, a ConvTranspose2d (bias not foldable)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.ConvTranspose2d(2, 1, kernel_size=2, stride=2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.norm(torch.tanh(self.fc(x))).reshape(-1, 2, 2, 2)
        return self.head(torch.tanh(self.up(h)).flatten(1))


def test_coverage_lists_every_parameter_and_what_handles_it():
    curv = tensorcurv.Curvature(Mixed().double(), "kfac", "ggn")
    rows = {r["param"]: r for r in curv.coverage()}
    assert set(rows) == {n for n, _ in Mixed().named_parameters()}
    assert rows["fc.weight"]["handled_by"] == "kfac block"
    assert rows["norm.weight"]["handled_by"] == "fallback: identity"
    assert "no Kronecker adapter" in rows["norm.weight"]["why"]
    assert rows["up.weight"]["handled_by"] == "kfac block"
    assert rows["up.bias"]["handled_by"] == "fallback: identity"
    assert "norm.weight" in curv.coverage_table()


def test_identity_fallback_passes_uncovered_gradients_through_unchanged():
    model = Mixed().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    curv = tensorcurv.Curvature(model, "kfac", "ggn")
    curv.update(x, y, nn.CrossEntropyLoss())
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    out = curv.solve(grads, 1e-2)
    for n in ("norm.weight", "norm.bias", "up.bias"):
        assert torch.equal(out[n], grads[n])
    assert not torch.equal(out["fc.weight"], grads["fc.weight"])


@pytest.mark.parametrize("kind", ["empirical", "ggn"])
def test_diagonal_fallback_is_the_exact_diagonal_of_uncovered_parameters(kind):
    model = Mixed().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    curv = tensorcurv.Curvature(model, "kfac", kind, fallback="diagonal")
    curv.update(x, y, nn.CrossEntropyLoss())
    C, names, shapes = full_block(model, x, y, "cross_entropy", kind)
    diag, o = {}, 0
    for n, s in zip(names, shapes):
        k = torch.Size(s).numel()
        diag[n] = torch.diagonal(C)[o : o + k].reshape(s)
        o += k
    for n in ("norm.weight", "norm.bias", "up.bias"):
        assert torch.allclose(curv.fallback_diag[n], diag[n], rtol=1e-10, atol=1e-14)


def test_whole_model_solve_applies_each_block_to_its_own_parameters():
    model = MODELS["mlp"]()
    x, y = batch("mlp", "cross_entropy")
    curv = tensorcurv.Curvature(model, "kfac", "ggn")
    curv.update(x, y, nn.CrossEntropyLoss())
    grads = [torch.randn_like(p) for p in model.parameters()]
    out = curv.solve(grads, 1e-3)
    W = torch.cat([grads[0], grads[1].unsqueeze(1)], 1)
    expect = curv.blocks["0"].solve(W, 1e-3)
    assert torch.allclose(out[0], expect[:, :-1]) and torch.allclose(out[1], expect[:, -1])
    # p.grad path
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    assert all(torch.equal(a, b) for a, b in zip(curv.solve(None, 1e-3), out))


def test_unknown_structure_lists_valid_names():
    with pytest.raises(ValueError, match="valid structures: .*kfac"):
        tensorcurv.Curvature(MODELS["mlp"](), "kfca")


def test_unknown_hyperparameter_names_the_valid_ones():
    with pytest.raises(ValueError, match="damping_kind"):
        tensorcurv.Curvature(MODELS["mlp"](), "kfac", rank=3)


def test_invalid_hyperparameter_value_is_rejected_at_construction():
    with pytest.raises(ValueError, match="damping_kind='exact'"):
        tensorcurv.Curvature(MODELS["mlp"](), "kfac", damping_kind="exact")


def test_unknown_kind_and_bad_mc_samples_are_rejected():
    with pytest.raises(ValueError, match="valid kinds"):
        tensorcurv.Curvature(MODELS["mlp"](), "kfac", "fisher")
    with pytest.raises(ValueError, match="mc_samples"):
        tensorcurv.Curvature(MODELS["mlp"](), "kfac", "mc", mc_samples=0)


def test_negative_damping_is_rejected():
    model = MODELS["mlp"]()
    x, y = batch("mlp", "cross_entropy")
    curv = tensorcurv.Curvature(model, "kfac")
    curv.update(x, y, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="damping"):
        curv.solve([torch.zeros_like(p) for p in model.parameters()], -1.0)


def test_wrong_gradient_shape_is_rejected():
    model = MODELS["mlp"]()
    x, y = batch("mlp", "cross_entropy")
    curv = tensorcurv.Curvature(model, "kfac")
    curv.update(x, y, nn.CrossEntropyLoss())
    grads = [torch.zeros_like(p) for p in model.parameters()]
    grads[0] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        curv.solve(grads, 1e-3)
    with pytest.raises(ValueError, match="expected V of shape"):
        curv.blocks["0"].solve(torch.zeros(2, 2), 1e-3)


def test_solve_before_update_is_a_clear_error():
    model = MODELS["mlp"]()
    curv = tensorcurv.Curvature(model, "kfac")
    with pytest.raises(RuntimeError, match="no statistics yet"):
        curv.solve([torch.zeros_like(p) for p in model.parameters()], 1e-3)


def test_non_finite_statistics_raise_and_leave_blocks_untouched():
    model = MODELS["mlp"]()
    x, y = batch("mlp", "cross_entropy")
    curv = tensorcurv.Curvature(model, "kfac")
    curv.update(x, y, nn.CrossEntropyLoss())
    before = {k: v.clone() for k, v in curv.blocks["0"].tensors().items()}
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        curv.update(x_bad, y, nn.CrossEntropyLoss(), decay=0.9)
    for k, v in curv.blocks["0"].tensors().items():
        assert torch.equal(v, before[k])


def test_unsupported_loss_is_a_clear_error():
    model = MODELS["mlp"]()
    x, y = batch("mlp", "cross_entropy")
    curv = tensorcurv.Curvature(model, "kfac")
    with pytest.raises(TypeError, match="CrossEntropyLoss, nn.MSELoss"):
        curv.update(x, y, nn.NLLLoss())


def test_registry_lists_the_core_structures():
    assert {"dense", "diagonal", "kfac", "ekfac"} <= set(structures.names())
    with pytest.raises(ValueError, match="valid structures"):
        structures.get("nope")


def test_dense_refuses_blocks_that_would_exhaust_memory():
    with pytest.raises(ValueError, match="max_dim"):
        tensorcurv.Curvature(nn.Linear(200, 100), "dense")
