"""The structure registry: every structure name (and alias) and the class it builds.

A layer :class:`~tensorcurv.structures.base.Structure` or a model-level
:class:`~tensorcurv.structures.model.ModelStructure` joins it with the :func:`register` class
decorator; :func:`get`, :func:`make_hparams` and :func:`create` turn a name (and keyword
hyper-parameters, validated by the structure's ``Hparams`` dataclass) into a class, its
hyper-parameters, or a block of weight shape ``(m, n)``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensorcurv.structures.base import Structure

_REGISTRY: dict[str, type] = {}  # layer structures and model-level ones (``two_level``)


def register(name: str, *aliases: str):
    """Class decorator adding a structure to the registry under ``name`` (and ``aliases``): a layer
    :class:`Structure`, or a model-level :class:`~tensorcurv.structures.model.ModelStructure`."""

    def deco(cls: type) -> type:
        cls.name = name  # type: ignore[attr-defined]  # Structure and ModelStructure both declare it
        for key in (name, *aliases):
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(f"structure name {key!r} is already registered")
            _REGISTRY[key] = cls
        return cls

    return deco


def unregister(name: str) -> None:
    """Remove ``name`` (one name or alias) from the registry, e.g. a structure defined by a test."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown structure {name!r}; valid structures: {', '.join(names())}")
    del _REGISTRY[name]


def names() -> list[str]:
    """Registered structure names (aliases included), sorted."""
    return sorted(_REGISTRY)


def layer_names() -> list[str]:
    """Registered names (aliases included) of layer structures, the blocks a model-level structure
    such as ``two_level`` can be built on."""
    from tensorcurv.structures.base import Structure  # (base.py re-exports this module)

    return [n for n in names() if issubclass(_REGISTRY[n], Structure)]


def get(name: str) -> type[Structure]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown structure {name!r}; valid structures: {', '.join(names())}") from None


def make_hparams(name: str, **hparams: Any) -> Any:
    """Build and validate ``get(name).Hparams`` from keyword arguments (clear errors on bad keys)."""
    cls = get(name)
    fields = {f.name for f in dataclasses.fields(cls.Hparams)}
    unknown = sorted(set(hparams) - fields)
    if unknown:
        raise ValueError(
            f"structure {name!r} does not take {unknown}; its hyper-parameters are {sorted(fields) or 'none'}"
        )
    return cls.Hparams(**hparams)


def create(name: str, shape: tuple[int, int], **hparams: Any) -> Structure:
    """Instantiate a registered structure for a block of weight shape ``(m, n)``."""
    return get(name)(shape, make_hparams(name, **hparams))
