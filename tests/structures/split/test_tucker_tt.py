"""Facts about the split-index structures ``tucker`` and ``tt`` (float64, tiny layers, dense reference)."""

import pytest
import torch
from torch import nn

import tensorcurv
from structure_problems import rel
from tensorcurv import structures
from tensorcurv.linalg import unvec, vec
from tensorcurv.structures.split.base import auto_split

TIGHT = dict(tol=1e-14, max_iter=400)


def model(conv: bool = False):
    torch.manual_seed(0)
    if conv:  # one layer (explicit splits apply to every layer): n = 1*2*2 = 4, m = 4, T = 9 positions
        return nn.Sequential(nn.Conv2d(1, 4, 2, bias=False), nn.Flatten()).double()
    return nn.Sequential(nn.Linear(5, 4)).double()  # n = 6 = 2*3, m = 4 = 2*2


def fit(structure, kind="ggn", conv=False, **hp):
    if structure in ("tucker", "tt"):  # these facts are about the implicit fits (tensorly: test_tucker_tt_tensorly.py)
        hp.setdefault("method", "implicit")
    g = torch.Generator().manual_seed(1)
    x = torch.randn((8, 1, 4, 4) if conv else (8, 5), generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (8,), generator=g)
    curv = tensorcurv.Curvature(model(conv), structure, kind, seed=0, **hp)
    curv.update(x, y, nn.CrossEntropyLoss())
    return curv.blocks["0"]


SPLIT = dict(splits_in=[2, 3], splits_out=[2, 2])


@pytest.mark.parametrize("conv", [False, True])
def test_tucker_with_full_multilinear_ranks_reproduces_the_dense_block(conv):
    C = fit("dense", conv=conv).to_dense()
    split = dict(splits_in=[2, 2], splits_out=[2, 2]) if conv else SPLIT
    block = fit("tucker", conv=conv, ranks=81, **split)
    assert rel(block.to_dense(), C) < 1e-10


def test_tucker_core_is_the_projection_of_the_dense_tensor_onto_its_factors():
    C = fit("dense").to_dense()
    block = fit("tucker", ranks=[2, 3, 2, 3], **SPLIT, max_iter=3)
    # dense tensor with modes (row, col) per index factor: C as (2,3,2,2, 2,3,2,2) -> pairs
    Tn = C.reshape(2, 3, 2, 2, 2, 3, 2, 2)
    mats = block._mats()
    core = torch.einsum("abcdefgh,aeP,bfQ,cgR,dhS->PQRS", Tn, *mats)
    assert rel(block.core, core) < 1e-12


def test_tt_with_two_cores_and_rank_r_equals_kron_sum_r():
    for r in (1, 2, 3):
        tt = fit("tt", ranks=r, splits_in=[6], splits_out=[4], **TIGHT)
        ks = fit("kron_sum", rank=r, psd="none", tol=1e-15, max_iter=3000, oversample=4)
        assert len(tt.cores) == 2
        assert rel(tt.to_dense(), ks.to_dense()) < 1e-6, r


def test_tt_ranks_all_one_give_a_kronecker_product_of_the_split_factors():
    block = fit("tt", ranks=1, **SPLIT, **TIGHT)
    F = block.kron_factors()
    assert [f.shape[0] for f in F] == [2, 3, 2, 2]
    K = F[0]
    for f in F[1:]:
        K = torch.kron(K, f)
    assert rel(block.to_dense(), K) < 1e-13


def test_tt_ranks_all_one_solve_is_exact():
    block = fit("tt", ranks=1, **SPLIT, **TIGHT)
    assert block.exact_solve
    V, lam = torch.randn(block.shape, dtype=torch.float64), 1e-2
    M = block.to_dense() + lam * torch.eye(V.numel(), dtype=V.dtype)
    assert rel(vec(block.solve(V, lam)), torch.linalg.solve(M, vec(V))) < 1e-10


