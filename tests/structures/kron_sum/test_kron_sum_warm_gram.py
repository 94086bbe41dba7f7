"""Facts about the warm start of the sample-space Gram route of ``kronecker_svd`` / ``kron_sum``
(float64, tiny layers; dense reference: the rearranged block from per-sample gradients)."""

import pytest
import torch
from torch import nn

import tensorcurv
from tensorcurv import structures
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.rearrange import dense_rearranged, gram_warm_side, kronecker_svd

RANK_ONLY_SIDE = {"a": lambda A, G: (A, None), "g": lambda A, G: G}  # a pair with A only; the bare G stack


def linear_stats(seed, kind="empirical", N=80):
    """Block ``0`` (weight 10 x 13 with bias) of a 12-10-8 tanh MLP on batch ``seed``. Its right space
    (dim 55) is wider than the Gram block (16 columns), so a first block cannot span ``R(C)`` by chance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8)).double()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N, 12, generator=g, dtype=torch.float64), torch.randint(0, 8, (N,), generator=g)
    return tensorcurv.Curvature(model, "dense", kind).capture(x, y, nn.CrossEntropyLoss()).stats["0"]


def random_stats(N, n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, 1, n, generator=g, dtype=torch.float64)
    return LayerStats(a, torch.randn(N, 1, 1, m, generator=g, dtype=torch.float64), 1.0 / N)


def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("side", ["a", "g"])
@pytest.mark.parametrize("kind", ["empirical", "ggn"])
@pytest.mark.parametrize("rank", [2, 3])
def test_warm_started_gram_fit_from_the_previous_batch_reaches_the_eckart_young_optimum(rank, kind, side):
    _, A, G = kronecker_svd(linear_stats(1, kind=kind), rank, method="gram", generator=gen())  # previous step
    st = linear_stats(2, kind=kind)
    info = {}
    sigma, A, G = kronecker_svd(
        st, rank, method="gram", tol=1e-12, init=RANK_ONLY_SIDE[side](A, G), generator=gen(), info=info
    )
    assert info["warm_side"] == side and info["converged"]
    R = dense_rearranged(st)
    err = float((R - torch.einsum("k,ki,kj->ij", sigma, A.flatten(1), G.flatten(1))).norm())
    assert abs(err / float(torch.linalg.svdvals(R)[rank:].pow(2).sum().sqrt()) - 1) < 1e-6


@pytest.mark.parametrize("side", ["a", "g"])
def test_warm_start_from_the_same_batch_exact_fit_stops_after_two_blocks_where_the_cold_start_needs_more(side):
    st = linear_stats(1)
    sigma, A, G = kronecker_svd(st, 2, method="gram", tol=1e-14, max_iter=500, generator=gen())
    cold, warm = {}, {}
    kronecker_svd(st, 2, method="gram", tol=1e-10, generator=gen(), info=cold)
    kronecker_svd(
        st,
        2,
        method="gram",
        tol=1e-10,
        init=RANK_ONLY_SIDE[side](sigma[:, None, None] * A, G),
        generator=gen(),
        info=warm,
    )
    assert warm["warm_side"] == side and cold["warm_side"] == "cold"
    assert warm["iterations"] == 2 < cold["iterations"]  # two blocks: the least the per-pair rule compares


@pytest.mark.parametrize("side", ["a", "g"])
def test_first_warm_block_holds_the_optimal_energy_when_the_previous_factors_are_the_exact_ones(side):
    # side a: U Gw z_k = R Rᵀ vec(A_k)/scale² = σ_k² vec(A_k)/scale²; side g: U y_k = σ_k vec(A_k)/scale
    st = linear_stats(1, kind="ggn")
    energy = float(torch.linalg.svdvals(dense_rearranged(st))[:3].pow(2).sum())
    sigma, A, G = kronecker_svd(st, 3, method="gram", tol=1e-14, max_iter=500, generator=gen())
    info = {}
    kronecker_svd(st, 3, method="gram", init=RANK_ONLY_SIDE[side](A, G), generator=gen(), info=info)
    assert abs(info["energies"][0] / energy - 1) < 1e-12  # random factors instead: 3e-6 .. 1e-5 here


def test_the_benchmark_layers_warm_start_from_the_narrow_side_and_stay_cold_when_both_are_wide():
    # MLP 64-1024-1024-10, batch 2048, rank 4, block width 16: (m, n) = (1024, 65), (1024, 1025), (10, 1025)
    assert gram_warm_side(2048, 1, 65, 1024, 4, 16) == "a"  # r N n²/2 + N² 15 = 8e7 < one block 2 N² 16 = 1.3e8
    assert gram_warm_side(2048, 1, 1025, 10, 4, 16) == "g"  # r N m²/2 + N·110·11: 3e6
    assert gram_warm_side(2048, 1, 1025, 1024, 4, 16) == "cold"  # either side: r N 1024²/2 = 4.3e9 (4 K-FAC passes)
    assert gram_warm_side(2048, 1, 65, 1024, 4, 16, have_a=False) == "cold"  # a bare G stack: only the g side


@pytest.mark.parametrize("n,m,side", [(3, 12, "a"), (12, 3, "g"), (30, 30, "cold")])
def test_kron_sum_refit_maps_its_previous_factors_from_the_side_the_flop_rule_picks(n, m, side):
    # N = 40, r = 2, width 16; one block 16 N (min(N, n(n+1)) + min(N, m(m+1))): (3, 12): a 24360 < g 26560 < 33280;
    # (12, 3): g 6600 < a 12960 < 33280; (30, 30): a 60000, g 56800 > 51200 -> cold
    block = structures.create("kron_sum", (m, n), psd="shrink", rank=2, method="gram").fit(
        random_stats(40, n, m, seed=1)
    )
    assert not block.last_fit["warm_start"] and block.last_fit["warm_side"] == "cold"
    block.fit(random_stats(40, n, m, seed=2))
    assert block.last_fit["warm_start"] and block.last_fit["warm_side"] == side  # "a" needs the previous A
