"""Facts about the PSD-factor Kronecker-sum fit (:mod:`tensorcurv.structures.kron_sum.psd_factors`), float64, tiny
layers, dense ground truth from the ``dense`` structure."""

import pytest
import torch
from torch import nn

import tensorcurv
from structure_problems import tiny_batch, tiny_model
from tensorcurv.linalg.rearrange import RearrangedOperator, kronecker_svd
from tensorcurv.structures.kron_sum import psd_factors as P


def block_and_stats(model_name, kind="ggn", layer="0", n=10):
    model = tiny_model(model_name)
    x, y = tiny_batch(model_name, n)
    curv = tensorcurv.Curvature(model, structure="dense", kind=kind, seed=0)
    curv.update(x, y, nn.CrossEntropyLoss())
    return curv.blocks[layer].to_dense(), curv.capture(x, y, nn.CrossEntropyLoss()).stats[layer]


def rank_one(st):
    s, A, G = kronecker_svd(st, 1, tol=1e-14, max_iter=2000)
    return A[0] * s[0], G[0]


def dense(A, G):
    return sum(torch.kron(a, g) for a, g in zip(A, G))


def fits(st, route, ranks):
    A1, G1 = rank_one(st)
    for r in ranks:
        gen = torch.Generator().manual_seed(0)
        if route == "factors":
            yield r, P.fit_factors(st, A1, G1, r, 1e-10, 200, gen)
        else:
            yield r, P.fit_samples(st, A1, G1, r, 512, 1e-10, 200, gen)


@pytest.mark.parametrize("model_name,route", [("linear", "samples"), ("linear", "factors"), ("conv", "factors")])
def test_every_factor_and_the_sum_are_positive_semidefinite(model_name, route):
    C, st = block_and_stats(model_name)
    for r, (A, G) in fits(st, route, [2, 3]):
        for F in (*A, *G):
            assert float(torch.linalg.eigvalsh(F)[0]) >= -1e-12 * float(F.norm()), r
        assert float(torch.linalg.eigvalsh(dense(A, G))[0]) >= -1e-12 * float(C.norm()), r


@pytest.mark.parametrize("model_name,route", [("linear", "samples"), ("linear", "factors"), ("conv", "factors")])
def test_error_never_increases_with_the_rank_and_starts_at_the_rank_one_optimum(model_name, route):
    C, st = block_and_stats(model_name)
    A1, G1 = rank_one(st)
    errs = [float((torch.kron(A1, G1) - C).norm() / C.norm())]
    errs += [float((dense(A, G) - C).norm() / C.norm()) for _, (A, G) in fits(st, route, [1, 2, 3, 4])]
    assert errs[1] == pytest.approx(errs[0], rel=1e-9)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]


def test_psd_part_is_the_nearest_psd_matrix():
    M = torch.tensor([[1.0, 2.0], [2.0, -3.0]], dtype=torch.float64)
    X = P.psd_part(M)
    evals, V = torch.linalg.eigh(M)
    assert torch.allclose(X, (V * evals.clamp_min(0)) @ V.T, atol=1e-14)
    assert float(torch.linalg.eigvalsh(X)[0]) >= -1e-14


@pytest.mark.parametrize("model_name", ["linear", "conv"])
def test_kron_sum_psd_factors_fit_and_running_average_are_positive_semidefinite(model_name):
    C, st = block_and_stats(model_name)
    block = tensorcurv.structures.create("kron_sum", st.shape, rank=3, psd="factors").fit(st)
    assert float(torch.linalg.eigvalsh(block.to_dense())[0]) >= -1e-12 * float(C.norm())
    _, st2 = block_and_stats(model_name, kind="empirical")
    block.update(st2, 0.9)
    assert block.last_fit["recompressed"]
    assert float(torch.linalg.eigvalsh(block.to_dense())[0]) >= -1e-12 * float(C.norm())


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_kron_sum_psd_svd_max_iter_must_be_none_or_a_positive_integer(bad):
    with pytest.raises(ValueError, match="psd_svd_max_iter"):
        tensorcurv.structures.create("kron_sum", (4, 3), rank=2, psd="factors", psd_svd_max_iter=bad)


def test_kron_sum_psd_factors_rank_one_with_unlimited_power_iterations_is_the_rank_one_optimum():
    C, st = block_and_stats("linear")
    A1, G1 = rank_one(st)
    block = tensorcurv.structures.create(
        "kron_sum", st.shape, rank=1, psd="factors", method="power", psd_svd_max_iter=None, tol=1e-14, max_iter=2000
    ).fit(st)
    assert float((block.to_dense() - C).norm()) == pytest.approx(float((torch.kron(A1, G1) - C).norm()), rel=1e-9)


def test_atom_combinations_are_the_weighted_sums_of_the_atoms_outer_products():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(7, 3, 5, generator=gen, dtype=torch.float64)  # 7 atoms, K = 3 vectors each, d = 5
    w = torch.rand(7, 4, generator=gen, dtype=torch.float64).sub_(0.5).clamp_min_(0)  # sparse, nonnegative
    w[:, 2] = 0  # a term that uses no atom
    expected = torch.einsum("jk,jia,jib->kab", w, X, X)
    # float64 sums of at most 21 products of O(1) terms: rounding ~1e-15
    assert torch.allclose(P._atom_combinations(X, w), expected, rtol=0, atol=1e-12)


def test_atom_fit_reports_the_fitted_energy_of_the_factors_it_returns():
    _, st = block_and_stats("linear")
    A1, G1 = rank_one(st)
    info = {}
    A, G = P.fit_samples(st, A1, G1, 3, 512, 1e-3, 8, torch.Generator().manual_seed(0), info)
    op = RearrangedOperator(st)
    direct = 2 * float((op.rmatvec(A) * G).sum()) - float((P._inner(A, A) * P._inner(G, G)).sum())
    # the fit carries Ka α, Kg γ through its momentum steps instead of recomputing them: float64 rounding only
    assert info["fitted_energy"] == pytest.approx(direct, rel=1e-9)
