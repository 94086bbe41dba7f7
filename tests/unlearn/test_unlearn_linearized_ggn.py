"""The GGN linearized once at θ: the same product as Objective.ggn_vp, re-weighted per row, served to the cache."""

import pytest
import torch
from torch import nn

from tensorcurv.unlearn import AffectedSet, Objective
from tensorcurv.unlearn.cache import CurvatureCache
from tensorcurv.unlearn.linearized_ggn import LinearizedGGN
from unlearn_problems import data, mlp, trained

MU = 0.5


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)
    ).double()


@pytest.mark.parametrize("model_fn", [mlp, _conv_net])
def test_product_equals_objective_ggn_vp_without_mu(model_fn):
    X, y = data()
    obj = Objective(model_fn(), "cross_entropy", MU)
    theta = obj.theta()
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = obj.ggn_vp(theta, X, y, v) - MU * v
    torch.testing.assert_close(LinearizedGGN(obj, theta, X).mv(v), expected, rtol=1e-12, atol=1e-12)


def test_zero_weights_drop_rows():
    X, y = data()
    obj = Objective(mlp(), "cross_entropy", MU)
    theta = obj.theta()
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = torch.ones(len(y), dtype=torch.float64)
    w[[0, 7, 9]] = 0.0
    keep = w.bool()
    expected = obj.ggn_vp(theta, X[keep], y[keep], v) - MU * v
    torch.testing.assert_close(LinearizedGGN(obj, theta, X).mv(v, w), expected, rtol=1e-12, atol=1e-12)


def test_weights_of_the_wrong_length_are_rejected():
    X, _ = data()
    obj = Objective(mlp(), "cross_entropy", MU)
    with pytest.raises(ValueError, match="weights must have shape"):
        LinearizedGGN(obj, obj.theta(), X).mv(torch.zeros(obj.dim, dtype=torch.float64), torch.ones(3))


@pytest.mark.parametrize("kind", ["removal", "relabel", "features"])
def test_cached_refinement_on_the_linearized_ggn_equals_the_statistics_route(kind):
    X, y = data()
    model = mlp()
    trained(model, X, y, MU)
    idx = torch.tensor([2, 5, 11])
    aff = {
        "removal": AffectedSet.removal(idx),
        "relabel": AffectedSet.relabel(idx, (y[idx] + 1) % 3),
        "features": AffectedSet(idx, X_new=0.5 * X[idx] + 0.1, y_new=(y[idx] + 2) % 3),
    }[kind]
    kw = dict(mu=MU, structure="kfac", refine=4, refine_strict=False)
    via_stats = CurvatureCache(model, X, y, **kw).update(aff)
    via_linearization = CurvatureCache(model, X, y, refine_operator="linearized", **kw).update(aff)
    assert via_linearization.ok
    torch.testing.assert_close(via_linearization.theta, via_stats.theta, rtol=1e-10, atol=1e-12)


def test_unknown_refine_operator_is_a_clear_error():
    X, y = data()
    with pytest.raises(ValueError, match="unknown refine_operator 'autograd'; valid:"):
        CurvatureCache(mlp(), X, y, mu=MU, refine_operator="autograd")
