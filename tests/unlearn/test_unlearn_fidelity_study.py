"""The structure-fidelity study: exact ends of both families, and the deflation formula."""

import torch

from tensorcurv.unlearn import AffectedSet, Objective, train_lbfgs
from tensorcurv.unlearn.cache import CurvatureCache
from tensorcurv.unlearn.fidelity_study import deflated_kfac_solves, structure_fidelity
from unlearn_problems import data, logreg, trained

MU = 0.5


def _study(ranks, deflation):
    X, y = data()
    model = logreg()
    obj = trained(model, X, y, MU)
    aff = AffectedSet.relabel(torch.tensor([2, 5, 11]), (y[[2, 5, 11]] + 1) % 3)
    Xr, yr = aff.apply(X, y)
    theta_r = train_lbfgs(Objective(logreg(), "cross_entropy", MU), Xr, yr, obj.theta(), gtol=1e-11).theta
    cache = CurvatureCache(model, X, y, mu=MU, refine=0)
    return {
        (r["family"], r["size"]): r for r in structure_fidelity(cache, aff, theta_r, ranks=ranks, deflation=deflation)
    }


def test_full_rank_kron_sum_and_full_deflation_reproduce_the_exact_newton_step():
    rows = _study(ranks=[6], deflation=[15])  # block 3 x 5: R(C) has rank ≤ 3·4/2 = 6; 15 parameters
    exact = rows[("exact", 15)]
    for key in [("kron_sum psd=none", 6), ("kron_sum psd=shrink", 6), ("kfac deflated", 15)]:
        assert rows[key]["solve_error"] < 1e-8
        assert abs(rows[key]["rel_dist"] - exact["rel_dist"]) < 1e-8


def test_deflation_by_zero_vectors_is_the_damped_kfac_solve():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 6, generator=g, dtype=torch.float64)
    C = X @ X.T
    K = torch.kron(torch.eye(2, dtype=torch.float64), torch.diag(torch.tensor([1.0, 2, 3], dtype=torch.float64)))
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = deflated_kfac_solves(C, K, 0.3, b, [0, 6])
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(x[0], torch.linalg.solve(K + 0.3 * eye, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x[6], torch.linalg.solve(C + 0.3 * eye, b), rtol=1e-10, atol=1e-10)


def test_study_rejects_a_rank_beyond_the_block_and_multi_layer_models():
    import pytest

    from unlearn_problems import mlp

    X, y = data()
    model = logreg()
    trained(model, X, y, MU)
    aff = AffectedSet.removal([1])
    cache = CurvatureCache(model, X, y, mu=MU, refine=0)
    with pytest.raises(ValueError, match="rank 7 outside"):
        structure_fidelity(cache, aff, cache.theta_star, ranks=[7], deflation=[])
    m2 = mlp()
    trained(m2, X, y, MU)
    with pytest.raises(ValueError, match="one-layer model"):
        structure_fidelity(CurvatureCache(m2, X, y, mu=MU, refine=0), aff, cache.theta_star, ranks=[1], deflation=[])
