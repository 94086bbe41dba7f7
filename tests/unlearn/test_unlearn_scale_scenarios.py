"""The scale benchmark's scenario pieces: feature zeroing, upscaled images with a backdoor, held-out sets."""

import pytest
import torch

from tensorcurv.unlearn.scenarios import backdoor, check_name, feature, label_flip, make, upscale, zero_feature


def _images(n=40, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 1, size, size, generator=gen)
    y = torch.arange(n) % 4
    return X, y


def test_zero_feature_sets_only_that_feature_to_zero():
    X = torch.ones(3, 2, 2)
    Z = zero_feature(X, 1)
    assert Z.shape == X.shape
    assert Z.reshape(3, -1)[:, 1].abs().sum() == 0
    assert Z.reshape(3, -1)[:, [0, 2, 3]].eq(1).all()


def test_zero_feature_rejects_an_index_outside_the_row():
    with pytest.raises(ValueError, match="feature 4 is not a flat index of a row of 4 features"):
        zero_feature(torch.ones(3, 4), 4)


def test_feature_scenario_affects_every_point_with_the_feature_zeroed():
    X = torch.randn(10, 5)
    X[:, 3] *= 10  # the feature of largest variance
    sc = feature(X, torch.zeros(10, dtype=torch.long), X[:4], torch.zeros(4, dtype=torch.long), 2)
    assert sc.affected.indices.tolist() == list(range(10))
    assert sc.affected.X_new[:, 3].abs().sum() == 0
    assert torch.equal(sc.affected.X_new[:, [0, 1, 2, 4]], X[:, [0, 1, 2, 4]])
    assert sc.X_test[:, 3].abs().sum() == 0
    assert sc.heldout is None


def test_upscale_gives_the_requested_size_and_keeps_a_constant_image_constant():
    X = torch.full((2, 1, 8, 8), 0.7)
    U = upscale(X, 16)
    assert U.shape == (2, 1, 16, 16)
    torch.testing.assert_close(U, torch.full_like(U, 0.7))


def test_backdoor_on_upscaled_images_stamps_the_patch_and_the_target():
    X, y = _images()
    X = upscale(X, 16)
    sc = backdoor(X, y, X[:20], y[:20], 4, fraction=0.2, target=1, patch=3, trigger_value=5.0)
    idx = sc.affected.indices
    assert sc.X[idx][..., -3:, -3:].eq(5.0).all()
    assert sc.y[idx].eq(1).all()
    assert torch.equal(sc.affected.X_new, X[idx])  # the correction is the clean image


def test_backdoor_heldout_points_are_triggered_test_images_labelled_with_the_target():
    X, y = _images()
    sc = backdoor(X, y, X[:20], y[:20], 4, fraction=0.2, target=1, patch=2)
    Xh, yh = sc.heldout
    assert len(yh) == len(sc.affected)
    assert Xh[..., -2:, -2:].eq(5.0).all() and yh.eq(1).all()


def test_label_flip_heldout_labels_are_all_wrong():
    X, y = _images()
    sc = label_flip(X, y, X[:20], y[:20], 4, fraction=0.2)
    Xh, yh = sc.heldout
    truth = {tuple(x.flatten().tolist()): int(c) for x, c in zip(X[:20], y[:20])}
    assert all(truth[tuple(x.flatten().tolist())] != int(c) for x, c in zip(Xh, yh))


def test_unknown_scenario_names_the_key_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown scenario 'flip'; valid: .*label_flip.*feature"):
        check_name("flip")
    X, y = _images()
    with pytest.raises(ValueError, match="unknown scenario 'flip'"):
        make("flip", X, y, X, y, 4)
