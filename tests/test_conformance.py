"""Conformance of every registered structure to the structure interface, and of a new structure
defined only here to everything built on it.

Every structure (the registry, plus ``ScaledIdentity`` below) keeps the model-level contract
(``mv`` is its dense matrix, state and snapshots round-trip, reading before a fit raises) and the
layer capabilities agree with their generic definitions (``⟨C, Ĉ⟩``, ``‖Ĉ‖²``, eigenpairs, downdates,
statistics summed over shards, the split solve). ``ScaledIdentity`` implements only the abstract
methods and then goes through ``Curvature``, both optimizers, a study, a 2-process data-parallel fit
and an unlearning request, without any other file knowing about it.

Tolerances (float64): identities of the same operator computed two ways, 1e-10 relative (rounding
of sums over at most a few hundred terms; iterative fits such as ``tucker``'s HOOI stop at their own
tolerance, which is why the fits are compared through the operator they define, not their factors).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

import tensorcurv.distributed as tdist
from tensorcurv import Curvature, optim, structures
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import vec
from tensorcurv.structures import generic
from tensorcurv.structures.base import NotFittedError, Structure
from tensorcurv.study.evaluate import evaluate
from tensorcurv.study.variants import make_variants
from tensorcurv.unlearn import AffectedSet, StructureSolver, second_order_update
from tensorcurv.unlearn.cache import CurvatureCache
from tensorcurv.unlearn.ihvp import build_solver
from unlearn_problems import data, logreg, trained

TOY = "scaled_identity"
REL = 1e-10
LAM = 1e-2


class ScaledIdentity(Structure):
    """``Ĉ = c I`` with ``c = tr(C) / (mn)`` (the Frobenius-nearest multiple of the identity);
    ``tr C = scale Σ_j ‖G_j‖²``. Only the abstract methods and the running average."""

    def _batch(self, stats: LayerStats) -> Tensor:
        return stats.per_sample_grads().pow(2).sum() * stats.scale / (self.shape[0] * self.shape[1])

    def fit(self, stats):
        self._check_stats(stats)
        self.c, self.fitted = self._batch(stats), True
        return self

    def _update(self, stats, decay):
        self._check_stats(stats)
        self.c = decay * self.c + (1 - decay) * self._batch(stats)
        return self

    def mv(self, V):
        self._check(V)
        return self.c * V

    def solve(self, V, damping):
        self._check(V, damping)
        self.last_solve = {"method": "scalar", "damping": "tikhonov"}
        return V / (self.c + damping)

    def to_dense(self):
        return self.c * torch.eye(self.shape[0] * self.shape[1], dtype=self.c.dtype)

    def tensors(self):
        return {"c": self.c} if self.fitted else {}


@pytest.fixture(autouse=True, scope="module")
def toy_registered():
    """The toy is in the registry for this module's tests only (other modules list the registry)."""
    structures.register(TOY)(ScaledIdentity)
    yield
    structures.unregister(TOY)


def _canonical(names):
    return sorted({structures.get(n).name for n in names})


REGISTRY = _canonical(structures.names()) + [TOY]
LAYER = _canonical(structures.layer_names()) + [TOY]


# ---------------------------------------------------------------------- tiny problem
def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # blocks (4, 4) with a bias column and (3, 4) without: shapes every structure splits quickly
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).double()


