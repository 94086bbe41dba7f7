"""The structure configurations a study compares: registry name, hyper-parameters, sweeps."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tensorcurv import structures


@dataclass
class Variant:
    """One structure configuration compared in a study: registry name, hyper-parameters, label."""

    structure: str
    hparams: dict[str, Any]
    label: str
    swept: dict[str, Any] = field(default_factory=dict)


def make_variants(
    names: str | Sequence[str] = "all",
    hparams: Mapping[str, Mapping] | None = None,
    sweeps: Mapping[str, Mapping[str, Sequence]] | None = None,
) -> list[Variant]:
    """Variants for ``names`` (``"all"``: every registered structure once, aliases dropped), each with
    fixed ``hparams[name]`` and the cartesian product of ``sweeps[name]`` (``{key: [values]}``).
    Every combination is validated by the structure's ``Hparams`` (clear error on a bad key);
    sweeps of unregistered structures are ignored, so a config can name structures still to come."""
    hparams, sweeps = dict(hparams or {}), dict(sweeps or {})
    if names == "all":
        canon: dict[type, str] = {}
        for n in structures.names():
            canon.setdefault(structures.get(n), structures.get(n).name or n)
        names = sorted(set(canon.values()))
    out = []
    for name in names:
        structures.get(name)  # unknown name -> ValueError listing the valid ones
        base = dict(hparams.get(name) or {})
        grid = dict(sweeps.get(name) or {})
        keys = sorted(grid)
        for combo in itertools.product(*(list(grid[k]) for k in keys)) if keys else [()]:
            swept = dict(zip(keys, combo))
            hp = {**base, **swept}
            structures.make_hparams(name, **hp)
            label = (
                name if not swept else f"{name}(" + ",".join(f"{k}={format_value(v)}" for k, v in swept.items()) + ")"
            )
            out.append(Variant(name, hp, label, swept))
    return out


def format_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)
