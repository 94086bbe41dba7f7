"""Unlearning scenarios on a classification data set: what was trained on, and what to unlearn.

* ``label_flip``: a ``fraction`` of the training labels is replaced by a random *other* class
  (poisoning); the model is trained on the poisoned data; unlearning restores the true labels.
* ``backdoor``: a ``fraction`` of training images of other classes gets a trigger — a
  ``patch x patch`` square in the bottom-right corner set to ``trigger_value`` (in normalized
  units) — and the label ``target``; unlearning restores the clean image and label (feature and
  label correction). Extra set ``backdoor``: triggered test images of other classes labelled
  ``target``, so its accuracy is the backdoor success rate.
* ``deletion``: a random ``fraction`` of the training points is removed.
* ``feature``: one input ``feature`` (a flat index into each row, by default the one of largest
  variance) is sensitive and zeroed out: the affected set is every training point and its
  correction is the same row with that feature set to 0 (Warnecke et al.'s feature unlearning).

``heldout``: points drawn from the test set and prepared like the affected ones (labels flipped,
trigger stamped, or as they are), the non-members of the membership-inference check on ``Z``; None
for ``feature`` (every training point is affected). :func:`upscale` and :func:`load_image_scenario`
give the same scenarios on images resized to ``size x size`` (bilinear).
"""

from __future__ import annotations

from collections.abc import Callable
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
    FEATURE = "feature"


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
    heldout: tuple[Tensor, Tensor] | None = None  # test points prepared like Z (the MIA non-members)


def _check_fraction(fraction: float) -> None:
    if not (0.0 < fraction < 1.0):
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")


def _choose(n: int, fraction: float, gen: torch.Generator, pool: Tensor | None = None) -> Tensor:
    pool = torch.arange(n) if pool is None else pool
    k = max(1, round(fraction * n))
    if k > len(pool):
        raise ValueError(f"cannot pick {k} points from a pool of {len(pool)}")
    return pool[torch.randperm(len(pool), generator=gen)[:k]].sort().values


def _heldout(k: int, n_test: int, gen: torch.Generator) -> Tensor:
    """``min(k, n_test)`` random test indices: as many non-members as members where the test set allows."""
    return torch.randperm(n_test, generator=gen)[: min(k, n_test)].sort().values