def _batch(seed: int, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _stats(seed: int = 1, n: int = 10) -> dict[str, LayerStats]:
    x, y = _batch(seed, n)
    return Curvature(_model(), "diagonal", "ggn").capture(x, y, "cross_entropy").stats


def _mats(shapes, seed: int = 3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _model_structure(name: str, stats=None):
    shapes = {k: st.shape for k, st in (stats or _stats()).items()}
    return structures.get(name).for_model(shapes, structures.make_hparams(name))


def _fitted(name: str, stats=None):
    stats = stats or _stats()
    return _model_structure(name, stats).fit(stats)


def _layer(name: str, st: LayerStats) -> Structure:
    return structures.create(name, st.shape).fit(st)


def _rows(st: LayerStats, idx, scale=None) -> LayerStats:
    return LayerStats(a=st.a[idx], g=st.g[idx], scale=st.scale if scale is None else scale, name=st.name)


# ---------------------------------------------------------------------- model-level contract
@pytest.mark.parametrize("name", REGISTRY)
def test_model_structure_mv_is_its_dense_matrix(name):
    ms = _fitted(name)
    V = _mats(ms.shapes)
    got = torch.cat([vec(M) for M in ms.mv(V).values()])
    assert _rel(got, ms.to_dense() @ torch.cat([vec(V[k]) for k in ms.shapes])) < REL


@pytest.mark.parametrize("name", REGISTRY)
def test_exact_solve_inverts_the_damped_operator_and_any_solve_is_a_descent_direction(name):
    ms = _fitted(name)
    V = _mats(ms.shapes)
    x = torch.cat([vec(M) for M in ms.solve(V, LAM).values()])
    v = torch.cat([vec(V[k]) for k in ms.shapes])
    if ms.exact_solve:
        D = ms.to_dense()
        assert _rel((D + LAM * torch.eye(D.shape[0], dtype=D.dtype)) @ x, v) < REL
    assert float(v @ x) > 0


@pytest.mark.parametrize("name", REGISTRY)
def test_state_dict_round_trip_reproduces_the_operator(name):
    ms = _fitted(name)
    copy = _model_structure(name)
    copy.load_state_dict(ms.state_dict())
    V = _mats(ms.shapes)
    for k, M in ms.mv(V).items():
        assert torch.equal(copy.mv(V)[k], M)


@pytest.mark.parametrize("name", REGISTRY)
def test_restoring_a_snapshot_undoes_an_update_bit_for_bit(name):
    ms = _fitted(name)
    before, snap = ms.to_dense(), ms.snapshot()
    ms.update(_stats(seed=2), 0.5)
    ms.restore(snap)
    assert torch.equal(ms.to_dense(), before)


@pytest.mark.parametrize("name", REGISTRY)
def test_reading_an_unfitted_structure_raises_not_fitted(name):
    ms = _model_structure(name)
    with pytest.raises(NotFittedError):
        ms.mv(_mats(ms.shapes))


@pytest.mark.parametrize("name", REGISTRY)
def test_block_diagonal_structures_are_their_blocks_side_by_side(name):
    ms = _fitted(name)
    if ms.block_diagonal:
        assert torch.equal(ms.to_dense(), torch.block_diag(*[b.to_dense() for b in ms.blocks.values()]))
    assert list(ms.blocks) == list(ms.shapes)


# ---------------------------------------------------------------------- layer capabilities
@pytest.mark.parametrize("name", LAYER)
def test_inner_product_with_the_exact_block_and_norm_equal_their_generic_definitions(name):
    for st in _stats().values():
        S = _layer(name, st)
        assert S.inner_with_exact(st, chunk=3) == pytest.approx(generic.inner_with_exact(S, st, 3), rel=REL)
        assert S.frobenius_sq() == pytest.approx(generic.frobenius_sq(S, dense_max_dim=0), rel=REL)


@pytest.mark.parametrize("name", LAYER)
def test_leading_eigenpairs_are_eigenpairs_of_the_symmetric_part(name):
    k = 2
    for st in _stats().values():
        S = _layer(name, st)
        vals, V = S.leading_eigenpairs(k)
        D = S.to_dense()
        sym = 0.5 * (D + D.T)
        ref = torch.linalg.eigvalsh(sym).flip(0)[:k]
        Z = vec(V).T  # (mn, k)
        assert _rel(vals, ref) < REL
        assert torch.allclose(Z.T @ Z, torch.eye(k, dtype=Z.dtype), atol=1e-12)
        assert _rel(sym @ Z, Z * vals) < 1e-8  # eigenvectors of a (near-)repeated eigenvalue: 1e-8


@pytest.mark.parametrize("name", LAYER)
def test_downdate_equals_a_fit_on_the_modified_rows(name):
    for st in _stats(n=12).values():
        full = LayerStats(a=st.a, g=st.g, scale=1.0, name=st.name)  # sum reduction: one scale for D and D̃
        removed, keep = [1, 4, 7], [i for i in range(12) if i not in (1, 4, 7)]
        new = _rows(LayerStats(a=0.5 * st.a, g=-st.g, scale=1.0), [1, 4, 7])
        corrected = LayerStats(a=torch.cat([full.a[keep], new.a]), g=torch.cat([full.g[keep], new.g]), scale=1.0)
        got = _layer(name, full).downdate(full, _rows(full, removed), new, corrected)
        assert _rel(got.to_dense(), _layer(name, corrected).to_dense()) < REL


@pytest.mark.parametrize("name", LAYER)
@pytest.mark.parametrize("decay", [None, 0.7])
def test_statistics_summed_over_shards_give_the_whole_batch_fit(name, decay):
    for key, st in _stats(n=10).items():
        st2 = _stats(seed=2, n=10)[key]
        single, sharded = structures.create(name, st.shape), structures.create(name, st.shape)
        if decay is not None:  # a running average on top of an earlier fit
            single.fit(st)
            sharded.fit(st)
            single.update(st2, decay)
        else:
            single.fit(st2)
        shards = [_rows(st2, slice(0, 6)), _rows(st2, slice(6, 10))]  # at the whole batch's scale 1/10
        parts = [sharded.additive_statistics(s, s.N / st2.N) for s in shards]
        if parts[0] is None:  # not additive: a data-parallel run gathers the samples instead
            assert parts[1] is None
            continue
        reduced = {k: parts[0][k] + parts[1][k] for k in parts[0]}
        basis = sharded.shared_basis(reduced, decay)
        proj = [sharded.additive_projection(s, basis) for s in shards]
        sharded.load_reduced(reduced, basis, {k: proj[0][k] + proj[1][k] for k in proj[0]}, decay)
        assert _rel(sharded.to_dense(), single.to_dense()) < 1e-12


@pytest.mark.parametrize("name", LAYER)
def test_split_solve_equals_the_solve_of_the_concatenated_matrix(name):
    for st in _stats().values():
        S = _layer(name, st)
        V = torch.randn(st.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        W, b = V[:, :-1].clone(), V[:, -1].clone()
        out_W, out_b = torch.empty_like(W), torch.empty_like(b)
        S.solve_split(W, b, LAM, out_W, out_b)
        ref = S.solve(V, LAM)
        assert _rel(out_W, ref[:, :-1]) < REL and _rel(out_b, ref[:, -1]) < REL


@pytest.mark.parametrize("name", LAYER)
def test_fit_cost_estimate_is_a_positive_number_of_flops(name):
    S = structures.create(name, (4, 5))
    assert isinstance(S.fit_flops(), float) and S.fit_flops() > 0


# ---------------------------------------------------------------------- the toy through everything
def test_toy_through_curvature_update_solve_mv_and_dense_blocks():
    x, y = _batch(1)
    curv = Curvature(_model(), TOY, "ggn")
    curv.update(x, y, "cross_entropy")
    g = [torch.randn_like(p) for p in curv.params]
    solved, applied = curv.solve(g, damping=LAM), curv.mv(g)
    c = [curv.blocks[str(i)].c for i in (0, 0, 2)]  # weight, bias of layer "0"; weight of layer "2"
    for gi, si, mi, ci in zip(g, solved, applied, c):
        assert _rel(si, gi / (ci + LAM)) < REL and _rel(mi, ci * gi) < REL
    assert all(r["handled_by"] == f"{TOY} block" for r in curv.coverage())


@pytest.mark.parametrize("optimizer", [optim.NaturalGradient, optim.GaussNewton])
def test_toy_preconditions_both_optimizers_to_a_lower_loss(optimizer):
    model = _model()
    x, y = _batch(1, 16)
    opt = optimizer(model, "cross_entropy", structure=TOY, lr=0.5, damping=1e-1)
    first = float(opt.step(x, y))
    for _ in range(4):
        last = float(opt.step(x, y))
    assert last < first


def test_toy_study_frobenius_error_equals_the_dense_one():
    stats = _stats()
    grads = _mats({k: st.shape for k, st in stats.items()})
    rows = evaluate(stats, grads, make_variants([TOY]), floor_ranks=(1,), spectral=False, spectrum=False)["metrics"]
    for row in rows:
        if row["layer"] != "(model)":
            st = stats[row["layer"]]
            G = vec(st.per_sample_grads())  # the exact block C = scale Σ vec(G_j) vec(G_j)ᵀ
            C = (G.T @ G) * st.scale
            Ch = _layer(TOY, st).to_dense()
            assert row["fro_rel"] == pytest.approx(float((C - Ch).norm() / C.norm()), rel=REL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_parallel(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    comm = tdist.init("gloo", 30.0, rank=rank, world_size=2)
    x, y = _batch(1, 11)  # unequal shards 6 + 5
    curv = tdist.DistributedCurvature(_model(), TOY, "ggn", comm=comm)
    curv.update(tdist.world_batch(x, rank, 2), tdist.world_batch(y, rank, 2), "cross_entropy")
    g = [torch.ones_like(p) for p in curv.params]
    torch.save({"state": curv.state_dict(), "solve": curv.solve(g, damping=LAM)}, Path(out_dir) / f"rank{rank}.pt")
    tdist.shutdown()


def test_toy_data_parallel_fit_and_solve_equal_the_single_process_on_the_global_batch(tmp_path):
    t0 = time.perf_counter()
    mp.start_processes(_data_parallel, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    assert time.perf_counter() - t0 < 60
    x, y = _batch(1, 11)
    single = Curvature(_model(), TOY, "ggn")
    single.update(x, y, "cross_entropy")
    ref = single.solve([torch.ones_like(p) for p in single.params], damping=LAM)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        for k, block in single.blocks.items():
            assert _rel(got["state"]["model_structure"]["blocks"][k]["tensors"]["c"], block.c) < 1e-12
        for a, b in zip(got["solve"], ref):
            assert _rel(a, b) < 1e-12


@pytest.fixture(scope="module")
def unlearning_problem():
    X, y = data()
    model = logreg()
    trained(model, X, y, 0.5)
    return model, X, y, AffectedSet.removal(torch.tensor([2, 5, 11]))


def test_toy_cached_refined_unlearning_equals_the_exact_newton_step(unlearning_problem):
    model, X, y, aff = unlearning_problem
    got = CurvatureCache(model, X, y, mu=0.5, structure=TOY, refine=300, refine_tol=1e-11).update(aff)
    ref = second_order_update(model, X, y, aff, build_solver("exact", curvature="ggn"), mu=0.5, inplace=False)
    assert got.ok and ref.ok
    torch.testing.assert_close(got.theta, ref.theta, rtol=1e-9, atol=1e-10)


def test_toy_cached_unlearning_without_refinement_equals_the_structure_update(unlearning_problem):
    model, X, y, aff = unlearning_problem
    got = CurvatureCache(model, X, y, mu=0.5, structure=TOY, refine=0).update(aff)
    ref = second_order_update(model, X, y, aff, StructureSolver(TOY), mu=0.5, inplace=False)
    torch.testing.assert_close(got.theta, ref.theta, rtol=1e-10, atol=1e-11)
