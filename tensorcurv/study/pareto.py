"""Pareto fronts for accuracy-vs-cost plots: the points no other point beats on both axes.

A point ``p = (cost, error)`` is dominated when some ``q`` has ``q.cost ≤ p.cost`` and
``q.error ≤ p.error`` with at least one strict; both axes are minimized. Non-finite points are
never on the front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_front(costs: Sequence[float], errors: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, sorted by increasing cost (ties: the first index).

    One sweep over the points sorted by ``(cost, error)``: a point is on the front iff its error
    is strictly below every error seen at a strictly smaller or equal cost before it.
    """
    if len(costs) != len(errors):
        raise ValueError(f"costs ({len(costs)}) and errors ({len(errors)}) differ in length")
    idx = [i for i in range(len(costs)) if math.isfinite(costs[i]) and math.isfinite(errors[i])]
    idx.sort(key=lambda i: (costs[i], errors[i], i))
    front, best = [], math.inf
    for i in idx:
        if errors[i] < best:
            front.append(i)
            best = errors[i]
    return front
