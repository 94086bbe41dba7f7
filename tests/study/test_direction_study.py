"""Specifications of the direction study: its cosines and errors equal dense float64 linear algebra on a tiny
model, refinement with k = 0 is the structure's own solve, and a coupled preconditioner (two_level) gets no
Frobenius error borrowed from its base."""

import math

import pytest
import torch
from torch import nn

from tensorcurv import Curvature, structures
from tensorcurv.core.exact import ExactBlock, ExactModel
from tensorcurv.linalg import vec
from tensorcurv.study.direction_study import (
    EXACT_BLOCK_DIAGONAL,
    layer_direction_rows,
    model_direction_rows,
    reference_rows,
    refined_directions,
)
from tensorcurv.study.evaluate import evaluate
from tensorcurv.study.variants import make_variants

pytestmark = pytest.mark.usefixtures("float64_default")  # tensors default to float64 here

RHO = 1e-2  # λ = ρ·tr(C)/D: small enough that Ĉ and C give clearly different directions


def _capture():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    X, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    stats = Curvature(model, "diagonal", "ggn").capture(X, y, "cross_entropy").stats
    gen = torch.Generator().manual_seed(1)
    grads = {k: torch.randn(st.shape, generator=gen, dtype=torch.float64) for k, st in stats.items()}
    return stats, grads


STATS, GRADS = _capture()
KEYS = list(STATS)


def _dense_C():
    P = torch.cat([vec(STATS[k].per_sample_grads()) for k in KEYS], dim=1)
    return STATS[KEYS[0]].scale * P.T @ P


def _kfac():
    shapes = {k: st.shape for k, st in STATS.items()}
    return structures.get("kfac").for_model(shapes, structures.make_hparams("kfac")).fit(dict(STATS))


def _setup():
    """Exact model, flat g, λ, the dense exact direction and the model-level exact table."""
    op = ExactModel({k: ExactBlock(st) for k, st in STATS.items()})
    C = _dense_C()
    lam = RHO * float(C.trace()) / C.shape[0]
    g = op.flatten(GRADS)
    x = torch.linalg.solve(C + lam * torch.eye(C.shape[0]), g)
    return op, C, g, lam, x, {RHO: (lam, op.unflatten(x), {})}


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_whole_model_cosine_and_error_equal_a_dense_float64_solve():
    op, C, g, lam, x, exact = _setup()
    ms = _kfac()
    (row,) = model_direction_rows(ms.solve, op, GRADS, exact, [0])
    d = torch.linalg.solve(ms.to_dense() + lam * torch.eye(C.shape[0]), g)
    assert row["cos"] == pytest.approx(_cos(d, x), abs=1e-10)
    assert row["rel_err"] == pytest.approx(float((d - x).norm() / x.norm()), rel=1e-9)


def test_refined_direction_is_the_dense_krylov_minimizer_of_the_damped_quadratic():
    op, C, g, lam, x, exact = _setup()
    ms, k = _kfac(), 3
    (_, row) = model_direction_rows(ms.solve, op, GRADS, exact, [0, k])
    A = C + lam * torch.eye(C.shape[0])
    Pinv = torch.linalg.inv(ms.to_dense() + lam * torch.eye(C.shape[0]))
    basis = [Pinv @ g]
    for _ in range(k - 1):
        basis.append(Pinv @ A @ basis[-1])
    V = torch.linalg.qr(torch.stack(basis, 1))[0]
    d = V @ torch.linalg.solve(V.T @ A @ V, V.T @ g)  # argmin ½dᵀAd − gᵀd over the Krylov space
    assert row["refine_steps"] == k and row["cos"] == pytest.approx(_cos(d, x), abs=1e-8)


def test_layer_cosine_equals_a_dense_solve_on_the_layer_block():
    key = KEYS[0]
    st, g = STATS[key], GRADS[key]
    P = vec(st.per_sample_grads())
    C = st.scale * P.T @ P
    lam = RHO * float(C.trace()) / C.shape[0]
    x = torch.linalg.solve(C + lam * torch.eye(C.shape[0]), vec(g))
    S = _kfac().blocks[key]
    exact = {RHO: (lam, ExactBlock(st).solve(g, lam)[0], {})}
    (row,) = layer_direction_rows(S.solve, ExactBlock(st), g, exact, [0])
    d = torch.linalg.solve(S.to_dense() + lam * torch.eye(C.shape[0]), vec(g))
    assert row["cos"] == pytest.approx(_cos(d, x), abs=1e-10)


def test_refinement_with_zero_steps_is_the_unrefined_direction():
    op, _, g, lam, _, _ = _setup()
    ms = _kfac()
    d0 = op.flatten(ms.solve(op.unflatten(g), lam))
    out = refined_directions(lambda v: op.flatten(op.mv(op.unflatten(v))), lambda v: v, g, d0, lam, [0])
    assert torch.equal(out[0][0], d0) and out[0][1] == 0.0


def test_exact_block_diagonal_reference_equals_the_dense_block_diagonal_solve():
    op, C, g, lam, x, exact = _setup()
    sizes = [STATS[k].shape[0] * STATS[k].shape[1] for k in KEYS]
    mask = torch.block_diag(*[torch.ones(s, s) for s in sizes])
    d = torch.linalg.solve(C * mask + lam * torch.eye(C.shape[0]), g)
    row = next(r for r in reference_rows(op, op.blocks, GRADS, exact) if r["variant"] == EXACT_BLOCK_DIAGONAL)
    assert row["cos"] == pytest.approx(_cos(d, x), abs=1e-10)


@pytest.fixture(scope="module")
def kfac_and_two_level():
    variants = make_variants(["kfac", "two_level"])
    return evaluate(
        STATS, GRADS, variants, damping_rel=[RHO], direction_damping_rel=[RHO], refine_steps=[0, 2], spectral=False
    )


def test_two_level_reports_no_frobenius_error_of_its_base(kfac_and_two_level):
    model = {r["variant"]: r for r in kfac_and_two_level["metrics"] if r["layer"] == "(model)"}
    assert math.isfinite(model["kfac"]["fro_rel"]) and math.isnan(model["two_level"]["fro_rel"])


def test_two_level_has_whole_model_direction_rows_only(kfac_and_two_level):
    rows = [r for r in kfac_and_two_level["directions"] if r["variant"] == "two_level"]
    assert rows and {r["scope"] for r in rows} == {"model"}


def test_step_time_is_fit_plus_solve_plus_refinement(kfac_and_two_level):
    for r in kfac_and_two_level["directions"]:
        assert r["step_time"] == pytest.approx(r["fit_time"] + r["solve_time"] + r["refine_time"], rel=1e-12)


def test_an_extra_variant_is_a_structure_name_with_hparams():
    (v,) = make_variants([], extra=[{"structure": "kron_sum", "hparams": {"rank": 2}}])
    assert (v.structure, v.hparams, v.label) == ("kron_sum", {"rank": 2}, "kron_sum(rank=2)")


def test_two_level_is_not_drawn_in_the_frobenius_figure(kfac_and_two_level, tmp_path):
    pytest.importorskip("matplotlib")
    from tensorcurv.study.figures import fig_error_vs_memory

    rows = [{**r, "step": 0, "kind": "ggn"} for r in kfac_and_two_level["metrics"]]
    fig = fig_error_vs_memory(rows, tmp_path / "f.png")
    labels = [line.get_label() for ax in fig.axes for line in ax.lines]
    assert "kfac" in labels and "two_level" not in labels
