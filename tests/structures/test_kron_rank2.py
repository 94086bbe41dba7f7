"""The thesis's rank-2 Kronecker methods (``kron_rank2``) equal their dense definitions on a tiny float64
model: Deflation and Lanczos are the truncated rank-2 SVD of ``R(C)``; K-FAC-corrected is K-FAC plus the
top singular pair of ``R(C − A ⊗ G)``.

Tolerance 1e-10 (relative, Frobenius): the power method runs to a vector change of 1e-13 and Golub–Kahan
to an exhausted Krylov space, so only rounding remains.
"""

from __future__ import annotations

import pytest
import torch

from structure_problems import curvature, rel
from tensorcurv import structures
from tensorcurv.linalg.rearrange import rearrange
from tensorcurv.structures.dense import Dense

TIGHT = dict(tol=1e-13, max_iter=20000, lanczos_steps=1000)


def _layers(kind="ggn"):
    _, stats = curvature("linear", kind)
    return list(stats.values())


def _rank_r(R, r):
    U, S, Vh = torch.linalg.svd(R)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _from_rearranged(R, shape):
    """``C`` with ``rearrange(C) = R`` (the rearrangement is a permutation of entries)."""
    m, n = shape
    return R.reshape(n, n, m, m).permute(0, 2, 1, 3).reshape(n * m, n * m)


@pytest.mark.parametrize("fit", ["deflation", "lanczos"])
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_leading_kpsvd_is_the_truncated_rank_2_svd_of_the_rearranged_block(fit, kind):
    for st in _layers(kind):
        C = Dense(st.shape).fit(st).to_dense()
        S = structures.create("kron_rank2", st.shape, leading="kpsvd", fit=fit, **TIGHT).fit(st)
        assert rel(S.to_dense(), _from_rearranged(_rank_r(rearrange(C, st.shape), 2), st.shape)) < 1e-10


@pytest.mark.parametrize("fit", ["deflation", "lanczos"])
def test_kfac_corrected_is_kfac_plus_the_best_kronecker_product_of_the_residual(fit):
    for st in _layers():
        C = Dense(st.shape).fit(st).to_dense()
        K = structures.create("kfac", st.shape).fit(st).to_dense()
        R = rearrange(C - K, st.shape)
        want = K + _from_rearranged(_rank_r(R, 1), st.shape)
        S = structures.create("kron_rank2", st.shape, leading="kfac", fit=fit, **TIGHT).fit(st)
        assert rel(S.to_dense(), want) < 1e-10


def test_running_average_refits_the_averaged_operator():
    _, s1 = curvature("linear", "ggn")
    _, s2 = curvature("linear", "ggn", n=7)
    for name, st in s1.items():
        S = structures.create("kron_rank2", st.shape, **TIGHT).fit(st)
        old = S.to_dense()
        S.update(s2[name], 0.75)
        mix = 0.75 * old + 0.25 * Dense(st.shape).fit(s2[name]).to_dense()
        want = _from_rearranged(_rank_r(rearrange(mix, st.shape), 2), st.shape)
        assert rel(S.to_dense(), want) < 1e-10


def test_solve_inverts_the_pi_damped_pair_when_no_denominator_is_floored():
    st = _layers()[0]
    S = structures.create("kron_rank2", st.shape, min_denominator=1e-12, **TIGHT).fit(st)
    lam = 1e-1
    V = torch.randn(st.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = S.solve(V, lam)
    assert S.last_solve["min_eigen_denominator"] > 1e-12
    m, n = st.shape
    A1, G1 = S.A[0], S.G[0]
    pi = float((torch.trace(A1) / n / (torch.trace(G1) / m)).sqrt())
    Ba, Bg = A1 + pi * lam**0.5 * torch.eye(n, dtype=A1.dtype), G1 + lam**0.5 / pi * torch.eye(m, dtype=A1.dtype)
    back = Bg @ X @ Ba + S.G[1] @ X @ S.A[1]
    assert rel(back, V) < 1e-10
