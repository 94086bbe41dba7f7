"""Binary cross-entropy with logits (``nn.BCEWithLogitsLoss``, a Bernoulli likelihood per output).

Exact facts are checked against ``torch.func`` float64 references (``reference.py``): the GGN
``c Σ_s J_sᵀ H_s J_s`` with ``H_s`` the autodiff Hessian of torch's own per-sample loss in the
logits, and the empirical Fisher from per-sample autodiff gradients. Both sides are float64 and
differ only by summation order, so agreement to 1e-10 (relative, Frobenius) is round-off with
several orders of margin; a wrong ``ρ`` or a missing square root is off by >= 2/3.
"""

import math

import pytest
import torch
from torch import nn
from torch.func import grad, hessian

import tensorcurv
from models_tiny import MODELS, batch
from reference import layer_block
from tensorcurv import structures
from tensorcurv.core.losses import BinaryCrossEntropyWithLogits, as_loss_spec

CASES = [("mlp", "mlp"), ("mlp_nobias", "mlp"), ("cnn", "cnn"), ("deconv", "deconv"), ("sequence", "sequence")]
LOSS = "bce_with_logits"


def rel(a, b):
    return float((a - b).norm() / b.norm())


def logits_and_targets(n=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, c, generator=g, dtype=torch.float64), torch.rand(n, c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["empirical", "ggn"])
@pytest.mark.parametrize("model_name,data", CASES)
def test_dense_block_equals_torch_func_reference(model_name, data, kind, reduction):
    model = MODELS[model_name]()
    x, y = batch(data, LOSS)
    curv = tensorcurv.Curvature(model, "dense", kind)
    curv.update(x, y, nn.BCEWithLogitsLoss(reduction=reduction))
    for name, block in curv.blocks.items():
        ref = layer_block(model, x, y, LOSS, kind, name, reduction=reduction)
        assert rel(block.to_dense(), ref) < 1e-10, name


@pytest.mark.parametrize("kind", ["empirical", "ggn"])
def test_hard_zero_one_targets_give_the_reference_block(kind):
    model = MODELS["mlp"]()
    x, soft = batch("mlp", LOSS)
    y = (soft > 0.5).to(soft.dtype)
    curv = tensorcurv.Curvature(model, "dense", kind)
    curv.update(x, y, nn.BCEWithLogitsLoss())
    for name, block in curv.blocks.items():
        assert rel(block.to_dense(), layer_block(model, x, y, LOSS, kind, name)) < 1e-10


@pytest.mark.parametrize("kind", ["empirical", "ggn"])
def test_image_outputs_with_image_targets_give_the_reference_block_of_the_flattened_loss(kind):
    # a convolutional decoder's (N, 1, 4, 4) logits against (N, 1, 4, 4) targets in [0, 1]: the loss
    # is over the N·16 pixels, i.e. the per-sample loss of the flattened outputs (ρ = 1/16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, padding=1)).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.rand(5, 1, 4, 4, generator=g, dtype=torch.float64)
    curv = tensorcurv.Curvature(model, "dense", kind)
    value = curv.update(x, y, nn.BCEWithLogitsLoss())
    assert float(value) == pytest.approx(float(nn.BCEWithLogitsLoss()(model(x), y)), rel=1e-14)
    for name, block in curv.blocks.items():
        assert rel(block.to_dense(), layer_block(model, x, y.flatten(1), LOSS, kind, name)) < 1e-10, name


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hessian_factor_squares_to_the_autodiff_hessian_of_the_per_sample_loss(reduction):
    z, y = logits_and_targets()
    spec = BinaryCrossEntropyWithLogits(reduction)
    S = spec.hessian_factor(z)

    def ell(zs, ys):
        return torch.nn.functional.binary_cross_entropy_with_logits(zs, ys, reduction=reduction)

    for s in range(z.shape[0]):
        H = hessian(ell)(z[s], y[s])
        assert rel(S[s] @ S[s].T, H) < 1e-13


def test_hessian_factor_is_diagonal_sqrt_p_one_minus_p_scaled_by_rho():
    z, _ = logits_and_targets(c=4)
    p = torch.sigmoid(z)
    S = BinaryCrossEntropyWithLogits("mean").hessian_factor(z)
    torch.testing.assert_close(S, torch.diag_embed((p * (1 - p) / 4).sqrt()), rtol=1e-14, atol=0)


def test_hessian_factor_stays_finite_and_nonnegative_for_saturated_logits():
    z = torch.tensor([[40.0, -40.0, 800.0, -800.0]], dtype=torch.float64)
    S = BinaryCrossEntropyWithLogits("sum").hessian_factor(z)
    assert torch.isfinite(S).all() and (S >= 0).all()
    assert float(S[0, 0, 0]) == pytest.approx(math.exp(-20), rel=1e-12)  # √(σ(40)σ(−40)) ≈ e^{−20}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_output_gradient_is_the_autodiff_gradient_of_the_per_sample_loss(reduction):
    z, y = logits_and_targets()
    spec = BinaryCrossEntropyWithLogits(reduction)

    def ell(zs, ys):
        return torch.nn.functional.binary_cross_entropy_with_logits(zs, ys, reduction=reduction)

    ref = torch.stack([grad(ell)(z[s], y[s]) for s in range(z.shape[0])])
    assert rel(spec.output_gradient(z, y), ref) < 1e-14


