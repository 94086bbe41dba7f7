"""Specifications of the study metrics and the exact block: implicit identities equal dense computations (float64)."""

import math

import pytest
import torch
from torch import nn

from tensorcurv import Curvature, structures
from tensorcurv.core.exact import ExactBlock, ExactModel
from tensorcurv.linalg import vec
from tensorcurv.structures import generic
from tensorcurv.study.directions import inverse_quality
from tensorcurv.study.frobenius import frobenius_error, kronecker_floor
from tensorcurv.study.spectral import asymmetry, spectral_error
from tensorcurv.study.structure_norms import frobenius_sq, inner_with_exact

pytestmark = pytest.mark.usefixtures("float64_default")  # tensors default to float64 here


def _tiny_stats(kind="ggn", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)
    ).double()
    X, y = torch.randn(7, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    curv = Curvature(model, "diagonal", kind, mc_samples=2, seed=seed)
    return curv.capture(X, y, "cross_entropy").stats


STATS = _tiny_stats()
LAYERS = {"conv2d": "0", "linear_bias": "3", "linear_nobias": "5"}


def _layer_structures():
    seen, out = set(), []
    for name in structures.names():
        cls = structures.get(name)
        if cls in seen or name not in structures.layer_names():
            continue
        seen.add(cls)
        out.append(name)
    return out


def _fit(name, stats):
    try:
        return structures.create(name, stats.shape).fit(stats)
    except ValueError as err:  # a structure that cannot handle this shape with default hparams
        pytest.skip(f"{name} on {stats.shape}: {err}")


def _dense_C(stats):
    P = vec(stats.per_sample_grads())
    return stats.scale * P.T @ P


def test_to_dense_is_scaled_sum_of_per_sample_gradient_outer_products():
    st = STATS["0"]
    assert torch.allclose(ExactBlock(st, chunk=3).to_dense(), _dense_C(st), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("chunk", [2, 128])
def test_exact_frobenius_norm_equals_dense(layer, chunk):
    st = STATS[LAYERS[layer]]
    C = _dense_C(st)
    assert ExactBlock(st, chunk=chunk).frobenius_sq() == pytest.approx(float(C.pow(2).sum()), rel=1e-10)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_trace_and_diagonal_equal_dense(layer):
    st = STATS[LAYERS[layer]]
    C, block = _dense_C(st), ExactBlock(st, chunk=3)
    assert block.trace() == pytest.approx(float(C.trace()), rel=1e-12)
    assert torch.allclose(vec(block.diagonal()), C.diagonal(), rtol=1e-12)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_exact_eigenvalues_from_gram_equal_dense_spectrum(layer):
    st = STATS[LAYERS[layer]]
    dense = torch.linalg.eigvalsh(_dense_C(st)).flip(0).clamp_min(0)
    ev = ExactBlock(st).eigenvalues()
    k = min(len(dense), len(ev))
    assert torch.allclose(ev[:k], dense[:k], rtol=1e-9, atol=1e-12 * float(dense[0]))


@pytest.mark.parametrize("layer", list(LAYERS))
def test_implicit_mv_equals_dense_product(layer):
    st = STATS[LAYERS[layer]]
    V = torch.randn(st.shape)
    assert torch.allclose(vec(ExactBlock(st).mv(V)), _dense_C(st) @ vec(V), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", _layer_structures())
@pytest.mark.parametrize("layer", list(LAYERS))
def test_inner_product_and_structure_norm_equal_dense(name, layer):
    st = STATS[LAYERS[layer]]
    S = _fit(name, st)
    C, Ch = _dense_C(st), S.to_dense()
    block = ExactBlock(st, chunk=3)
    assert inner_with_exact(S, block) == pytest.approx(float((C * Ch).sum()), rel=1e-10)
    assert frobenius_sq(S) == pytest.approx(float(Ch.pow(2).sum()), rel=1e-10)


@pytest.mark.parametrize("name", _layer_structures())
@pytest.mark.parametrize("layer", list(LAYERS))
def test_frobenius_error_equals_dense(name, layer):
    st = STATS[LAYERS[layer]]
    S = _fit(name, st)
    C, Ch = _dense_C(st), S.to_dense()
    out = frobenius_error(S, ExactBlock(st))
    # squared error to 1e-10 of ‖C‖² (the error itself may be ~0 for exact structures)
    assert out["fro_abs"] ** 2 == pytest.approx(float((C - Ch).pow(2).sum()), abs=1e-10 * float(C.pow(2).sum()))


@pytest.mark.parametrize("name", ["kfac", "ekfac", "diagonal", "dense", "kron_sum"])
def test_structure_closed_forms_equal_the_generic_paths_through_mv(name):
    st = STATS["3"]
    S = _fit(name, st)
    block = ExactBlock(st, chunk=2)
    generic_inner = block.scale * sum(float((G * torch.stack([S.mv(g) for g in G])).sum()) for G in block.grad_chunks())
    assert inner_with_exact(S, block) == pytest.approx(generic_inner, rel=1e-12)
    assert frobenius_sq(S) == pytest.approx(generic.frobenius_sq(S, dense_max_dim=0), rel=1e-12)


@pytest.mark.parametrize("name", _layer_structures())
@pytest.mark.parametrize("layer", list(LAYERS))
def test_spectral_error_equals_dense(name, layer):
    st = STATS[LAYERS[layer]]
    S = _fit(name, st)
    C = _dense_C(st)
    ref = float(torch.linalg.matrix_norm(C - S.to_dense(), 2))  # largest singular value
    got = spectral_error(S, ExactBlock(st), max_iter=400, tol=1e-12)
    assert got["spec_abs"] == pytest.approx(ref, rel=1e-8, abs=1e-10 * float(torch.linalg.matrix_norm(C, 2)))


def test_asymmetry_is_zero_for_symmetric_and_positive_for_non_symmetric_operators():
    st = STATS["3"]
    S = _fit("dense", st)
    assert asymmetry(S) < 1e-12
    S.C = S.C + 1e-3 * torch.triu(torch.ones_like(S.C)) * S.C.abs().max()
    assert asymmetry(S) > 1e-6


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("rho", [1e-3, 1.0])
def test_cg_and_woodbury_exact_solves_equal_dense_solve(layer, rho):
    st = STATS[LAYERS[layer]]
    block = ExactBlock(st)
    V = torch.randn(st.shape, generator=torch.Generator().manual_seed(0))  # independent of other tests' RNG use
    lam = rho * block.trace() / block.dim
    x_cg, info = block.solve(V, lam, method="cg", tol=1e-12)
    x_dense, _ = block.solve(V, lam, method="dense")
    x_wood, _ = block.solve(V, lam, method="woodbury")
    ref = torch.linalg.solve(_dense_C(st) + lam * torch.eye(block.dim), vec(V))

    def rel(x, y):  # normwise: backward-stable solves agree to ~cond·eps (cond ≤ 1/rho·dim here), not entrywise
        return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y))

    assert info["residual"] <= 1e-12
    assert rel(vec(x_dense), ref) <= 1e-9
    assert rel(x_cg, x_dense) <= 1e-8
    assert rel(x_wood, x_dense) <= 1e-8


def test_inverse_quality_of_dense_structure_is_perfect():
    st = STATS["3"]
    S = _fit("dense", st)
    rows = inverse_quality(S, ExactBlock(st), torch.randn(st.shape), [1e-2, 1.0], method="cg")
    for r in rows:
        assert r["cos"] == pytest.approx(1.0, abs=1e-9) and r["rel_err"] < 1e-7


def test_model_operator_includes_off_diagonal_blocks():
    blocks = {k: ExactBlock(v) for k, v in STATS.items()}
    model = ExactModel(blocks)
    keys = list(blocks)
    P = torch.cat([vec(STATS[k].per_sample_grads()) for k in keys], dim=1)
    C = STATS[keys[0]].scale * P.T @ P
    assert model.frobenius_sq() == pytest.approx(float(C.pow(2).sum()), rel=1e-10)
    V = {k: torch.randn(STATS[k].shape) for k in keys}
    out = model.mv(V)
    ref = C @ torch.cat([vec(V[k]) for k in keys])
    assert torch.allclose(torch.cat([vec(out[k]) for k in keys]), ref, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("rho", [1e-3, 1.0])
def test_model_exact_solve_woodbury_and_cg_equal_dense(rho):
    model = ExactModel({k: ExactBlock(v) for k, v in STATS.items()})
    keys = list(STATS)
    P = torch.cat([vec(STATS[k].per_sample_grads()) for k in keys], dim=1)
    C = STATS[keys[0]].scale * P.T @ P
    lam = rho * float(C.trace()) / C.shape[0]
    V = {k: torch.randn(STATS[k].shape) for k in keys}
    ref = torch.linalg.solve(C + lam * torch.eye(C.shape[0]), torch.cat([vec(V[k]) for k in keys]))
    for method in ("woodbury", "cg"):
        x, _ = model.solve(V, lam, method=method, tol=1e-12)
        got = torch.cat([vec(x[k]) for k in keys])
        assert torch.allclose(got, ref, rtol=1e-8, atol=1e-9 * float(ref.abs().max())), method


@pytest.mark.parametrize("layer", list(LAYERS))
def test_floor_equals_dense_svd_tail_of_rearranged_block(layer):
    st = STATS[LAYERS[layer]]
    m, n = st.shape
    C = _dense_C(st)
    # independent rearrangement: C[(j m + i), (j' m + i')] -> R[(j, j'), (i, i')], R(A⊗G) = vec(A) vec(G)ᵀ
    R = C.reshape(n, m, n, m).permute(0, 2, 1, 3).reshape(n * n, m * m)
    sig = torch.linalg.svdvals(R)
    cc = float(C.pow(2).sum())
    ranks = [1, 2, 3]
    got = kronecker_floor(ExactBlock(st), ranks)
    for r in ranks:
        ref = math.sqrt(max(float(sig[r:].pow(2).sum()), 0.0) / cc)
        # floor = sqrt(‖C‖² − Σσ²)/‖C‖: the subtraction leaves ~sqrt(eps) ≈ 1e-8 absolute where the tail is 0
        assert got[r] == pytest.approx(ref, rel=1e-8, abs=1e-7)


def test_kfac_never_beats_the_rank_one_floor():
    for st in STATS.values():
        block = ExactBlock(st)
        assert frobenius_error(_fit("kfac", st), block)["fro_rel"] >= kronecker_floor(block, [1])[1] - 1e-9
