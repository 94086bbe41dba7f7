"""``dense_full`` is the exact model curvature ``scale JᵀJ`` (torch.func reference on a tiny float64 model) and
refuses models above ``max_dim`` with a one-line error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structure_problems import rel, tiny_batch, tiny_model
from tensorcurv import Curvature, structures
from tensorcurv.linalg import vec


def _per_sample_jacobian_fisher(model, x, y):
    """Empirical Fisher ``(1/N) Σ_s ∇ℓ_s ∇ℓ_sᵀ`` of the mean cross-entropy over the Linear layers' ``vec([W, b])``."""
    rows = []
    for s in range(x.shape[0]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[s : s + 1]), y[s : s + 1]).backward()
        rows.append(
            torch.cat(
                [vec(torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)) for m in model if isinstance(m, nn.Linear)]
            )
        )
    J = torch.stack(rows)
    return J.T @ J / x.shape[0]


def test_full_dense_equals_the_empirical_fisher_with_its_cross_layer_blocks():
    model = tiny_model("linear")
    x, y = tiny_batch("linear")
    curv = Curvature(model, "dense_full", "empirical")
    curv.fit_stats(curv.capture(x, y, nn.CrossEntropyLoss()).stats)
    want = _per_sample_jacobian_fisher(tiny_model("linear"), x, y)
    assert rel(curv.model_structure.to_dense(), want) < 1e-10


def test_full_dense_solve_is_the_damped_inverse():
    model = tiny_model("linear")
    x, y = tiny_batch("linear")
    curv = Curvature(model, "dense_full", "ggn")
    curv.fit_stats(curv.capture(x, y, nn.CrossEntropyLoss()).stats)
    ms = curv.model_structure
    v = torch.randn(ms.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_ = torch.cat([vec(M) for M in ms.solve(ms.from_vector(v), 1e-3).values()])
    assert rel((ms.to_dense() + 1e-3 * torch.eye(ms.dim, dtype=torch.float64)) @ x_, v) < 1e-10


def test_its_blocks_are_the_layer_dense_blocks():
    model = tiny_model("linear")
    x, y = tiny_batch("linear")
    full, block = Curvature(model, "dense_full", "ggn"), Curvature(model, "dense", "ggn")
    stats = full.capture(x, y, nn.CrossEntropyLoss()).stats
    full.fit_stats(stats)
    block.fit_stats(stats)
    for nm in full.model_structure.shapes:
        assert rel(full.model_structure.blocks[nm].to_dense(), block.model_structure.blocks[nm].to_dense()) < 1e-12


def test_models_above_max_dim_are_refused_in_one_line():
    with pytest.raises(
        ValueError, match=r"^dense_full: the model has D = 55 covered parameters, above max_dim=50[^\n]*$"
    ):
        structures.get("dense_full")({"a": (5, 7), "b": (4, 5)}, structures.make_hparams("dense_full", max_dim=50))
