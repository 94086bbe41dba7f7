"""The K-FAC factors and the captured vectors they come from, against their definitions (float64, tiny models)."""

import pytest
import torch
from torch import nn

import tensorcurv
from models_tiny import MODELS, batch

LOSSES = {"cross_entropy": nn.CrossEntropyLoss(), "mse": nn.MSELoss()}


def stats_of(model_name, kind, loss="cross_entropy", accumulate_grad=False):
    model = MODELS[model_name]()
    x, y = batch(model_name, loss, n=7)
    curv = tensorcurv.Curvature(model, "kfac", kind, seed=0)
    return curv.capture(x, y, LOSSES[loss], accumulate_grad=accumulate_grad).stats


@pytest.mark.parametrize("kind", ["empirical", "mc", "ggn"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "sequence"])
def test_expand_factors_equal_the_mean_and_scaled_sum_of_outer_products(model_name, kind):
    for st in stats_of(model_name, kind).values():
        A, G = st.kron_factors("expand")
        assert torch.allclose(A, torch.einsum("stn,stp->np", st.a, st.a) / (st.N * st.T), rtol=0, atol=1e-14)
        assert torch.allclose(G, st.scale * torch.einsum("sktm,sktp->mp", st.g, st.g), rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", ["empirical", "ggn"])
def test_reduce_factors_use_the_position_mean_of_a_and_the_position_sum_of_g(kind):
    for st in stats_of("sequence", kind).values():
        A, G = st.kron_factors("reduce")
        a, g = st.a.mean(1), st.g.sum(2)
        assert torch.allclose(A, a.T @ a / st.N, rtol=0, atol=1e-14)
        assert torch.allclose(G, st.scale * torch.einsum("skm,skp->mp", g, g), rtol=0, atol=1e-14)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_empirical_vectors_are_the_same_with_and_without_the_parameter_gradient(loss):
    # two code paths: one backward shared with ∂L/∂θ (divided by c), or the backward of ⟨f, ∂ℓ/∂f⟩
    plain, with_grad = stats_of("cnn", "empirical", loss), stats_of("cnn", "empirical", loss, accumulate_grad=True)
    for name, st in plain.items():
        assert torch.allclose(st.g, with_grad[name].g, rtol=1e-12, atol=1e-15)


def test_ggn_vectors_have_one_column_per_rank_of_the_output_hessian_and_reproduce_it():
    # the output layer: g_sk = S_s[:, k], so Σ_k g gᵀ = ∇²ℓ_s = diag(p) − p pᵀ, of rank C − 1 = 2
    st = stats_of("mlp", "ggn")["2"]
    model = MODELS["mlp"]()
    x, _ = batch("mlp", "cross_entropy", n=7)
    p = model(x).softmax(-1)
    H = torch.einsum("skm,skp->smp", st.g[:, :, 0], st.g[:, :, 0])
    assert st.K == 2
    assert torch.allclose(H, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], rtol=0, atol=1e-15)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_output_factor_is_the_g_of_kron_factors(weight_sharing):
    for st in stats_of("sequence", "ggn").values():  # T > 1: the two weight-sharing modes differ
        assert torch.equal(st.output_factor(weight_sharing), st.kron_factors(weight_sharing)[1])  # the same gemm
