"""Amortized unlearning: statistics captured once at θ*, updated per request, equal a fresh capture on D̃."""

import functools

import pytest
import torch

from tensorcurv import structures
from tensorcurv.core.capture import capture
from tensorcurv.core.losses import CrossEntropy
from tensorcurv.unlearn import AffectedSet, Objective, StructureSolver, gradient_difference, second_order_update
from tensorcurv.unlearn.cache import CurvatureCache
from tensorcurv.unlearn.ihvp import build_solver
from unlearn_problems import data, logreg, mlp, trained

MU = 0.5


def _requests(X, y):
    idx = torch.tensor([2, 5, 11])
    return {
        "removal": AffectedSet.removal(idx),
        "relabel": AffectedSet.relabel(idx, (y[idx] + 1) % 3),
        "features": AffectedSet(idx, X_new=0.5 * X[idx] + 0.1, y_new=(y[idx] + 2) % 3),
    }


KINDS = ["removal", "relabel", "features"]


@functools.cache
def _theta_star(model_fn):
    X, y = data()
    return trained(model_fn(), X, y, MU).theta()


def _cache(model_fn=mlp, **kw):
    """θ* trained once per model (module-level cache), loaded into a fresh model, and its CurvatureCache."""
    X, y = data()
    model = model_fn()
    Objective(model, "cross_entropy", MU).load(_theta_star(model_fn))
    return model, X, y, CurvatureCache(model, X, y, mu=MU, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_statistics_equal_a_fresh_capture_on_corrected_data(kind):
    model, X, y, cache = _cache()
    aff = _requests(X, y)[kind]
    stats, _ = cache.corrected_stats(aff)
    Xr, yr = aff.apply(X, y)
    fresh = capture(model, cache.curv.adapters, Xr, yr, CrossEntropy("sum"), "ggn").stats
    for k, st in fresh.items():
        torch.testing.assert_close(stats[k].a, st.a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats[k].g, st.g, rtol=1e-12, atol=1e-12)
        assert stats[k].scale == st.scale


@pytest.mark.parametrize("structure", ["kfac", "dense"])
@pytest.mark.parametrize("kind", ["removal", "features"])
def test_downdated_structure_equals_its_fit_on_corrected_data(kind, structure):
    model, X, y, cache = _cache(structure=structure, refine=0)
    aff = _requests(X, y)[kind]
    stats, new_rows = cache.corrected_stats(aff)
    blocks = cache.corrected_blocks(aff, stats, new_rows)
    Xr, yr = aff.apply(X, y)
    fresh = capture(model, cache.curv.adapters, Xr, yr, CrossEntropy("sum"), "ggn").stats
    for k, st in fresh.items():
        ref = structures.create(structure, st.shape).fit(st).tensors()
        for name, t in ref.items():  # K-FAC: A, G; dense: C
            torch.testing.assert_close(blocks[k].tensors()[name], t, rtol=1e-11, atol=1e-11)


def test_relabel_request_reuses_the_cached_structure():
    model, X, y, cache = _cache()
    aff = _requests(X, y)["relabel"]
    stats, new_rows = cache.corrected_stats(aff)
    assert stats is cache.stats and cache.corrected_blocks(aff, stats, new_rows) is cache.curv.blocks


@pytest.mark.parametrize("kind", KINDS)
def test_cached_gradient_difference_equals_autograd_gradient_difference(kind):
    model, X, y, cache = _cache()
    aff = _requests(X, y)[kind]
    ref = gradient_difference(cache.obj, cache.theta_star, X, y, aff)
    torch.testing.assert_close(cache.gradient_difference(aff), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_fn", [logreg, mlp])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_update_equals_non_cached_refined_update(kind, model_fn):
    model, X, y, cache = _cache(model_fn, refine=300, refine_tol=1e-11)
    aff = _requests(X, y)[kind]
    got = cache.update(aff)
    ref = second_order_update(
        model, X, y, aff, StructureSolver("kfac", refine=300, refine_tol=1e-11), mu=MU, inplace=False
    )
    assert got.ok and ref.ok
    torch.testing.assert_close(got.theta, ref.theta, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_cached_update_without_refinement_equals_structure_update(structure):
    model, X, y, cache = _cache(structure=structure, refine=0)
    aff = _requests(X, y)["removal"]
    got = cache.update(aff)
    ref = second_order_update(model, X, y, aff, StructureSolver(structure), mu=MU, inplace=False)
    torch.testing.assert_close(got.theta, ref.theta, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_dense_update_of_logistic_regression_equals_exact_newton_step(kind):
    model, X, y, cache = _cache(logreg, structure="dense", refine=0)
    aff = _requests(X, y)[kind]
    got = cache.update(aff)
    ref = second_order_update(model, X, y, aff, build_solver("exact", curvature="ggn"), mu=MU, inplace=False)
    assert got.ok and ref.ok
    torch.testing.assert_close(got.theta, ref.theta, rtol=1e-9, atol=1e-10)


def test_cache_reports_oneoff_and_per_request_times_and_leaves_model_alone():
    model, X, y, cache = _cache()
    before = cache.obj.theta()
    res = cache.update(_requests(X, y)["relabel"])
    assert res.ok and not res.applied and torch.equal(cache.obj.theta(), before)
    assert cache.oneoff_time >= cache.capture_time > 0 and res.info["oneoff_time"] == cache.oneoff_time
    assert 0 < res.time and set(res.times) == {"grad_diff", "prepare", "solve"}


def test_unconverged_cached_refinement_fails_without_changing_the_model():
    model, X, y, cache = _cache(refine=1, refine_tol=1e-14)
    before = cache.obj.theta()
    res = cache.update(_requests(X, y)["removal"], inplace=True)
    assert not res.ok and "not converged" in res.status and not res.applied
    assert torch.equal(cache.obj.theta(), before)


def test_cache_rejects_structures_that_couple_the_layers_and_bad_indices():
    X, y = data()
    model = mlp()
    with pytest.raises(ValueError, match="couples the layers"):
        CurvatureCache(model, X, y, mu=MU, structure="two_level")
    cache = CurvatureCache(model, X, y, mu=MU)
    with pytest.raises(ValueError, match="out of range"):
        cache.update(AffectedSet.removal([30]))


def test_harness_separates_per_request_time_from_the_oneoff_capture():
    from tensorcurv.unlearn.evaluate import MethodSpec, evaluate_methods

    X, y = data()
    model = logreg()
    aff = _requests(X, y)["relabel"]
    specs = [
        MethodSpec("c", solver="kfac", cached=True, solver_kwargs={"refine": 50}),
        MethodSpec("f", solver="kfac", solver_kwargs={"refine": 50}),
    ]
    rows, ref = evaluate_methods(model, X, y, aff, X[:10], y[:10], specs, mu=MU)
    by = {r["method"]: r for r in rows}
    assert by["c"]["time_oneoff"] > 0 and by["f"]["time_oneoff"] == 0.0
    assert by["c"]["speedup"] == pytest.approx(ref.retrain_time / by["c"]["time"])
    with_oneoff = by["c"]["time"] + by["c"]["time_oneoff"]
    assert by["c"]["speedup_incl_oneoff"] == pytest.approx(ref.retrain_time / with_oneoff)
    assert by["c"]["rel_dist"] == pytest.approx(by["f"]["rel_dist"], rel=1e-6)
