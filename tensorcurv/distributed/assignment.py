"""Which rank fits/decomposes/solves which layer (KAISA-style work distribution).

``assign(costs, world_size, strategy)`` maps every layer to one *owner* rank:

* ``round_robin``: layers in model order, ``owner = i mod W``;
* ``cost`` (default): greedy longest-processing-time: layers by decreasing estimated cost, each to
  the currently least-loaded rank (ties: lower rank, then model order). Makespan ≤ 4/3 · optimum.

The costs depend only on shapes and hyper-parameters, so every rank computes the same map without
communicating: ``Structure.fit_flops`` is the flop estimate of one fit + decomposition of a block.
"""

from __future__ import annotations

from collections.abc import Mapping

from tensorcurv.core.options import Option


class Strategy(Option):
    """How layers get their owner rank: ``cost`` (balanced estimated cost) or ``round_robin``."""

    COST = "cost"
    ROUND_ROBIN = "round_robin"


def assign(costs: Mapping[str, float], world_size: int, strategy: str = "cost") -> dict[str, int]:
    """Owner rank of every layer (``costs``: layer name -> estimated cost, in model order)."""
    if strategy not in Strategy.values():
        raise ValueError(f"assignment strategy {strategy!r} is not one of {Strategy.values()}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    names = list(costs)
    if strategy == "round_robin":
        return {name: i % world_size for i, name in enumerate(names)}
    load = [0.0] * world_size
    owner: dict[str, int] = {}
    order = sorted(range(len(names)), key=lambda i: (-float(costs[names[i]]), i))
    for i in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[names[i]] = r
        load[r] += float(costs[names[i]])
    return {name: owner[name] for name in names}


def loads(owner: Mapping[str, int], costs: Mapping[str, float], world_size: int) -> list[float]:
    """Total estimated cost per rank of an assignment."""
    out = [0.0] * world_size
    for name, r in owner.items():
        out[r] += float(costs[name])
    return out
