"""The exact curvature operator from per-sample factors equals torch.func's dense curvature (float64).

The references (tests/reference.py) use only torch.func, none of tensorcurv's capture or losses.
Tolerances: both sides are float64 sums of a few hundred products of O(1) numbers, so they agree to
~1e-13 relative; 1e-10 leaves room for the different summation orders.
"""

import pytest
import torch
from torch import nn

from reference import full_block, layer_block, layer_index
from tensorcurv import Curvature
from tensorcurv.core.exact import ExactBlock, ExactModel
from tensorcurv.linalg import unvec, vec

pytestmark = pytest.mark.usefixtures("float64_default")


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    return model, X, y


def _stats(model, X, y, kind):
    return Curvature(model, "diagonal", kind).capture(X, y, "cross_entropy").stats


def _dense_of(mv, m, n):
    """The matrix of ``V ↦ mv(V)`` on ``(m, n)`` matrices, in column-major ``vec`` coordinates."""
    return torch.stack([vec(mv(unvec(e, m, n))) for e in torch.eye(m * n)], 1)


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
@pytest.mark.parametrize("layer", ["0", "2"])
def test_block_product_equals_the_dense_curvature_block_of_the_mean_loss(kind, layer):
    model, X, y = _problem()
    st = _stats(model, X, y, kind)[layer]
    ref = layer_block(model, X, y, "cross_entropy", kind, layer)  # scale 1/N of the mean reduction included
    torch.testing.assert_close(_dense_of(ExactBlock(st).mv, *st.shape), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer", ["0", "2"])
def test_cached_output_ggn_product_equals_the_coefficient_product(layer):
    model, X, y = _problem()
    st = _stats(model, X, y, "ggn")[layer]
    V = torch.randn(st.shape)
    torch.testing.assert_close(
        ExactBlock(st, cache_output_ggn=True).mv(V), ExactBlock(st).mv(V), rtol=1e-12, atol=1e-14
    )


def test_to_dense_equals_the_dense_curvature_block():
    model, X, y = _problem()
    st = _stats(model, X, y, "ggn")["2"]
    ref = layer_block(model, X, y, "cross_entropy", "ggn", "2")
    torch.testing.assert_close(ExactBlock(st, chunk=2).to_dense(), ref, rtol=1e-10, atol=1e-12)


def _covered_dense(model, X, y, kind):
    """Dense curvature over the covered parameters in the layers' column-major [W, b] order."""
    C, names, shapes = full_block(model, X, y, "cross_entropy", kind)
    idx = torch.cat([layer_index(model, name, names, shapes) for name in ("0", "2")])
    return C[idx][:, idx]


def _model_dense(op):
    return _dense_of_flat(lambda v: op.flatten(op.mv(op.unflatten(v))), op.dim)


def _dense_of_flat(mv, dim):
    return torch.stack([mv(e) for e in torch.eye(dim)], 1)


def test_full_coupling_equals_the_dense_curvature_of_all_covered_parameters():
    model, X, y = _problem()
    op = ExactModel.from_stats(_stats(model, X, y, "ggn"), "full")
    torch.testing.assert_close(_model_dense(op), _covered_dense(model, X, y, "ggn"), rtol=1e-10, atol=1e-12)


def test_block_coupling_equals_the_block_diagonal_of_the_dense_curvature():
    model, X, y = _problem()
    op = ExactModel.from_stats(_stats(model, X, y, "ggn"), "block")
    C = _covered_dense(model, X, y, "ggn")
    d0 = op.blocks["0"].dim
    mask = torch.zeros_like(C, dtype=torch.bool)
    mask[:d0, :d0] = mask[d0:, d0:] = True
    torch.testing.assert_close(_model_dense(op), torch.where(mask, C, 0.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["woodbury", "dense", "cg"])
def test_block_solve_equals_the_dense_damped_solve(method):
    model, X, y = _problem()
    st = _stats(model, X, y, "ggn")["0"]
    ref_C = layer_block(model, X, y, "cross_entropy", "ggn", "0")
    V = torch.randn(st.shape)
    lam = 1e-2 * float(ref_C.trace()) / ref_C.shape[0]
    x, info = ExactBlock(st).solve(V, lam, method=method, tol=1e-13)
    ref = torch.linalg.solve(ref_C + lam * torch.eye(ref_C.shape[0]), vec(V))
    # cond(C + λI) ≤ 1 + ‖C‖/λ ≈ 1e3 here: a normwise error of 1e3·1e-13 covers the cg tolerance
    assert float((vec(x) - ref).norm() / ref.norm()) <= 1e-9
    assert info["method"] == method


def test_model_solve_equals_the_dense_damped_solve_with_cross_layer_blocks():
    model, X, y = _problem()
    op = ExactModel.from_stats(_stats(model, X, y, "ggn"))
    C = _covered_dense(model, X, y, "ggn")
    lam = 1e-2 * float(C.trace()) / C.shape[0]
    V = op.unflatten(torch.randn(op.dim))
    ref = torch.linalg.solve(C + lam * torch.eye(op.dim), op.flatten(V))
    for method in ("woodbury", "cg"):
        x, _ = op.solve(V, lam, method=method, tol=1e-13)
        assert float((op.flatten(x) - ref).norm() / ref.norm()) <= 1e-9, method


def test_statistics_of_different_captures_are_refused():
    model, X, y = _problem()
    a = _stats(model, X, y, "ggn")
    b = _stats(model, X[:5], y[:5], "ggn")
    with pytest.raises(ValueError, match="one capture"):
        ExactModel.from_stats({"0": a["0"], "2": b["2"]})
