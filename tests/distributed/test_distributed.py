"""Data-parallel curvature on 2 CPU processes (gloo, spawned here) equals the single process on the
global batch.

One spawn runs every distributed computation and saves each rank's results; the tests compare
them with a single-process run in this process. Shards are unequal (6 + 5 samples of 11) so the
global loss scale 1/N (not 1/N_r) is exercised.

Tolerances (float64, docs/guide/distributed.md):

* one fit / running-average update / solve from the same parameters: rel 1e-12 for every structure.
  Moment structures sum per-rank partial sums (rounding ~1e-16); gathered structures run the
  owner's fit on the very samples of the single process, in the same order.
* training steps: the global gradient is a sum of per-rank partial sums, which differs from the
  single process's one-GEMM sum by rounding, so from step 2 on the two runs start from parameters
  that differ by ~1e-16. Where the step is a well-conditioned function of the parameters the runs
  stay within rel 1e-12 (``TRAIN_REL``). Two structures are not: ``kron_sum`` with the spectral PSD
  certificate (blocks with n·m > 1024) scales its tail by a ``t`` computed from 40-step Lanczos
  Ritz values, which move ~1e-4 relative for a 1e-11 change of the factors (measured on the digits
  MLP), and ``tucker``'s HOOI stops on a tolerance. A single process with each batch merely reversed
  (summation order only) drifts by the same amount, so this is the structures' conditioning, not
  the data-parallel code; the bound ``ILL_CONDITIONED_REL`` is the measured float64 drift on the
  digits MLP (2.5e-6 after 20 steps, ``scripts/distributed_drift.py``) with a margin.
"""

from __future__ import annotations

import functools
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import tensorcurv.distributed as tdist
from tensorcurv import optim, structures
from tensorcurv.curvature import Curvature

WORLD = 2
N = 11  # fits: unequal shards 6 + 5
TRAIN_N = 12  # training: equal shards, as DDP's gradient averaging (first-order baselines) assumes
REL = 1e-12  # one fit from the same parameters
TRAIN_REL = 1e-12  # training steps of well-conditioned structures
ILL_CONDITIONED_REL = 1e-5  # training steps of kron_sum's spectral PSD certificate and tucker's HOOI (see above)
TRAIN_STEPS = 4
# tucker's factors are unique only up to signs (the owner's and the single process's fits can differ by
# them while Ĉ agrees to 1e-15), and its PCG solve (relative residual pcg_tol = 1e-8) amplifies that
# rounding-level difference of the operator by up to κ·ε: measured 1.8e-11; the bound is pcg_tol
SOLVE_REL = {"tucker": 1e-8}
# label -> (structure, hparams); every registered structure, plus kron_sum's running-average paths
VARIANTS = {
    "kfac": ("kfac", {}),
    "ekfac": ("ekfac", {}),
    "dense": ("dense", {}),
    "diagonal": ("diagonal", {}),
    "kron_sum": ("kron_sum", {"rank": 2, "tol": 1e-12, "max_iter": 30}),
    # rank 3 with the sample certificate: update() uses the PSD intervals the owner's previous fit stored
    "kron_sum rank 3 interval certificate": (
        "kron_sum",
        {"rank": 3, "psd": "shrink", "psd_proof": "samples", "tol": 1e-12, "max_iter": 30},
    ),
    "tt": ("tt", {"ranks": 1}),
    "tucker": ("tucker", {}),
    "two_level": ("two_level", {}),
}
VARIANTS = {k: v for k, v in VARIANTS.items() if v[0] in structures.names()}
STRUCTS = list(VARIANTS)
# training runs: label -> (model width, structure, hparams, tolerance); width 33 makes the middle layer
# 32 x 34 (n·m = 1088 > 1024), where kron_sum's PSD repair takes the spectral (Lanczos) certificate
TRAIN_VARIANTS = {
    label: (6, name, hp, ILL_CONDITIONED_REL if name == "tucker" else TRAIN_REL)
    for label, (name, hp) in VARIANTS.items()
}
TRAIN_VARIANTS["kron_sum spectral PSD certificate"] = (
    33,
    "kron_sum",
    {"rank": 2, "psd": "shrink"},
    ILL_CONDITIONED_REL,
)
TRAIN_VARIANTS["kron_sum spectral width, psd=none"] = (33, "kron_sum", {"rank": 2, "psd": "none"}, TRAIN_REL)
TRAIN_KW = dict(damping=1e-2, decay=0.9, kl_clip=1e-3)  # the training default kl_clip: a stable regime


def _model(seed: int = 0, width: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    if width == 6:
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    return nn.Sequential(
        nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width - 1), nn.Tanh(), nn.Linear(width - 1, 4)
    ).double()


