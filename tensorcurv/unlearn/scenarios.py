"""Unlearning scenarios on a classification data set: what was trained on, and what to unlearn.

* ``label_flip``: a ``fraction`` of the training labels is replaced by a random *other* class
  (poisoning); the model is trained on the poisoned data; unlearning restores the true labels.
* ``backdoor``: a ``fraction`` of training images of other classes gets a trigger — a
  ``patch x patch`` square in the bottom-right corner set to ``trigger_value`` (in normalized
  units) — and the label ``target``; unlearning restores the clean image and label (feature and
  label correction). Extra set ``backdoor``: triggered test images of other classes labelled
  ``target``, so its accuracy is the backdoor success rate.
* ``deletion``: a random ``fraction`` of the training points is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tensorcurv.core.options import Option
from tensorcurv.unlearn.updates import AffectedSet


class ScenarioName(Option):
    """The unlearning scenarios of :func:`make`."""

    LABEL_FLIP = "label_flip"
    BACKDOOR = "backdoor"
    DELETION = "deletion"


@dataclass
class Scenario:
    name: str
    X: Tensor  # training data as the model was trained on it (poisoned)
    y: Tensor
    affected: AffectedSet
    X_test: Tensor
    y_test: Tensor
    num_classes: int
    extra: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    description: str = ""


def _check_fraction(fraction: float) -> None:
    if not (0.0 < fraction < 1.0):
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")


def _choose(n: int, fraction: float, gen: torch.Generator, pool: Tensor | None = None) -> Tensor:
    pool = torch.arange(n) if pool is None else pool
    k = max(1, round(fraction * n))
    if k > len(pool):
        raise ValueError(f"cannot pick {k} points from a pool of {len(pool)}")
    return pool[torch.randperm(len(pool), generator=gen)[:k]].sort().values


def label_flip(
    X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor, num_classes: int, *, fraction: float = 0.05, seed: int = 0
) -> Scenario:
    _check_fraction(fraction)
    gen = torch.Generator().manual_seed(seed)
    idx = _choose(len(y), fraction, gen)
    shift = torch.randint(1, num_classes, (len(idx),), generator=gen)
    y_pois = y.clone()
    y_pois[idx] = (y[idx] + shift) % num_classes
    return Scenario(
        "label_flip",
        X,
        y_pois,
        AffectedSet.relabel(idx, y[idx].clone()),
        X_test,
        y_test,
        num_classes,
        description=f"{len(idx)} of {len(y)} training labels ({100 * fraction:.0f} %) flipped to another class",
    )


def stamp(X: Tensor, patch: int = 2, value: float = 5.0) -> Tensor:
    """Trigger: the bottom-right ``patch x patch`` pixels of every image set to ``value``."""
    if X.dim() < 3:
        raise ValueError(f"backdoor needs image inputs (N, C, H, W) or (N, H, W), got shape {tuple(X.shape)}")
    out = X.clone()
    out[..., -patch:, -patch:] = value
    return out


def backdoor(
    X: Tensor,
    y: Tensor,
    X_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    *,
    fraction: float = 0.05,
    target: int = 0,
    patch: int = 2,
    trigger_value: float = 5.0,
    seed: int = 0,
) -> Scenario:
    _check_fraction(fraction)
    if not (0 <= target < num_classes):
        raise ValueError(f"target class {target} is not in 0..{num_classes - 1}")
    gen = torch.Generator().manual_seed(seed)
    idx = _choose(len(y), fraction, gen, pool=(y != target).nonzero().squeeze(1))
    Xp, yp = X.clone(), y.clone()
    Xp[idx] = stamp(X[idx], patch, trigger_value)
    yp[idx] = target
    aff = AffectedSet(idx, X_new=X[idx].clone(), y_new=y[idx].clone())
    other = y_test != target
    extra = {"backdoor": (stamp(X_test[other], patch, trigger_value), torch.full_like(y_test[other], target))}
    return Scenario(
        "backdoor",
        Xp,
        yp,
        aff,
        X_test,
        y_test,
        num_classes,
        extra,
        description=f"{len(idx)} of {len(y)} training images ({100 * fraction:.0f} %) stamped with a "
        f"{patch}x{patch} trigger (value {trigger_value}) and labelled {target}",
    )


def deletion(
    X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor, num_classes: int, *, fraction: float = 0.05, seed: int = 0
) -> Scenario:
    _check_fraction(fraction)
    gen = torch.Generator().manual_seed(seed)
    idx = _choose(len(y), fraction, gen)
    return Scenario(
        "deletion",
        X,
        y,
        AffectedSet.removal(idx),
        X_test,
        y_test,
        num_classes,
        description=f"{len(idx)} of {len(y)} training points ({100 * fraction:.0f} %) deleted",
    )


def make(name: str, X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor, num_classes: int, **kwargs) -> Scenario:
    builders = {"label_flip": label_flip, "backdoor": backdoor, "deletion": deletion}
    if name not in builders:
        raise ValueError(f"unknown scenario {name!r}; valid: {ScenarioName.values()}")
    return builders[name](X, y, X_test, y_test, num_classes, **kwargs)


def load_digits_scenario(name: str, *, seed: int = 0, dtype=torch.float64, **kwargs) -> Scenario:
    """``tensorcurv.experiments.data.load("digits")`` (train + val pooled as training data, test kept) + scenario."""
    from tensorcurv.experiments import data as data

    splits = data.load("digits", val_fraction=0.1, test_fraction=0.2, seed=seed, dtype=dtype)
    assert splits.num_classes is not None  # digits: 10 classes
    X = torch.cat([splits.train[0], splits.val[0]])
    y = torch.cat([splits.train[1], splits.val[1]])
    return make(name, X, y, splits.test[0], splits.test[1], splits.num_classes, seed=seed, **kwargs)
