"""Inverse-HVP solvers agree with the dense reference to their tolerances."""

import pytest
import torch

from tensorcurv.unlearn import CGSolver, ExactSolver, LiSSASolver, Objective, StructureSolver, build_solver
from unlearn_problems import data, logreg, mlp, trained_problem

MU = 0.5
MU_LISSA = 3.0  # better conditioned, so that LiSSA needs only ~150 steps in the tests


def _setup(model_fn=logreg, mu=MU):
    return trained_problem(model_fn, mu)


def test_exact_hessian_and_ggn_coincide_for_logistic_regression():
    obj, th, X, y = _setup()[:4]
    torch.testing.assert_close(obj.hessian(th, X, y), obj.ggn(th, X, y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_matrix_free_products_match_dense_matrices(curvature):
    obj, th, X, y, v = _setup(mlp)
    dense = obj.hessian(th, X, y) if curvature == "hessian" else obj.ggn(th, X, y)
    torch.testing.assert_close(obj.curvature_vp(curvature)(th, X, y, v), dense @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_cg_matches_exact_to_its_tolerance(curvature):
    obj, th, X, y, v = _setup(mlp)
    ref = ExactSolver(curvature, damping=0.1).prepare(obj, th, X, y)
    res = CGSolver(curvature, damping=0.1, tol=1e-10).prepare(obj, th, X, y).solve(v)
    assert res.converged and res.residual <= 1e-10
    x_ref = ref.solve(v).x
    # ‖x − x*‖ ≤ ‖A^{-1}‖ ‖r‖ = ‖r‖ / λ_min(A)
    bound = 1e-10 * float(v.norm()) / float(torch.linalg.eigvalsh(ref.matrix)[0])
    assert float((res.x - x_ref).norm()) <= bound


def test_cg_reports_failure_when_not_converged():
    obj, th, X, y, v = _setup(mlp)
    res = CGSolver("ggn", tol=1e-14, max_iter=2).prepare(obj, th, X, y).solve(v)
    assert not res.converged and res.iterations == 2 and res.residual > 1e-14


def test_kfac_preconditioned_cg_matches_exact():
    obj, th, X, y, v = _setup(mlp)
    x_ref = ExactSolver("ggn").prepare(obj, th, X, y).solve(v).x
    pcg = CGSolver("ggn", tol=1e-10, preconditioner=StructureSolver("kfac")).prepare(obj, th, X, y).solve(v)
    assert pcg.converged and pcg.method == "pcg:kfac"
    torch.testing.assert_close(pcg.x, x_ref, rtol=1e-7, atol=1e-9)


def test_lissa_full_batch_error_matches_neumann_series_bound():
    """Deterministic LiSSA: u_j/s − H⁻¹v = −(I − H/s)^{j+1} H⁻¹v, so ‖err‖ ≤ (1 − λ_min/s)^{depth+1} ‖H⁻¹v‖."""
    obj, th, X, y, v = _setup(mu=MU_LISSA)
    H = obj.hessian(th, X, y)
    x_ref = torch.linalg.solve(H, v)
    solver = LiSSASolver("hessian", depth=150, batch_size=None).prepare(obj, th, X, y)
    res = solver.solve(v)
    lmin = float(torch.linalg.eigvalsh(H)[0])
    bound = (1 - lmin / solver.scale) ** 151 * float(x_ref.norm())
    assert float((res.x - x_ref).norm()) <= bound * (1 + 1e-8)
    assert float((res.x - x_ref).norm()) <= 1e-3 * float(x_ref.norm())


def test_lissa_automatic_scale_exceeds_largest_eigenvalue():
    obj, th, X, y, _ = _setup()
    solver = LiSSASolver("hessian", batch_size=None, scale_factor=1.2).prepare(obj, th, X, y)
    lmax = float(torch.linalg.eigvalsh(obj.hessian(th, X, y))[-1])
    assert lmax < solver.scale <= 1.2 * lmax * (1 + 1e-6)


def test_lissa_damping_d_acts_as_tikhonov_damping_d_times_scale():
    obj, th, X, y, v = _setup(mu=MU_LISSA)
    solver = LiSSASolver("hessian", d=0.01, depth=200, batch_size=None).prepare(obj, th, X, y)
    res = solver.solve(v)
    ref = ExactSolver("hessian", damping=0.01 * solver.scale).prepare(obj, th, X, y).solve(v).x
    torch.testing.assert_close(res.x, ref, rtol=1e-6, atol=1e-8)


def test_lissa_minibatch_estimate_is_close_to_exact():
    """Minibatches of 10 of 30 points, 4 repetitions: a noisy estimate (fixed seed), within 10 %."""
    obj, th, X, y, v = _setup(mu=MU_LISSA)
    x_ref = ExactSolver("hessian").prepare(obj, th, X, y).solve(v).x
    res = LiSSASolver("hessian", depth=150, repetitions=4, batch_size=10, seed=1).prepare(obj, th, X, y).solve(v)
    assert res.converged
    assert float((res.x - x_ref).norm()) <= 0.1 * float(x_ref.norm())


def test_dense_structure_equals_exact_ggn_solve_for_one_layer_model():
    obj, th, X, y, v = _setup()
    ref = ExactSolver("ggn", damping=0.2).prepare(obj, th, X, y).solve(v).x
    got = StructureSolver("dense", damping=0.2).prepare(obj, th, X, y).solve(v).x
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_dense_structure_equals_block_diagonal_of_exact_ggn_for_mlp():
    obj, th, X, y, v = _setup(mlp)
    G = obj.ggn(th, X, y)  # contains μI
    sizes = [p.numel() for p in obj.model.parameters()]  # W1, b1, W2, b2 -> blocks [W1,b1], [W2,b2]
    cut = sizes[0] + sizes[1]
    B = torch.zeros_like(G)
    B[:cut, :cut], B[cut:, cut:] = G[:cut, :cut], G[cut:, cut:]
    # the structure's blocks are in [W, b] column-major order; compare via the operator, not the layout
    got = StructureSolver("dense").prepare(obj, th, X, y).solve(v).x
    torch.testing.assert_close(got, torch.linalg.solve(B, v), rtol=1e-9, atol=1e-11)


def test_structure_fit_on_subsample_is_rescaled_by_n_over_b():
    obj, th, X, y, v = _setup()
    B = 12
    idx = torch.randperm(30, generator=torch.Generator().manual_seed(0))[:B]
    C_B = obj.ggn(th, X[idx], y[idx]) - MU * torch.eye(obj.dim, dtype=torch.float64)
    ref = torch.linalg.solve(30 / B * C_B + MU * torch.eye(obj.dim, dtype=torch.float64), v)
    got = StructureSolver("dense", fit_batch_size=B, seed=0).prepare(obj, th, X, y).solve(v).x
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)


def test_exact_solver_reports_indefinite_hessian():
    X, y = data()
    model = mlp(seed=2)
    obj = Objective(model, "cross_entropy", 0.0)  # random init, no regularization
    th = obj.theta()
    assert float(torch.linalg.eigvalsh(obj.hessian(th, X, y))[0]) < 0  # precondition of the test
    res = ExactSolver("hessian").prepare(obj, th, X, y).solve(torch.ones(obj.dim, dtype=torch.float64))
    assert not res.converged and "positive definite" in res.message


def test_build_solver_accepts_structure_names_and_rejects_unknown():
    assert isinstance(build_solver("kfac"), StructureSolver)
    with pytest.raises(ValueError, match="unknown inverse-HVP method"):
        build_solver("newton")
