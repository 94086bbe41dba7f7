"""The reference layers are fixed: the same factors in every process, and training changes them."""

import torch

from tensorcurv.experiments.reference_layers import reference_stats


def test_reference_stats_are_reproducible():
    a = reference_stats("mlp", trained=False, kind="empirical", batch=32)["5"]
    b = reference_stats("mlp", trained=False, kind="empirical", batch=32)["5"]
    assert torch.equal(a.a, b.a) and torch.equal(a.g, b.g)


def test_trained_reference_layers_differ_from_their_initialization():
    a = reference_stats("autoencoder", trained=False, batch=32)["3"]
    b = reference_stats("autoencoder", trained=True, batch=32)["3"]
    assert a.shape == b.shape == (32, 129)
    assert not torch.allclose(a.g, b.g)
