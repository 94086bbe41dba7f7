"""Column-major vec, the symmetric Gram product every K-FAC factor is computed with, and the Krylov solvers."""

from __future__ import annotations

import math

import pytest
import torch

from tensorcurv.linalg import gram, symmetric_part, unvec, vec
from tensorcurv.linalg.krylov import pcg, preconditioned_refinement
from tensorcurv.linalg.lanczos import lanczos

pytestmark = pytest.mark.usefixtures("float64_default")


def test_vec_is_column_major_so_kron_matches_the_two_sided_product():
    A, G, V = torch.randn(3, 3), torch.randn(2, 2), torch.randn(2, 3)
    assert torch.allclose(torch.kron(A, G) @ vec(V), vec(G @ V @ A.T), atol=1e-14)
    assert torch.equal(unvec(vec(V), 2, 3), V)


@pytest.mark.parametrize("d", [7, 256, 1025])
def test_gram_equals_the_plain_product_to_rounding(d):
    X = torch.randn(300, d)
    # the same gemm (float64): within a few ulps of ‖x‖² (300 terms of size ~1)
    assert torch.allclose(gram(X), X.T @ X, rtol=0, atol=1e-12)


def test_gram_is_symmetric_to_rounding():
    G = gram(torch.randn(2048, 300, dtype=torch.float32))
    assert torch.allclose(G, G.T, rtol=0, atol=1e-6 * float(G.abs().max()))


def test_gram_scale_multiplies_the_product():
    X = torch.randn(50, 9)
    assert torch.allclose(gram(X, 0.25), 0.25 * (X.T @ X), rtol=0, atol=1e-13)


def test_symmetric_part_of_a_stack_is_exactly_symmetric_and_keeps_symmetric_input():
    M = torch.randn(3, 20, 20)
    S = symmetric_part(M)
    assert torch.equal(S, S.mT)
    assert torch.allclose(S, 0.5 * (M + M.mT), rtol=0, atol=0)
    assert torch.equal(symmetric_part(S), S)


def _spd(d: int, cond: float = 1e3, seed: int = 0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return (Q * torch.logspace(0.0, math.log10(cond), d)) @ Q.T


def test_cg_on_matrices_solves_the_kronecker_system_to_its_tolerance():
    A, G = _spd(4, seed=1), _spd(3, seed=2)
    B = torch.randn(3, 4)
    X, info = pcg(lambda V: G @ V @ A, B, tol=1e-12)
    ref = unvec(torch.linalg.solve(torch.kron(A, G), vec(B)), 3, 4)
    assert info["converged"] and info["residual"] <= 1e-12
    # the relative error is at most cond(A⊗G) = 1e6 times the relative residual
    assert float((X - ref).norm() / ref.norm()) <= 1e6 * 1e-12


def test_cg_reports_the_residual_history_from_the_start():
    M, b = _spd(30), torch.randn(30)
    x, info = pcg(lambda v: M @ v, b, tol=1e-10)
    assert len(info["residuals"]) == info["iterations"] + 1
    assert info["residuals"][0] == 1.0 and info["residuals"][-1] == info["residual"]
    assert info["residual"] == pytest.approx(float((b - M @ x).norm() / b.norm()), rel=1e-4)


def test_exact_preconditioner_converges_in_one_iteration():
    M, b = _spd(30), torch.randn(30)
    Minv = torch.linalg.inv(M)
    _, info = pcg(lambda v: M @ v, b, lambda r: Minv @ r, tol=1e-8)
    assert info["converged"] and info["iterations"] == 1


def test_cg_stops_on_negative_curvature():
    M = torch.diag(torch.tensor([1.0, -1.0, 2.0]))
    _, info = pcg(lambda v: M @ v, torch.ones(3), tol=1e-12)
    assert info["negative_curvature"] and not info["converged"]


def test_cg_stops_at_max_iter_unconverged():
    M, b = _spd(30), torch.randn(30)
    _, info = pcg(lambda v: M @ v, b, tol=1e-14, max_iter=3)
    assert info["iterations"] == 3 and not info["converged"] and info["residual"] > 1e-14


def test_cg_applies_the_preconditioner_once_per_step_that_uses_it():
    M, b = _spd(30, seed=3).double(), torch.randn(30, dtype=torch.float64)
    calls = []
    _, info = pcg(lambda v: M @ v, b, lambda r: calls.append(1) or r / M.diagonal(), tol=1e-14, max_iter=4)
    assert info["iterations"] == 4 and len(calls) == 4


def test_cg_given_the_preconditioned_right_hand_side_takes_the_same_steps():
    M, b = _spd(30, seed=3).double(), torch.randn(30, dtype=torch.float64)
    P = lambda r: r / M.diagonal()
    x, _ = pcg(lambda v: M @ v, b, P, tol=1e-14, max_iter=6)
    y, _ = pcg(lambda v: M @ v, b, P, tol=1e-14, max_iter=6, precond_b=P(b))
    assert torch.equal(x, y)


def test_refinement_cosine_is_one_after_one_step_and_reported_after_more():
    M, b = _spd(30, seed=4).double(), torch.randn(30, dtype=torch.float64)
    P = lambda r: r / M.diagonal()
    x1, info1 = preconditioned_refinement(lambda v: M @ v, P, b, max_iter=1, tol=1e-14)
    x5, info5 = preconditioned_refinement(lambda v: M @ v, P, b, max_iter=5, tol=1e-14)
    d0 = P(b)
    assert info1["cosine"] == pytest.approx(1.0, abs=1e-14)
    assert info5["cosine"] == pytest.approx(float(x5 @ d0 / (x5.norm() * d0.norm())), abs=1e-14)


def test_lanczos_run_to_full_dimension_gives_all_eigenvalues():
    A = torch.randn(12, 12)
    A = A + A.T
    res = lanczos(lambda v: A @ v, torch.randn(12), max_iter=12)
    assert res.exhausted and res.steps == 12
    assert torch.allclose(res.ritz_values, torch.linalg.eigvalsh(A), atol=1e-9)


def test_lanczos_residuals_flag_the_converged_ritz_values():
    A = torch.diag(torch.logspace(0.0, 8.0, 40))  # well-separated top: converges first
    res = lanczos(lambda v: A @ v, torch.randn(40), max_iter=15)
    theta = res.ritz_values
    ok = res.residuals <= 1e-6 * theta.abs().max()
    assert ok.any() and not ok.all()
    ev = torch.linalg.eigvalsh(A)
    for t in theta[ok]:  # every converged Ritz value is an eigenvalue
        assert float((ev - t).abs().min()) <= 1e-5 * float(t.abs())


def test_lanczos_stops_at_an_invariant_subspace():
    A = torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0]))  # two distinct eigenvalues: a 2-dimensional Krylov space
    res = lanczos(lambda v: A @ v, torch.ones(4))
    assert res.exhausted and res.steps == 2
    assert torch.allclose(res.ritz_values, torch.tensor([1.0, 3.0]), atol=1e-12)