def _batch(seed: int, n: int = N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def _vectors(model: nn.Module):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int, timeout_s: float, **comm_options):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    return tdist.init("gloo", timeout_s, rank=rank, world_size=WORLD, **comm_options)


# ---------------------------------------------------------------------- what each rank runs
def _fit_all(comm, kind="ggn"):
    out = {}
    (x1, y1), (x2, y2) = _batch(1), _batch(2)
    for label, (name, hp) in VARIANTS.items():
        curv = tdist.DistributedCurvature(_model(), name, kind, comm=comm, **hp)
        curv.update(tdist.world_batch(x1, comm.rank, WORLD), tdist.world_batch(y1, comm.rank, WORLD), "cross_entropy")
        fit = curv.state_dict()
        curv.update(
            tdist.world_batch(x2, comm.rank, WORLD), tdist.world_batch(y2, comm.rank, WORLD), "cross_entropy", decay=0.7
        )
        out[label] = {
            "fit": fit,
            "ema": curv.state_dict(),
            "solve": curv.solve(_vectors(curv.model), damping=1e-2),
            "owner": dict(curv.owner),
        }
    return out


#: Krylov refinement on the exact curvature: under data parallelism its products are all-reduced
REFINED = dict(structure="kfac", damping=1e-2, decay=0.9, refine=3, refine_tol=1e-14)


def _train(comm, name, steps=3, width=6, **kw):
    model = _model(width=width)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = optim.build(name, ddp, "cross_entropy", **kw)
    for t in range(steps):
        x, y = _batch(10 + t, TRAIN_N)
        opt.step(tdist.world_batch(x, comm.rank, WORLD), tdist.world_batch(y, comm.rank, WORLD))
    return [p.detach().clone() for p in model.parameters()]


def _train_all(comm):
    return {
        label: _train(comm, "gauss_newton", TRAIN_STEPS, width, structure=name, **hp, **TRAIN_KW)
        for label, (width, name, hp, _) in TRAIN_VARIANTS.items()
    }


def _main(rank, port, out_dir):
    comm = _init(rank, port, 30.0)
    res = {"ggn": _fit_all(comm), "empirical": {"kfac": _fit_all_kind(comm, "empirical")}}
    res["train_gn_kfac"] = _train(comm, "gauss_newton", structure="kfac", damping=1e-2, decay=0.9)
    res["train_ng_kron_sum"] = _train(
        comm,
        "gauss_newton",
        structure="kron_sum",
        rank=2,
        psd="shrink",
        damping=1e-2,
        decay=0.9,
        inverse_interval=2,
        damping_kind="pi",
        max_iter=10,
    )
    res["train_adam"] = _train(comm, "adam", lr=1e-2)
    res["train_gn_kfac_refined"] = _train(comm, "gauss_newton", **REFINED)
    res["train_gn_kfac_refined_func"] = _train(comm, "gauss_newton", **REFINED, refine_operator="func")
    res["train_all"] = _train_all(comm)
    comm32 = tdist.Comm(comm_dtype=torch.float32)
    curv = tdist.DistributedCurvature(_model(), "kron_sum", "ggn", comm=comm32, rank=2, tol=1e-12, max_iter=30)
    x, y = _batch(1)
    curv.update(tdist.world_batch(x, rank, WORLD), tdist.world_batch(y, rank, WORLD), "cross_entropy")
    res["fp32"] = {
        "state": curv.state_dict(),
        "solve": curv.solve(_vectors(curv.model), damping=1e-2),
        "bytes": curv.last_comm_bytes,
    }
    try:
        tdist.DistributedCurvature(_model(), "kfac" if rank == 0 else "diagonal", "ggn", comm=comm)
        res["mismatch"] = "no error"
    except RuntimeError as e:
        res["mismatch"] = str(e)
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    tdist.shutdown()


def _fit_all_kind(comm, kind):
    x, y = _batch(1)
    curv = tdist.DistributedCurvature(_model(), "kfac", kind, comm=comm)
    curv.update(tdist.world_batch(x, comm.rank, WORLD), tdist.world_batch(y, comm.rank, WORLD), "cross_entropy")
    return curv.state_dict()


def _crash(rank, port, out_dir):
    comm = _init(rank, port, 10.0)
    if rank == 1:
        raise RuntimeError("rank 1 exploded before the collective")
    x, y = _batch(1)
    tdist.DistributedCurvature(_model(), "kfac", "ggn", comm=comm).update(x, y, "cross_entropy")


def _hang(rank, port, out_dir):
    comm = _init(rank, port, 3.0)
    curv = tdist.DistributedCurvature(_model(), "kfac", "ggn", comm=comm)
    if rank == 1:
        time.sleep(60)  # alive but never joins the fit's collectives
    x, y = _batch(1)
    curv.update(x, y, "cross_entropy")


