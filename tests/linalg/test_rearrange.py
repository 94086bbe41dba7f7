"""Facts about the implicit Van Loan rearrangement R(C) and its truncated SVD (float64, tiny layers)."""

import pytest
import torch

from structure_problems import KINDS, curvature, rel
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.rearrange import (
    RearrangedOperator,
    dense_rearranged,
    gram_operator,
    kronecker_svd,
    rearrange,
    sample_grams,
    sym_gram,
    sym_quadratic_forms,
    weighted_covariances,
)


def test_rearranged_kronecker_product_is_the_outer_product_of_the_vectorized_factors():
    A, G = torch.randn(4, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    R = rearrange(torch.kron(A, G), (3, 4))
    assert torch.allclose(R, torch.outer(A.reshape(-1), G.reshape(-1)), atol=1e-14)


@pytest.mark.parametrize("model_name,layer", [("linear", "0"), ("linear", "2"), ("conv", "0"), ("conv", "2")])
@pytest.mark.parametrize("kind", KINDS)
def test_dense_rearranged_equals_the_rearranged_dense_block(model_name, layer, kind):
    curv, stats = curvature(model_name, kind)
    C = curv.blocks[layer].to_dense()
    assert rel(dense_rearranged(stats[layer]), rearrange(C, stats[layer].shape)) < 1e-12


@pytest.mark.parametrize("path", ["samples", "positions", "grads"])
@pytest.mark.parametrize("kind", ["empirical", "ggn"])
def test_matvec_and_rmatvec_equal_products_with_the_dense_rearranged_block(path, kind):
    model_name = "linear" if path == "samples" else "conv"
    curv, stats = curvature(model_name, kind)
    st = stats["0"]
    op = RearrangedOperator(st, max_elems=64)  # tiny chunks: exercises the chunk loop
    op.path = path
    R = rearrange(curv.blocks["0"].to_dense(), st.shape)
    X = torch.randn(2, st.m, st.m, dtype=torch.float64)
    Y = torch.randn(2, st.n, st.n, dtype=torch.float64)
    assert rel(op.matvec(X).reshape(2, -1), X.reshape(2, -1) @ R.T) < 1e-12
    assert rel(op.rmatvec(Y).reshape(2, -1), Y.reshape(2, -1) @ R) < 1e-12
    assert op.products == 4


def test_sample_grams_give_the_frobenius_norm_of_the_block():
    curv, stats = curvature("linear", "ggn")
    Gu, Gw = sample_grams(stats["0"])
    C = curv.blocks["0"].to_dense()
    assert abs(float((Gu * Gw).sum()) * stats["0"].scale ** 2 / float(C.pow(2).sum()) - 1) < 1e-12


@pytest.mark.parametrize("method", ["power", "gram"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_kronecker_svd_singular_values_equal_the_dense_svd(method, rank):
    curv, stats = curvature("linear", "ggn")
    st = stats["0"]
    s_ref = torch.linalg.svdvals(rearrange(curv.blocks["0"].to_dense(), st.shape))
    info = {}
    sigma, A, G = kronecker_svd(st, rank, method=method, tol=1e-15, max_iter=2000, oversample=3, info=info)
    assert info["method"] == method and info["converged"]
    assert torch.allclose(sigma, s_ref[:rank], rtol=1e-9, atol=0)
    C_hat = sum(s * torch.kron(a, g) for s, a, g in zip(sigma, A, G))
    err = float((curv.blocks["0"].to_dense() - C_hat).norm())
    assert abs(err / float(s_ref[rank:].pow(2).sum().sqrt()) - 1) < 1e-8


@pytest.mark.parametrize("model_name", ["linear", "conv"])
def test_kronecker_svd_factor_pairs_are_symmetric_or_antisymmetric_with_unit_norm(model_name):
    _, stats = curvature(model_name, "empirical")
    sigma, A, G = kronecker_svd(stats["0"], 3, tol=1e-12, max_iter=500)
    for a, g in zip(A, G):
        s = 1.0 if torch.allclose(a, a.T) else -1.0  # T = 1: always symmetric
        assert torch.allclose(a, s * a.T, atol=1e-13) and torch.allclose(g, s * g.T, atol=1e-13)
        assert s == 1.0 or model_name == "conv"
    assert torch.allclose(A.flatten(1).norm(dim=1), torch.ones(3, dtype=A.dtype))
    assert (torch.diagonal(A, dim1=-2, dim2=-1).sum(-1) >= 0).all()


def test_warm_started_power_iteration_from_converged_factors_stops_after_one_iteration():
    _, stats = curvature("linear", "empirical")
    _, _, G = kronecker_svd(stats["0"], 1, method="power", tol=1e-14, max_iter=1000)
    info = {}
    kronecker_svd(stats["0"], 1, method="power", tol=1e-10, init=G, info=info)
    assert info["iterations"] == 1 and info["products"] == 2


def test_kronecker_svd_rejects_a_rank_above_the_rearranged_dimensions():
    _, stats = curvature("linear", "empirical")
    with pytest.raises(ValueError, match="rank must be an integer in"):
        kronecker_svd(stats["2"], 26)


def test_sym_gram_equals_the_sample_product_and_is_exactly_symmetric():
    X = torch.randn(390, 50, dtype=torch.float64)
    M = sym_gram(X)
    assert torch.allclose(M, X @ X.T, rtol=0, atol=1e-12)
    assert torch.equal(M, M.T)


def test_weighted_covariances_equal_their_definition_and_are_exactly_symmetric():
    X = torch.randn(40, 300, dtype=torch.float64)
    W = torch.randn(40, 3, dtype=torch.float64)
    ref = torch.einsum("sk,si,sj->kij", W, X, X)
    out = weighted_covariances(X, W)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert torch.equal(out, out.mT)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("d", [4, 40])  # d(d+1)/2 = 10 <= N/2: factored; 820 > N/2: formed
def test_gram_operator_applies_the_sample_gram_of_the_summed_outer_products(K, d):
    X = torch.randn(60, K, d, dtype=torch.float64)
    S = torch.einsum("ski,skj->sij", X, X)
    M = torch.einsum("sij,tij->st", S, S)
    C = torch.randn(60, 5, dtype=torch.float64)
    assert rel(gram_operator(X, max_elems=3000)(C), M @ C) < 1e-13  # K = 3: chunks of 5 samples


def test_sym_quadratic_forms_equal_their_definition():
    X = torch.randn(30, 300, dtype=torch.float64)
    M = torch.randn(300, 300, dtype=torch.float64)
    M = M + M.T
    assert torch.allclose(sym_quadratic_forms(X, M), torch.einsum("si,ij,sj->s", X, M, X), rtol=0, atol=1e-10)


def test_unweighted_covariance_is_the_plain_product():
    X = torch.randn(40, 300, dtype=torch.float64)
    assert torch.allclose(weighted_covariances(X, None)[0], X.T @ X, rtol=0, atol=1e-12)


def test_single_products_of_wide_layers_equal_their_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 1, 300, generator=g, dtype=torch.float64)
    gr = torch.randn(20, 2, 1, 260, generator=g, dtype=torch.float64)  # K = 2
    st = LayerStats(a, gr, scale=0.05)
    op = RearrangedOperator(st)
    X = torch.randn(260, 260, generator=g, dtype=torch.float64)  # not symmetric: only its symmetric part acts
    Y = torch.randn(300, 300, generator=g, dtype=torch.float64)
    w = torch.einsum("skm,ml,skl->s", gr[:, :, 0], X, gr[:, :, 0]) * 0.05
    v = torch.einsum("sn,nl,sl->s", a[:, 0], Y, a[:, 0]) * 0.05
    assert rel(op.matvec(X), torch.einsum("s,si,sj->ij", w, a[:, 0], a[:, 0])) < 1e-12
    assert rel(op.rmatvec(Y), torch.einsum("s,ski,skj->ij", v, gr[:, :, 0], gr[:, :, 0])) < 1e-12
