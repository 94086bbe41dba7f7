"""Exact GGN from the captured statistics, closed-form gradients, and structure-preconditioned refinement."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

from reference import full_block, layer_block
from tensorcurv.core.exact import ExactModel
from tensorcurv.core.losses import BinaryCrossEntropyWithLogits, CrossEntropy, MeanSquaredError
from tensorcurv.curvature import Curvature
from tensorcurv.linalg import unvec
from tensorcurv.unlearn import ExactSolver, StructureSolver
from tensorcurv.unlearn.stats_ggn import ParamLayout, output_coefficients, stats_gradient
from unlearn_problems import data, logreg, mlp, trained_problem

MU = 0.5


def _stats(model, X, y, loss=None):
    curv = Curvature(model, "kfac", "ggn")
    res = curv.capture(X, y, loss or CrossEntropy("sum"))
    return curv, res


def _dense_block(op, name, m, n):
    """Columns ``vec(C_l vec(E_j))`` with the other layers' directions zero."""
    eye = torch.eye(m * n, dtype=torch.float64)
    zeros = {k: torch.zeros(st.m, st.n, dtype=torch.float64) for k, st in op.stats.items()}
    return torch.stack([op.mv({**zeros, name: unvec(e, m, n)})[name].T.reshape(-1) for e in eye], 1)


def test_block_operator_from_stats_equals_dense_ggn_block_of_each_layer():
    X, y = data()
    model = mlp()
    curv, res = _stats(model, X, y)
    op = ExactModel.from_stats(res.stats, "block")
    for name, ad in curv.adapters.items():
        m, n = ad.shape()
        ref = layer_block(model, X, y, "cross_entropy", "ggn", name, reduction="sum")
        torch.testing.assert_close(_dense_block(op, name, m, n), ref, rtol=1e-10, atol=1e-10)


def test_full_coupling_operator_equals_dense_ggn_of_all_parameters():
    X, y = data()
    model = mlp()
    curv, res = _stats(model, X, y)
    op, layout = ExactModel.from_stats(res.stats, "full"), ParamLayout(curv.named_params, curv.adapters)
    P = sum(p.numel() for p in model.parameters())
    dense = torch.stack([layout.to_flat(op.mv(layout.to_mats(e))) for e in torch.eye(P, dtype=torch.float64)], 1)
    ref, _, _ = full_block(model, X, y, "cross_entropy", "ggn", reduction="sum")
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_closed_form_coefficients_give_the_summed_per_sample_gradients(loss):
    X, y = data()
    model = mlp()
    if loss == "bce_with_logits":
        spec, y = BinaryCrossEntropyWithLogits("sum"), torch.nn.functional.one_hot(y, 3).double()
        ell = lambda z, t: torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="sum")
    elif loss == "mse":
        spec, y = MeanSquaredError("sum"), torch.nn.functional.one_hot(y, 3).double()
        ell = lambda z, t: ((z - t) ** 2).sum()
    else:
        spec = CrossEntropy("sum")
        ell = lambda z, t: torch.nn.functional.cross_entropy(z.unsqueeze(0), t.unsqueeze(0), reduction="sum")
    curv, res = _stats(model, X, y, spec)
    layout = ParamLayout(curv.named_params, curv.adapters)
    got = layout.to_flat(stats_gradient(res.stats, output_coefficients(spec, res.outputs, y)))
    params = {n: p.detach() for n, p in model.named_parameters()}
    per = vmap(grad(lambda p, x, t: ell(functional_call(model, p, (x.unsqueeze(0),))[0], t)), in_dims=(None, 0, 0))(
        params, X, y
    )
    ref = torch.cat([per[n].sum(0).reshape(-1) for n in params])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_cross_entropy_coefficients_refuse_an_underflowing_true_class_probability():
    out = torch.tensor([[0.0, 800.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="underflows"):
        output_coefficients(CrossEntropy("sum"), out, torch.tensor([0]))


def _bce_targets(kind, shape, gen):
    u = torch.rand(shape, dtype=torch.float64, generator=gen)
    return (u > 0.5).double() if kind == "binary" else u


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["binary", "soft"])
def test_bce_coefficients_map_through_the_hessian_factor_to_the_per_sample_output_gradient(kind, reduction):
    gen = torch.Generator().manual_seed(0)
    z = 3.0 * torch.randn(5, 2, 3, dtype=torch.float64, generator=gen)  # 2-D outputs per sample: flattened to K = 6
    y = _bce_targets(kind, z.shape, gen)
    spec = BinaryCrossEntropyWithLogits(reduction)
    c = output_coefficients(spec, z, y)
    # ℓ_s: the per-sample part of nn.BCEWithLogitsLoss (mean over all N·K elements = (1/N) Σ_s mean over K)
    ell = lambda zs, ts: torch.nn.functional.binary_cross_entropy_with_logits(zs, ts, reduction=reduction)
    ref = vmap(grad(ell))(z, y).flatten(1)
    got = torch.einsum("nck,nk->nc", spec.hessian_factor(z), c)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)


