"""``exact_batch`` solves with the exact mini-batch curvature ``c PᵀP`` of all layers (cross-layer blocks
included): checked against dense float64 references (torch.func for ggn/empirical, ``dense_full`` on the same
capture for mc) on a tiny MLP and a tiny CNN. Tolerance 1e-10: float64 with damped systems of condition
number below 1e4 on these problems, so rounding stays near 1e-12."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from reference import full_block
from structure_problems import rel, tiny_batch, tiny_model
from tensorcurv import Curvature, structures
from tensorcurv.core.exact import ParamLayout
from tensorcurv.core.stats import LayerStats, NonFiniteError
from tensorcurv.optim import NaturalGradient

LAM = 1e-2
TOL = 1e-10


def _fitted(model_name: str, kind: str, n: int = 10, seed: int = 1, **hp):
    model = tiny_model(model_name)
    x, y = tiny_batch(model_name, n, seed)
    curv = Curvature(model, "exact_batch", kind, seed=0, **hp)
    stats = curv.capture(x, y, nn.CrossEntropyLoss()).stats
    curv.fit_stats(stats)
    return curv, stats, model, x, y


def _dense_solve(C: torch.Tensor, v: torch.Tensor, lam: float = LAM) -> torch.Tensor:
    return torch.linalg.solve(C + lam * torch.eye(C.shape[0], dtype=C.dtype), v)


def _random(dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_name", ["linear", "conv"])
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_solve_is_the_damped_inverse_of_the_full_torch_func_curvature(model_name, kind):
    curv, _, model, x, y = _fitted(model_name, kind)
    C, _, _ = full_block(tiny_model(model_name), x, y, "cross_entropy", kind)
    layout = ParamLayout(curv.named_params, curv.adapters)
    v = _random(C.shape[0])
    got = layout.to_flat(curv.model_structure.solve(layout.to_mats(v), LAM))
    assert rel(got, _dense_solve(C, v)) < TOL


@pytest.mark.parametrize("model_name", ["linear", "conv"])
def test_mc_solve_is_the_damped_inverse_of_dense_full_on_the_same_capture(model_name):
    curv, stats, model, _, _ = _fitted(model_name, "mc")
    full = structures.get("dense_full")(curv.model_structure.shapes).fit(stats)
    ms = curv.model_structure
    v = _random(ms.dim)
    got = ms.to_vector(ms.solve(ms.from_vector(v), LAM))
    assert rel(got, _dense_solve(full.to_dense(), v)) < TOL


def test_window_two_is_the_decay_weighted_average_of_the_two_captures():
    model = tiny_model("linear")
    curv = Curvature(model, "exact_batch", "ggn", window=2)
    dense = Curvature(model, "dense_full", "ggn")
    Cs = []
    for n, seed in ((10, 1), (7, 2)):  # different batch sizes: scales 1/10 and 1/7
        x, y = tiny_batch("linear", n, seed)
        stats = curv.capture(x, y, nn.CrossEntropyLoss()).stats
        curv.fit_stats(stats, decay=None if not Cs else 0.5)
        Cs.append(dense.model_structure.fit(stats).to_dense())
    want = (0.5 * Cs[0] + 1.0 * Cs[1]) / 1.5  # w ∝ decay^age: the newest 1, the older 0.5
    ms = curv.model_structure
    v = _random(ms.dim)
    assert rel(ms.to_vector(ms.solve(ms.from_vector(v), LAM)), _dense_solve(want, v)) < TOL


def test_window_one_keeps_only_the_newest_capture():
    curv, _, model, _, _ = _fitted("linear", "ggn")
    x, y = tiny_batch("linear", 8, seed=5)
    stats = curv.capture(x, y, nn.CrossEntropyLoss()).stats
    curv.fit_stats(stats, decay=0.9)
    want = structures.get("dense_full")(curv.model_structure.shapes).fit(stats).to_dense()
    assert rel(curv.model_structure.to_dense(), want) < 1e-14


def test_state_round_trip_gives_the_same_solve_bit_for_bit():
    curv, _, model, _, _ = _fitted("conv", "ggn", window=2)
    x, y = tiny_batch("conv", 6, seed=4)
    curv.update(x, y, nn.CrossEntropyLoss(), decay=0.8)
    copy = Curvature(tiny_model("conv"), "exact_batch", "ggn", seed=0, window=2)
    copy.load_state_dict(curv.state_dict())
    grads = [torch.randn_like(p) for p in curv.params]
    assert all(torch.equal(a, b) for a, b in zip(copy.solve(grads, LAM), curv.solve(grads, LAM)))


def test_more_terms_than_max_terms_are_refused_in_one_line_naming_the_hparam_and_nothing_changes():
    # the GGN of a 4-class cross-entropy has K = C - 1 = 3 columns per sample
    curv, _, model, _, _ = _fitted("linear", "ggn", max_terms=40)  # J = 10 samples x 3 = 30
    before = curv.model_structure.to_dense()
    x, y = tiny_batch("linear", 16, seed=3)  # J = 48
    with pytest.raises(ValueError) as err:
        curv.update(x, y, nn.CrossEntropyLoss())
    assert re.fullmatch(r"exact_batch\.max_terms=40 is below the J = 48 [^\n]*", str(err.value))
    assert torch.equal(curv.model_structure.to_dense(), before)


def test_non_finite_statistics_raise_and_leave_the_state_unchanged():
    curv, stats, _, _, _ = _fitted("linear", "ggn")
    ms = curv.model_structure
    before, captures = ms.to_dense(), list(ms.captures)
    bad = {k: LayerStats(st.a.clone(), st.g.clone(), st.scale, name=k) for k, st in stats.items()}
    bad["0"].a[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        ms.update(bad, 0.5)
    assert torch.equal(ms.to_dense(), before) and ms.captures == captures


def test_a_natural_gradient_step_is_the_exact_damped_gauss_newton_step():
    model = tiny_model("conv")
    x, y = tiny_batch("conv")
    C, names, _ = full_block(tiny_model("conv"), x, y, "cross_entropy", "ggn")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), "exact_batch", kind="ggn", lr=0.5, damping=LAM)
    opt.step(x, y)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert rel(after - theta, -0.5 * _dense_solve(C, g)) < TOL


def test_krylov_refinement_on_top_of_it_converges_in_one_iteration():
    model = tiny_model("linear")
    x, y = tiny_batch("linear")
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), "exact_batch", kind="ggn", damping=LAM, refine=5)
    opt.step(x, y)
    assert opt.info["refine_iterations"] == 1 and opt.info["refine_residual"] < TOL


def test_float32_statistics_are_solved_in_float64_and_returned_in_float32():
    curv64, stats, _, _, _ = _fitted("linear", "ggn")
    stats32 = {k: LayerStats(st.a.float(), st.g.float(), st.scale, name=k) for k, st in stats.items()}
    ms = structures.get("exact_batch")(curv64.model_structure.shapes).fit(stats32)
    exact = structures.get("exact_batch")(curv64.model_structure.shapes).fit(
        {k: LayerStats(st.a.double(), st.g.double(), st.scale, name=k) for k, st in stats32.items()}
    )
    v = _random(ms.dim)
    got = ms.solve(ms.from_vector(v.float()), LAM)
    assert all(t.dtype == torch.float32 for t in got.values())
    assert rel(ms.to_vector(got).double(), ms.to_vector(exact.solve(ms.from_vector(v), LAM))) < 1e-6


@pytest.mark.parametrize("hp", [{"window": 0}, {"max_terms": 0}, {"solve_dtype": "float16"}])
def test_invalid_hyper_parameters_are_refused(hp):
    with pytest.raises(ValueError, match=r"^exact_batch\."):
        structures.make_hparams("exact_batch", **hp)
