"""Did the model forget? A loss-threshold membership-inference attack and the share of lost accuracy restored.

Loss-threshold attack (Yeom et al. 2018): a point is called a member when its loss is below a threshold.
Over all thresholds, with member losses ``a_i`` (the removed points ``Z``) and non-member losses ``b_j``
(held-out points prepared the same way),

    AUC = P(a < b) + ½ P(a = b) = (1/|a||b|) Σ_ij [a_i < b_j] + ½ [a_i = b_j]

(the Mann–Whitney statistic): 0.5 means the attack cannot tell removed from never-seen points;
``advantage = max_t (TPR(t) − FPR(t))`` is the best single-threshold gap.

Restored share of the accuracy lost to poisoning (Warnecke et al.'s measure):

    restored = (acc_after − acc_poisoned) / (acc_retrained − acc_poisoned)

1 when unlearning reaches the retrained model's accuracy, 0 when it does not move; undefined (NaN)
when poisoning cost nothing (``acc_retrained == acc_poisoned``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tensorcurv.unlearn.objective import Objective


def loss_threshold_auc(member_losses: Tensor, nonmember_losses: Tensor) -> float:
    """``P(a < b) + ½ P(a = b)`` for member losses ``a`` and non-member losses ``b`` (1-D, non-empty)."""
    a, b = member_losses.reshape(-1, 1).double(), nonmember_losses.reshape(1, -1).double()
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("membership inference needs at least one member and one non-member loss")
    less = (a < b).double().mean()
    ties = (a == b).double().mean()
    return float(less + 0.5 * ties)


def loss_threshold_advantage(member_losses: Tensor, nonmember_losses: Tensor) -> float:
    """``max_t (P(a ≤ t) − P(b ≤ t))`` over the thresholds ``t`` at every observed loss."""
    a, b = member_losses.reshape(-1).double(), nonmember_losses.reshape(-1).double()
    ts = torch.cat([a, b]).unique()
    tpr = (a.unsqueeze(0) <= ts.unsqueeze(1)).double().mean(1)
    fpr = (b.unsqueeze(0) <= ts.unsqueeze(1)).double().mean(1)
    return float((tpr - fpr).max().clamp_min(0.0))


def membership_metrics(
    obj: Objective, theta: Tensor, members: tuple[Tensor, Tensor], nonmembers: tuple[Tensor, Tensor]
) -> dict[str, float]:
    """``{"mia_auc", "mia_advantage"}`` of the loss-threshold attack at ``θ`` (per-sample losses of ``obj``)."""
    with torch.no_grad():
        la = obj.loss.per_sample(obj.outputs(theta, members[0]), members[1])
        lb = obj.loss.per_sample(obj.outputs(theta, nonmembers[0]), nonmembers[1])
    return {"mia_auc": loss_threshold_auc(la, lb), "mia_advantage": loss_threshold_advantage(la, lb)}


def restored_share(acc_after: float, acc_poisoned: float, acc_retrained: float) -> float:
    """``(acc_after − acc_poisoned) / (acc_retrained − acc_poisoned)``; NaN if the denominator is 0."""
    gap = acc_retrained - acc_poisoned
    if gap == 0 or not math.isfinite(gap):
        return math.nan
    return (acc_after - acc_poisoned) / gap