def test_lanczos_stops_when_the_extreme_ritz_pairs_converge():
    A = torch.diag(torch.logspace(0.0, 3.0, 200))
    res = lanczos(lambda v: A @ v, torch.randn(200), tol=1e-8)
    assert res.steps < 200 and not res.exhausted
    assert float(res.residuals[[0, -1]].max()) <= 1e-8 * float(res.ritz_values.abs().max())


def test_symmetric_eigh_retries_in_float64_when_float32_lapack_returns_nan(monkeypatch):
    from tensorcurv.linalg import symmetric_eigh

    M = torch.randn(6, 6, dtype=torch.float32)
    M = M @ M.T
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(S):  # float32 LAPACK's silent failure, reproduced
        calls.append(S.dtype)
        evals, evecs = real_eigh(S)
        return (torch.full_like(evals, float("nan")), evecs) if S.dtype == torch.float32 else (evals, evecs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    evals, evecs = symmetric_eigh(M)
    assert calls == [torch.float32, torch.float64]
    assert evals.dtype == torch.float32 and torch.isfinite(evals).all()
    assert torch.allclose(evecs @ torch.diag(evals) @ evecs.T, M, atol=1e-4 * float(M.norm()))


def test_kfac_on_a_nearly_singular_float32_image_factor_has_finite_eigenpairs():
    """The CURVES-like input factor (785 x 785 with the bias column) on which float32 eigh returned NaN."""
    from tensorcurv.experiments.curves_synthetic import make_curves_synthetic
    from tensorcurv.linalg import symmetric_eigh

    out = make_curves_synthetic(64, seed=0)
    X = torch.as_tensor(out[0] if isinstance(out, tuple) else out, dtype=torch.float32).reshape(64, -1)
    a = torch.cat([X, torch.ones(64, 1)], 1)
    evals, evecs = symmetric_eigh(a.T @ a / 64)
    assert torch.isfinite(evals).all() and torch.isfinite(evecs).all()
    assert float(evals.max()) == pytest.approx(float(torch.linalg.eigvalsh((a.T @ a / 64).double()).max()), rel=1e-5)