def _spawn(fn, tmp_path):
    t0 = time.perf_counter()
    try:
        # fork: the children inherit the imported modules (spawn re-imports torch: ~10 s on 2 busy cores)
        mp.start_processes(fn, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
        err = None
    except Exception as e:  # noqa: BLE001 - the tests inspect it
        err = "".join(traceback.format_exception(e))
    return err, time.perf_counter() - t0


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    err, _ = _spawn(_main, d)
    assert err is None, err
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@functools.cache
def _single_cached(name):
    return _single(name)


def _single(label, kind="ggn", hp=None):
    name, default_hp = VARIANTS.get(label, (label, {}))
    curv = Curvature(_model(), name, kind, **(default_hp if hp is None else hp))
    (x1, y1), (x2, y2) = _batch(1), _batch(2)
    curv.update(x1, y1, "cross_entropy")
    fit = curv.state_dict()
    curv.update(x2, y2, "cross_entropy", decay=0.7)
    return curv, fit


def _dense(label, state):
    name, hp = VARIANTS.get(label, (label, {}))
    curv = Curvature(_model(), name, "ggn", **hp)
    curv.load_state_dict(state)
    return {k: b.to_dense() for k, b in curv.blocks.items()}


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _assert_blocks_equal(name, state, ref_state, rel=REL):
    got, ref = _dense(name, state), _dense(name, ref_state)
    for k in ref:
        assert _rel(got[k], ref[k]) < rel, (name, k, _rel(got[k], ref[k]))


# ---------------------------------------------------------------------- tests: structures
@pytest.mark.parametrize("name", list(STRUCTS))
def test_fitted_structure_equals_single_process_on_global_batch(ranks, name):
    _, ref = _single_cached(name)
    for r in range(WORLD):
        _assert_blocks_equal(name, ranks[r]["ggn"][name]["fit"], ref)


@pytest.mark.parametrize("name", list(STRUCTS))
def test_running_average_update_equals_single_process(ranks, name):
    ref, _ = _single_cached(name)
    for r in range(WORLD):
        _assert_blocks_equal(name, ranks[r]["ggn"][name]["ema"], ref.state_dict())


@pytest.mark.parametrize("name", list(STRUCTS))
def test_preconditioned_gradients_equal_single_process(ranks, name):
    ref, _ = _single_cached(name)
    want = ref.solve(_vectors(ref.model), damping=1e-2)
    for r in range(WORLD):
        for g, w in zip(ranks[r]["ggn"][name]["solve"], want):
            assert _rel(g, w) < SOLVE_REL.get(name, REL)


def test_empirical_fisher_kfac_equals_single_process(ranks):
    curv = Curvature(_model(), "kfac", "empirical")
    curv.update(*_batch(1), "cross_entropy")
    for r in range(WORLD):
        got = Curvature(_model(), "kfac", "empirical")
        got.load_state_dict(ranks[r]["empirical"]["kfac"])
        for k in curv.blocks:
            assert _rel(got.blocks[k].to_dense(), curv.blocks[k].to_dense()) < REL


def test_layers_are_spread_over_both_ranks(ranks):
    assert set(ranks[0]["ggn"]["kfac"]["owner"].values()) == {0, 1}


def test_float32_communication_is_identical_on_ranks_and_close_to_float64(ranks):
    _, ref = _single("kron_sum", hp=dict(rank=2, tol=1e-12, max_iter=30))
    s0, s1 = ranks[0]["fp32"]["state"], ranks[1]["fp32"]["state"]
    b0, b1 = s0["model_structure"]["blocks"], s1["model_structure"]["blocks"]
    for k in b0:
        for tk, t in b0[k]["tensors"].items():
            assert torch.equal(t, b1[k]["tensors"][tk])
    _assert_blocks_equal("kron_sum", s0, ref, rel=1e-6)
    assert _assert_not_exact(s0, ref)


def _assert_not_exact(state, ref):
    got, want = _dense("kron_sum", state), _dense("kron_sum", ref)
    return any(_rel(got[k], want[k]) > 1e-12 for k in want)  # rounding to float32 really happened


# ---------------------------------------------------------------------- tests: training
def _single_train(name, steps=3, **kw):
    model = _model()
    opt = optim.build(name, model, "cross_entropy", **kw)
    for t in range(steps):
        opt.step(*_batch(10 + t, TRAIN_N))
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize(
    "key,name,kw",
    [
        ("train_gn_kfac", "gauss_newton", dict(structure="kfac", damping=1e-2, decay=0.9)),
        (
            "train_ng_kron_sum",
            "gauss_newton",
            dict(
                structure="kron_sum",
                rank=2,
                psd="shrink",
                damping=1e-2,
                decay=0.9,
                inverse_interval=2,
                damping_kind="pi",
                max_iter=10,
            ),
        ),
        ("train_adam", "adam", dict(lr=1e-2)),
        ("train_gn_kfac_refined", "gauss_newton", REFINED),
        ("train_gn_kfac_refined_func", "gauss_newton", dict(REFINED, refine_operator="func")),
    ],
)
def test_ddp_training_steps_give_single_process_parameters(ranks, key, name, kw):
    want = _single_train(name, **kw)
    for r in range(WORLD):
        for p, w in zip(ranks[r][key], want):
            assert _rel(p, w) < REL


def _single_train_variant(label):
    width, name, hp, _ = TRAIN_VARIANTS[label]
    model = _model(width=width)
    opt = optim.build("gauss_newton", model, "cross_entropy", structure=name, **hp, **TRAIN_KW)
    for t in range(TRAIN_STEPS):
        opt.step(*_batch(10 + t, TRAIN_N))
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("label", list(TRAIN_VARIANTS))
def test_training_steps_of_every_structure_stay_within_the_documented_tolerance(ranks, label):
    tol = TRAIN_VARIANTS[label][3]
    want = _single_train_variant(label)
    for r in range(WORLD):
        err = max(_rel(p, w) for p, w in zip(ranks[r]["train_all"][label], want))
        assert err < tol, (label, err)


def _flat_state(state):
    """Every tensor of a structure's state_dict, by key path (generator state and PSD bounds included)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat_state(v).items()})
        elif isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
            out.update({f"{k}.{i}": x for i, x in enumerate(v)})
        else:
            out[k] = v
    return out


def test_every_rank_holds_the_owners_whole_structure_state(ranks):
    """Not only the factors: the start generator and the certified PSD intervals too, so that rank 0's
    checkpoint resumes every layer, and the owner's next update takes the single process's route."""
    label = "kron_sum rank 3 interval certificate"
    ref, _ = _single_cached(label)
    want = ref.state_dict()["model_structure"]["blocks"]
    for r in range(WORLD):
        got = ranks[r]["ggn"][label]["ema"]["model_structure"]["blocks"]
        for k in want:
            g, w = _flat_state(got[k]), _flat_state(want[k])
            assert set(g) == set(w) and "generator" in g and "psd_bounds.0" in g
            for key in w:
                if isinstance(w[key], torch.Tensor) and w[key].is_floating_point():
                    assert torch.equal(g[key], w[key]) or _rel(g[key], w[key]) < REL, (k, key)
                elif isinstance(w[key], torch.Tensor):  # the generator state: bitwise
                    assert torch.equal(g[key], w[key]), (k, key)
                elif isinstance(w[key], float):
                    assert g[key] == pytest.approx(w[key], rel=REL), (k, key)
                else:
                    assert g[key] == w[key], (k, key)


# ---------------------------------------------------------------------- tests: failures
def test_a_crashing_rank_gives_a_clear_error_not_a_hang(tmp_path):
    err, secs = _spawn(_crash, tmp_path)
    assert err is not None and "rank 1 exploded before the collective" in err
    assert secs < 40


def test_a_rank_that_never_joins_times_out_with_an_error(tmp_path):
    err, secs = _spawn(_hang, tmp_path)
    assert err is not None and ("timed out" in err.lower() or "timeout" in err.lower()), err
    assert secs < 45


def test_mismatched_structures_across_ranks_raise_clearly(ranks):
    assert all("disagree on the curvature" in ranks[r]["mismatch"] for r in range(WORLD))


# ---------------------------------------------------------------------- tests: assignment (no processes)
def test_cost_assignment_balances_better_than_round_robin():
    costs = {"a": 100.0, "b": 1.0, "c": 1.0, "d": 90.0}
    rr = tdist.assignment.loads(tdist.assign(costs, 2, "round_robin"), costs, 2)
    lpt = tdist.assignment.loads(tdist.assign(costs, 2, "cost"), costs, 2)
    assert (max(lpt), max(rr)) == (100.0, 101.0)


def test_unknown_assignment_strategy_is_rejected():
    with pytest.raises(ValueError, match="round_robin"):
        tdist.assign({"a": 1.0}, 2, "random")


# ---------------------------------------------------------------------- tests: config (no processes)
def test_unknown_distributed_config_key_names_the_valid_keys():
    from tensorcurv.distributed.launch import make_config

    with pytest.raises(ValueError, match="valid keys"):
        make_config({"enabled": True, "bakend": "gloo"})


def test_disabled_distributed_session_is_a_single_process_no_op():
    from tensorcurv.distributed.launch import setup

    s = setup({"enabled": False})
    x = torch.arange(6)
    assert s.is_main and s.world_size == 1 and torch.equal(s.shard(x), x)