def test_tt_with_full_ranks_reproduces_the_dense_block():
    C = fit("dense").to_dense()
    block = fit("tt", ranks=10**4, **SPLIT, max_iter=2)
    assert block.ranks == [4, 16, 4]
    assert rel(block.to_dense(), C) < 1e-10


def test_tt_errors_decrease_from_rank_one_to_full_rank():
    C = fit("dense").to_dense()
    errs = [rel(fit("tt", ranks=r, **SPLIT, **TIGHT).to_dense(), C) for r in (1, 4, 16)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-10


@pytest.mark.parametrize("structure,hp", [("tucker", dict(ranks=2)), ("tt", dict(ranks=2))])
def test_mv_contracts_the_format_like_to_dense(structure, hp):
    block = fit(structure, **SPLIT, **hp)
    V = torch.randn(block.shape, dtype=torch.float64)
    assert rel(block.mv(V), unvec(block.to_dense() @ vec(V), *block.shape)) < 1e-12


@pytest.mark.parametrize("structure,hp", [("tucker", dict(ranks=[4, 9, 4, 4])), ("tt", dict(ranks=[4, 8, 4]))])
def test_pcg_solve_reaches_the_requested_tolerance(structure, hp):
    block = fit(structure, **SPLIT, **hp, pcg_tol=1e-9)
    V, lam = torch.randn(block.shape, dtype=torch.float64), 1e-2 * float(torch.trace(block.to_dense())) / 24
    X = block.solve(V, lam)
    M = block.to_dense() + lam * torch.eye(V.numel(), dtype=V.dtype)
    assert block.last_solve["method"] == "pcg" and block.last_solve["converged"]
    assert float((M @ vec(X) - vec(V)).norm() / V.norm()) <= 1e-9


def test_automatic_split_is_balanced_and_multiplies_to_the_size():
    assert auto_split(1025, 2) == [41, 25] and auto_split(1024, 2) == [32, 32]
    assert auto_split(7, 2) == [7] and auto_split(12, 3) == [3, 2, 2]


def test_invalid_splits_and_ranks_raise_clear_errors():
    with pytest.raises(ValueError, match=r"tucker.splits_in=\[2, 2\] does not multiply to the layer size 6"):
        structures.create("tucker", (4, 6), splits_in=[2, 2])
    with pytest.raises(ValueError, match=r"tt.splits_out=\[3\] does not multiply"):
        structures.create("tt", (4, 6), splits_out=[3])
    with pytest.raises(ValueError, match="tt.ranks .* exceed the maximal TT-ranks"):
        structures.create("tt", (4, 6), ranks=[5, 1, 1], **SPLIT)
    with pytest.raises(ValueError, match="tucker.ranks must be a positive int"):
        structures.create("tucker", (4, 6), ranks=0)


def test_nbytes_counts_core_and_factors():
    block = fit("tucker", ranks=[2, 3, 2, 3], **SPLIT)
    assert block.nbytes == 8 * (2 * 3 * 2 * 3 + 4 * 2 + 9 * 3 + 4 * 2 + 4 * 3)


@pytest.mark.parametrize("structure, negate", [("tucker", "core"), ("tt", "cores")])
def test_indefinite_fit_solves_finitely_by_the_psd_preconditioner_and_reports_the_fallback(structure, negate):
    block = fit(structure, ranks=2, psd="none", **SPLIT)  # the unconstrained fit: no PSD shift
    if negate == "core":
        block.core = -block.core
    else:
        block.cores = [-block.cores[0]] + block.cores[1:]
    block._pre = None
    damping = 1e-3 * float(torch.linalg.eigvalsh(block.to_dense()).abs().max())
    assert float(torch.linalg.eigvalsh(block.to_dense()).min()) < -10 * damping  # Ĉ + λI is indefinite
    V = torch.randn(block.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    X = block.solve(V, damping)
    assert torch.isfinite(X).all()
    assert block.last_solve["fallback"] == "negative curvature"
    assert torch.equal(X, block._precond(damping)(V)) if structure == "tucker" else float((X * V).sum()) > 0


def test_pcg_or_fallback_replaces_a_non_finite_answer_by_the_preconditioner_solve():
    from tensorcurv.linalg.krylov import pcg_or_fallback

    b = torch.ones(3, 2, dtype=torch.float64)
    X, info = pcg_or_fallback(lambda Z: Z * float("nan"), b, lambda R: R / 2.0, 1e-10, 50, 1.0)
    assert info["fallback"] == "non-finite" and torch.equal(X, b / 2.0)


def test_pcg_on_a_positive_definite_fit_uses_no_fallback():
    block = fit("tucker", ranks=81, **SPLIT)
    block.solve(torch.ones(block.shape, dtype=torch.float64), 1e-2)
    assert block.last_solve["fallback"] is None and block.last_solve["converged"]


# ---------------------------------------------------------------------- symmetry of the represented operator
SYM_CASES = [
    (s, kind, conv, r)
    for conv in (False, True)
    for kind in ("ggn", "empirical")
    for s, r in (("tucker", 2), ("tucker", [2, 4, 2, 3]), ("tt", 1), ("tt", 2), ("tt", 4))
]


def split_for(conv):
    return dict(splits_in=[2, 2], splits_out=[2, 2]) if conv else SPLIT


@pytest.mark.parametrize("structure,kind,conv,ranks", SYM_CASES)
def test_to_dense_is_symmetric_and_no_farther_from_c_than_the_raw_fit(structure, kind, conv, ranks):
    C = fit("dense", kind=kind, conv=conv).to_dense()
    block = fit(structure, kind=kind, conv=conv, ranks=ranks, psd="none", **split_for(conv))
    S, R = block.to_dense(), block.to_dense(raw=True)
    assert rel(S, S.T) < 1e-12
    assert rel(S, 0.5 * (R + R.T)) < 1e-14  # the symmetric part of the fitted format, nothing else
    # ‖C − ½(Ĉ+Ĉᵀ)‖ ≤ ‖C − Ĉ‖ (orthogonal projection, C symmetric); rounding slack 1e-14 relative
    assert float((C - S).norm()) <= float((C - R).norm()) * (1 + 1e-14)


@pytest.mark.parametrize("structure,kind,conv,ranks", SYM_CASES)
def test_mv_applies_the_symmetric_to_dense(structure, kind, conv, ranks):
    block = fit(structure, kind=kind, conv=conv, ranks=ranks, **split_for(conv))
    V = torch.randn(block.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert rel(block.mv(V), unvec(block.to_dense() @ vec(V), *block.shape)) < 1e-12


def test_an_asymmetric_fit_is_represented_by_its_symmetric_part():
    # conv, GGN, TT-rank 2: the raw ALS fit is visibly asymmetric (the defect this guards against)
    block = fit("tt", conv=True, ranks=2, **split_for(True))
    R = block.to_dense(raw=True)
    assert rel(R, R.T) > 1e-4
    assert rel(block.to_dense(), block.to_dense().T) < 1e-12


@pytest.mark.parametrize("conv", [False, True])
def test_tt_rank_one_factors_are_symmetric_and_fit_no_worse_than_an_unsymmetric_start(conv):
    kind = "ggn"
    C = fit("dense", kind=kind, conv=conv).to_dense()
    block = fit("tt", kind=kind, conv=conv, ranks=1, **split_for(conv), **TIGHT)
    assert all(torch.equal(F, F.T) for F in block.kron_factors())
    # the same ALS from a random unsymmetric start (exact_solve off switches off the symmetric start)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((8, 1, 4, 4) if conv else (8, 5), generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (8,), generator=g)
    curv = tensorcurv.Curvature(model(conv), "tt", kind, seed=0, ranks=1, **split_for(conv), **TIGHT, method="implicit")
    stats = curv.capture(x, y, nn.CrossEntropyLoss()).stats["0"]
    free = structures.create("tt", block.shape, ranks=1, **split_for(conv), **TIGHT, method="implicit")
    free.exact_solve = False
    free.fit(stats)
    assert rel(block.to_dense(), C) <= rel(free.to_dense(raw=True), C) + 1e-10