def label_flip(
    X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor, num_classes: int, *, fraction: float = 0.05, seed: int = 0
) -> Scenario:
    _check_fraction(fraction)
    gen = torch.Generator().manual_seed(seed)
    idx = _choose(len(y), fraction, gen)
    shift = torch.randint(1, num_classes, (len(idx),), generator=gen)
    y_pois = y.clone()
    y_pois[idx] = (y[idx] + shift) % num_classes
    held = _heldout(len(idx), len(y_test), gen)
    y_held = (y_test[held] + torch.randint(1, num_classes, (len(held),), generator=gen)) % num_classes
    return Scenario(
        "label_flip",
        X,
        y_pois,
        AffectedSet.relabel(idx, y[idx].clone()),
        X_test,
        y_test,
        num_classes,
        description=f"{len(idx)} of {len(y)} training labels ({100 * fraction:.1f} %) flipped to another class",
        heldout=(X_test[held], y_held),
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
    held = _heldout(len(idx), int(other.sum()), gen)
    return Scenario(
        "backdoor",
        Xp,
        yp,
        aff,
        X_test,
        y_test,
        num_classes,
        extra,
        description=f"{len(idx)} of {len(y)} training images ({100 * fraction:.1f} %) stamped with a "
        f"{patch}x{patch} trigger (value {trigger_value}) and labelled {target}",
        heldout=(extra["backdoor"][0][held], extra["backdoor"][1][held]),
    )


def deletion(
    X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor, num_classes: int, *, fraction: float = 0.05, seed: int = 0
) -> Scenario:
    _check_fraction(fraction)
    gen = torch.Generator().manual_seed(seed)
    idx = _choose(len(y), fraction, gen)
    held = _heldout(len(idx), len(y_test), gen)
    return Scenario(
        "deletion",
        X,
        y,
        AffectedSet.removal(idx),
        X_test,
        y_test,
        num_classes,
        description=f"{len(idx)} of {len(y)} training points ({100 * fraction:.1f} %) deleted",
        heldout=(X_test[held], y_test[held]),
    )


def zero_feature(X: Tensor, feature: int) -> Tensor:
    """``X`` with the flat input feature ``feature`` of every row set to 0 (rows keep their shape)."""
    width = X[0].numel() if len(X) else 0
    if not (0 <= feature < width):
        raise ValueError(f"feature {feature} is not a flat index of a row of {width} features")
    out = X.clone().reshape(len(X), -1)
    out[:, feature] = 0
    return out.reshape(X.shape)


def feature(
    X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor, num_classes: int, *, feature: int | None = None, seed: int = 0
) -> Scenario:
    """Feature unlearning: ``feature`` (default: the training feature of largest variance) zeroed in every
    row; the model keeps seeing it zeroed at test time, so ``X_test`` is zeroed too."""
    flat = X.reshape(len(X), -1)
    k = int(flat.var(0).argmax()) if feature is None else int(feature)
    X_new = zero_feature(X, k)
    return Scenario(
        "feature",
        X,
        y,
        AffectedSet(torch.arange(len(y)), X_new=X_new),
        zero_feature(X_test, k),
        y_test,
        num_classes,
        description=f"input feature {k} of {flat.shape[1]} zeroed in all {len(y)} training points",
    )


BUILDERS: dict[str, Callable[..., Scenario]] = {
    "label_flip": label_flip,
    "backdoor": backdoor,
    "deletion": deletion,
    "feature": feature,
}


def check_name(name: str) -> None:
    """``ValueError`` naming the unknown scenario and the valid ones."""
    if name not in BUILDERS:
        raise ValueError(f"unknown scenario {name!r}; valid: {ScenarioName.values()}")


def make(name: str, X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor, num_classes: int, **kwargs) -> Scenario:
    check_name(name)
    if name == "feature":
        kwargs.pop("fraction", None)  # every point is affected
    return BUILDERS[name](X, y, X_test, y_test, num_classes, **kwargs)


def upscale(X: Tensor, size: int) -> Tensor:
    """Images ``(N, C, H, W)`` resized to ``(N, C, size, size)`` by bilinear interpolation."""
    if X.dim() != 4:
        raise ValueError(f"upscale needs images (N, C, H, W), got shape {tuple(X.shape)}")
    return torch.nn.functional.interpolate(X, size=(size, size), mode="bilinear", align_corners=False)


def load_image_scenario(
    name: str,
    dataset: str = "digits",
    *,
    size: int | None = None,
    flatten: bool = False,
    seed: int = 0,
    dtype=torch.float32,
    **kwargs,
) -> Scenario:
    """``tensorcurv.experiments.data.load(dataset)`` (train + val pooled as training data), images resized to
    ``size`` (None: as loaded) and flattened to vectors if ``flatten``, then the scenario ``name``."""
    from tensorcurv.experiments import data as data

    check_name(name)
    splits = data.load(dataset, val_fraction=0.1, test_fraction=0.2, seed=seed, dtype=dtype)
    if splits.num_classes is None:
        raise ValueError(f"dataset {dataset!r} has no class labels")
    X = torch.cat([splits.train[0], splits.val[0]])
    y = torch.cat([splits.train[1], splits.val[1]])
    X_test = splits.test[0]
    if size is not None:
        X, X_test = upscale(X, size), upscale(X_test, size)
    if flatten:
        X, X_test = X.flatten(1), X_test.flatten(1)
    return make(name, X, y, X_test, splits.test[1], splits.num_classes, seed=seed, **kwargs)


def load_digits_scenario(name: str, *, seed: int = 0, dtype=torch.float64, **kwargs) -> Scenario:
    """``tensorcurv.experiments.data.load("digits")`` (train + val pooled as training data, test kept) + scenario."""
    from tensorcurv.experiments import data as data

    splits = data.load("digits", val_fraction=0.1, test_fraction=0.2, seed=seed, dtype=dtype)
    assert splits.num_classes is not None  # digits: 10 classes
    X = torch.cat([splits.train[0], splits.val[0]])
    y = torch.cat([splits.train[1], splits.val[1]])
    return make(name, X, y, splits.test[0], splits.test[1], splits.num_classes, seed=seed, **kwargs)
