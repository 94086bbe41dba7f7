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
    extra: Sequence[Mapping[str, Any]] | None = None,
) -> list[Variant]:
    """Variants for ``names`` (``"all"``: every registered structure once, aliases dropped), each with
    fixed ``hparams[name]`` and the cartesian product of ``sweeps[name]`` (``{key: [values]}``), then the
    ``extra`` variants, each ``{structure, hparams, label (optional)}`` (e.g. another fit target:
    ``{structure: kfac, hparams: {fit_target: inverse}}``, labelled ``kfac(fit_target=inverse)``).
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
    return out + [extra_variant(e) for e in extra or ()]


def extra_variant(entry: Mapping[str, Any]) -> Variant:
    """One ``{structure, hparams, label}`` entry of ``study.variants`` as a :class:`Variant` (the hparams
    count as swept: they are what tells it apart from the structure's default variant)."""
    unknown = set(entry) - {"structure", "hparams", "label"}
    if unknown or "structure" not in entry:
        raise ValueError(f"a study variant is {{structure, hparams, label}}; got keys {sorted(entry)}")
    name, hp = str(entry["structure"]), dict(entry.get("hparams") or {})
    structures.get(name)
    structures.make_hparams(name, **hp)
    label = entry.get("label") or name + "(" + ",".join(f"{k}={format_value(v)}" for k, v in hp.items()) + ")"
    return Variant(name, hp, str(label), dict(hp))


def format_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)