def test_bce_coefficients_refuse_an_underflowing_bernoulli_variance():
    out = torch.tensor([[0.0, 800.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="underflows"):
        output_coefficients(BinaryCrossEntropyWithLogits("sum"), out, torch.tensor([[0.0, 1.0]], dtype=torch.float64))


def _setup(model_fn):
    return trained_problem(model_fn, MU)


def test_refined_kfac_solve_equals_exact_solver_on_logistic_regression_to_its_tolerance():
    obj, th, X, y, v = _setup(logreg)
    ref = ExactSolver("ggn", damping=0.1).prepare(obj, th, X, y)
    res = StructureSolver("kfac", damping=0.1, refine=100, refine_tol=1e-10).prepare(obj, th, X, y).solve(v)
    assert res.converged and res.residual <= 1e-10 and res.method == "structure:kfac+refine"
    bound = 1e-10 * float(v.norm()) / float(torch.linalg.eigvalsh(ref.matrix)[0])  # ‖x − x*‖ ≤ ‖r‖/λ_min
    assert float((res.x - ref.solve(v).x).norm()) <= bound


def test_refined_full_coupling_solve_equals_exact_ggn_solve_for_mlp():
    obj, th, X, y, v = _setup(mlp)
    ref = ExactSolver("ggn").prepare(obj, th, X, y)
    res = StructureSolver("kfac", refine=200, refine_tol=1e-10).prepare(obj, th, X, y).solve(v)
    assert res.converged
    bound = 1e-10 * float(v.norm()) / float(torch.linalg.eigvalsh(ref.matrix)[0])
    assert float((res.x - ref.solve(v).x).norm()) <= bound


def test_refined_block_coupling_solve_equals_dense_structure_solve_for_mlp():
    """The block-diagonal GGN is what the ``dense`` structure holds exactly."""
    obj, th, X, y, v = _setup(mlp)
    ref = StructureSolver("dense").prepare(obj, th, X, y).solve(v).x
    res = StructureSolver("kfac", refine=200, refine_tol=1e-11, coupling="block").prepare(obj, th, X, y).solve(v)
    assert res.converged
    torch.testing.assert_close(res.x, ref, rtol=1e-8, atol=1e-9)


def test_refinement_reports_failure_and_iterations_when_tolerance_is_not_reached():
    obj, th, X, y, v = _setup(mlp)
    res = StructureSolver("kfac", refine=1, refine_tol=1e-14).prepare(obj, th, X, y).solve(v)
    assert not res.converged and res.iterations == 1 and res.residual > 1e-14 and "refinement" in res.message


def test_refine_needs_ggn_statistics():
    with pytest.raises(ValueError, match="kind='ggn'"):
        StructureSolver("kfac", kind="empirical", refine=5)


def test_refine_solve_not_strict_accepts_the_k_step_iterate_above_tolerance():
    from tensorcurv.unlearn.structure_solver import refine_solve

    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))  # 20 distinct eigenvalues: 1 step cannot solve
    b = torch.ones(20, dtype=torch.float64)
    strict = refine_solve(lambda v: A @ v, lambda v: v, b, 1, 1e-10, "t", {}, strict=True)
    loose = refine_solve(lambda v: A @ v, lambda v: v, b, 1, 1e-10, "t", {}, strict=False)
    assert not strict.converged
    assert loose.converged and loose.residual > 1e-10
    torch.testing.assert_close(loose.x, strict.x, rtol=0, atol=0)  # same iterate, only the verdict differs
