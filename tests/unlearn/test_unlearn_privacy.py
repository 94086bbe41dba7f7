"""Membership-inference AUC / advantage and the restored-share formula on constructed cases."""

import math

import pytest
import torch

from tensorcurv.unlearn.privacy import loss_threshold_advantage, loss_threshold_auc, restored_share


def test_auc_is_one_when_every_member_loss_is_below_every_nonmember_loss():
    assert loss_threshold_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4, 0.5])) == 1.0


def test_auc_is_one_half_for_identical_loss_distributions():
    a = torch.tensor([0.1, 0.2, 0.3])
    assert loss_threshold_auc(a, a.clone()) == pytest.approx(0.5)


def test_auc_counts_pairs_and_half_ties():
    # pairs (a, b): (1,0) no, (1,1) tie, (1,2) yes, (3,0) no, (3,1) no, (3,2) no -> (1 + 0.5) / 6
    assert loss_threshold_auc(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0, 2.0])) == pytest.approx(1.5 / 6)


def test_advantage_is_the_largest_tpr_minus_fpr_gap():
    # threshold 0.2: TPR 2/2, FPR 1/4 -> 0.75
    adv = loss_threshold_advantage(torch.tensor([0.1, 0.2]), torch.tensor([0.15, 0.3, 0.4, 0.5]))
    assert adv == pytest.approx(0.75)


def test_empty_member_set_is_an_error():
    with pytest.raises(ValueError, match="at least one member"):
        loss_threshold_auc(torch.tensor([]), torch.tensor([1.0]))


def test_restored_share_formula():
    assert restored_share(0.93, 0.90, 0.95) == pytest.approx(0.6)  # (0.93 − 0.90) / (0.95 − 0.90)
    assert restored_share(0.95, 0.90, 0.95) == pytest.approx(1.0)
    assert restored_share(0.89, 0.90, 0.95) == pytest.approx(-0.2)


def test_restored_share_is_nan_when_poisoning_cost_nothing():
    assert math.isnan(restored_share(0.9, 0.9, 0.9))