def test_loss_value_equals_torch_bce_with_logits_for_both_reductions():
    z, y = logits_and_targets()
    for reduction in ("mean", "sum"):
        ref = nn.BCEWithLogitsLoss(reduction=reduction)(z, y)
        assert float(as_loss_spec(nn.BCEWithLogitsLoss(reduction=reduction))(z, y)) == pytest.approx(
            float(ref), rel=1e-14
        )


def test_sum_reduction_draws_are_bernoulli_zero_one_labels_with_mean_p():
    # 40,000 draws per output: the standard error of the mean is ≤ 0.5/200 = 0.0025; 0.015 is 6σ
    z = torch.tensor([[-1.5, 0.0, 2.0]], dtype=torch.float64).expand(40_000, 3)
    y = BinaryCrossEntropyWithLogits("sum").sample_targets(z, torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(y.mean(0), torch.sigmoid(z[0]), atol=0.015, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sampled_output_gradients_have_the_loss_hessian_as_second_moment(reduction):
    # E[∇ℓ(z, ŷ) ∇ℓ(z, ŷ)ᵀ] = H = ρ diag(p(1−p)). With n = 200,000 draws the relative standard
    # error of a diagonal entry is ≤ 1/√(p(1−p) n) ≈ 0.006 for p ∈ [0.18, 0.88]; off-diagonals have
    # mean 0 and standard error ≈ √(p₁q₁p₂q₂/n) ≤ H_max/√n. 0.03 (relative to the largest entry) is ≥ 5σ.
    n = 200_000
    z = torch.tensor([[-1.5, 0.3, 2.0]], dtype=torch.float64)
    spec = BinaryCrossEntropyWithLogits(reduction)
    Z = z.expand(n, 3)
    G = spec.output_gradient(Z, spec.sample_targets(Z, torch.Generator().manual_seed(1)))
    second_moment = G.T @ G / n
    S = spec.hessian_factor(z)[0]
    H = S @ S.T
    assert float((second_moment - H).abs().max() / H.abs().max()) < 0.03


def test_monte_carlo_fisher_converges_to_ggn():
    # the MC Fisher with k draws has relative error O(1/√k); as for cross-entropy (test_capture_dense),
    # 8 % at k = 4000 fails for a wrong scale (off by ≥ 1 − 1/3 with ρ = 1/3 mishandled)
    model = MODELS["mlp"]()
    x, y = batch("mlp", LOSS)
    ggn = tensorcurv.Curvature(model, "dense", "ggn")
    ggn.update(x, y, nn.BCEWithLogitsLoss())
    errs = []
    for k in (40, 4000):
        mc = tensorcurv.Curvature(model, "dense", "mc", mc_samples=k, seed=0)
        mc.update(x, y, nn.BCEWithLogitsLoss())
        errs.append(max(rel(mc.blocks[n].to_dense(), ggn.blocks[n].to_dense()) for n in ggn.blocks))
    assert errs[1] < 0.08
    assert errs[1] < errs[0] / 3


@pytest.mark.parametrize("kind", ["ggn", "mc", "empirical"])
@pytest.mark.parametrize("structure", structures.names())
def test_every_structure_fits_and_solves_with_bce(structure, kind):
    model = MODELS["mlp"]()
    x, y = batch("mlp", LOSS, n=7)
    curv = tensorcurv.Curvature(model, structure, kind, seed=0)
    value = curv.update(x, y, nn.BCEWithLogitsLoss())
    assert torch.allclose(value, nn.BCEWithLogitsLoss()(model(x), y), rtol=1e-13, atol=0)
    grads = [torch.randn_like(p) for p in model.parameters()]
    out = curv.solve(grads, damping=1e-2)
    assert all(torch.isfinite(o).all() for o in out)


def test_the_name_and_the_module_map_to_the_same_spec():
    assert isinstance(as_loss_spec("bce_with_logits"), BinaryCrossEntropyWithLogits)
    assert as_loss_spec(nn.BCEWithLogitsLoss(reduction="sum")).reduction == "sum"


def test_weights_are_refused_rather_than_ignored():
    with pytest.raises(ValueError, match="pos_weight"):
        as_loss_spec(nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)))
    with pytest.raises(ValueError, match="weight"):
        as_loss_spec(nn.BCEWithLogitsLoss(weight=torch.ones(3)))


def test_integer_targets_are_refused():
    z, _ = logits_and_targets()
    with pytest.raises(ValueError, match="floating point"):
        BinaryCrossEntropyWithLogits().per_sample(z, torch.zeros(5, 4, dtype=torch.int64))
