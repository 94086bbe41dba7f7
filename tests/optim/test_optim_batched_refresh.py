"""Facts about ``KFAC.refresh``: the solve caches of many K-FAC blocks built at once (factors of
equal size in one batched ``cholesky_ex``/``cholesky_inverse`` or ``eigh`` call) equal the
per-block ones and the dense damped inverses; float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tensorcurv
from tensorcurv.structures.kfac import KFAC, KFACHparams

pytestmark = pytest.mark.usefixtures("float64_default")

# (m, n): G sizes 5, 5, 3, 4 and A sizes 4, 4, 5, 3 -> groups mix A and G factors of one size
SHAPES = [(5, 4), (5, 4), (3, 5), (4, 3)]
LAM = 1e-2


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g)
    return X.T @ X / (3 * n)


def blocks(**hp):
    out = []
    for i, (m, n) in enumerate(SHAPES):
        b = KFAC((m, n), KFACHparams(**hp))
        b.A, b.G, b.fitted = spd(n, 2 * i), spd(m, 2 * i + 1), True
        out.append(b)
    return out


def dense_pi_inverses(b, lam):
    m, n = b.shape
    pi = math.sqrt((torch.trace(b.A) / n) / (torch.trace(b.G) / m))
    return (
        torch.linalg.inv(b.G + math.sqrt(lam) / pi * torch.eye(m)),
        torch.linalg.inv(b.A + pi * math.sqrt(lam) * torch.eye(n)),
    )


def rhs(b, seed=7):
    return torch.randn(*b.shape, generator=torch.Generator().manual_seed(seed))


def test_batched_cholesky_refresh_equals_the_dense_pi_damped_inverses_of_every_block():
    bs = blocks(damping_kind="pi", inverse="cholesky")
    KFAC.refresh(bs, LAM)
    for b in bs:
        Gi, Ai = dense_pi_inverses(b, LAM)
        torch.testing.assert_close(b._inv[1], Gi, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b._inv[2], Ai, rtol=1e-12, atol=1e-12)
        assert b._inv[3]["method"] == "kron-cholesky"


def test_batched_cholesky_refresh_equals_refreshing_each_block_alone():
    batched, alone = blocks(damping_kind="pi", inverse="cholesky"), blocks(damping_kind="pi", inverse="cholesky")
    KFAC.refresh(batched, LAM)
    for b, a in zip(batched, alone):
        V = rhs(b)
        torch.testing.assert_close(b.solve(V, LAM), a.solve(V, LAM), rtol=1e-13, atol=1e-14)
        assert b.last_solve == a.last_solve  # same π, same method


def test_batched_eigh_refresh_gives_the_exact_tikhonov_solve_of_every_block():
    bs = blocks()
    KFAC.refresh(bs, LAM)
    for b in bs:
        assert b._eigs is not None
        V = rhs(b)
        dense = torch.kron(b.A, b.G) + LAM * torch.eye(b.A.shape[0] * b.G.shape[0])
        expected = torch.linalg.solve(dense, V.T.reshape(-1)).reshape(b.shape[1], b.shape[0]).T  # column-major vec
        torch.testing.assert_close(b.solve(V, LAM), expected, rtol=1e-11, atol=1e-12)


def test_batched_eigh_refresh_equals_refreshing_each_block_alone():
    batched, alone = blocks(damping_kind="pi"), blocks(damping_kind="pi")
    KFAC.refresh(batched, LAM)
    for b, a in zip(batched, alone):
        V = rhs(b)
        torch.testing.assert_close(b.solve(V, LAM), a.solve(V, LAM), rtol=1e-13, atol=1e-14)


def test_an_indefinite_factor_falls_back_to_clamped_eigenvalues_only_in_its_own_block():
    bs = blocks(damping_kind="pi", inverse="cholesky")
    A = bs[1].A
    lam, Q = torch.linalg.eigh(A)
    lam[0] = -1.0  # far below -π√λ: the shifted factor is not PD
    bs[1].A = (Q * lam) @ Q.T
    KFAC.refresh(bs, LAM)
    methods = [b._inv[3]["method"] for b in bs]
    assert methods == ["kron-cholesky", "kron-cholesky+eigh-fallback", "kron-cholesky", "kron-cholesky"]
    b = bs[1]
    _, n = b.shape
    pi = b._inv[3]["pi"]
    expected_Ai = (Q / (lam.clamp_min(0) + pi * math.sqrt(LAM))) @ Q.T
    torch.testing.assert_close(b._inv[2], expected_Ai, rtol=1e-12, atol=1e-12)
    Gi, Ai = dense_pi_inverses(bs[0], LAM)  # its batch neighbour (same A size) is unaffected
    torch.testing.assert_close(bs[0]._inv[2], Ai, rtol=1e-12, atol=1e-12)


def test_refresh_leaves_up_to_date_blocks_alone_and_rebuilds_on_a_new_damping():
    bs = blocks(damping_kind="pi", inverse="cholesky")
    KFAC.refresh(bs, LAM)
    before = [b._inv for b in bs]
    KFAC.refresh(bs, LAM)
    assert all(b._inv is c for b, c in zip(bs, before))
    KFAC.refresh(bs, 10 * LAM)
    assert all(b._inv is not c and b._inv[0] == 10 * LAM for b, c in zip(bs, before))


def test_curvature_solve_with_the_batched_refresh_equals_the_per_block_solve():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    grads = [torch.randn_like(p) for p in model.parameters()]
    for hp in ({}, {"damping_kind": "pi", "inverse": "cholesky"}):
        fast, slow = (tensorcurv.Curvature(model, "kfac", "ggn", **hp) for _ in range(2))
        for c in (fast, slow):
            c.update(X, y, nn.CrossEntropyLoss())
        slow.model_structure.refresh = lambda damping: None  # each block builds its own cache inside its solve
        for f, s in zip(fast.solve(grads, damping=LAM), slow.solve(grads, damping=LAM)):
            torch.testing.assert_close(f, s, rtol=1e-13, atol=1e-14)
