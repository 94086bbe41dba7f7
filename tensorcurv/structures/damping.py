"""K-FAC's factored (π) damping of a Kronecker product (Martens & Grosse 2015, §6.3).

Exact Tikhonov damping ``A ⊗ G + λI`` has no Kronecker factorization; the factored variant damps
each factor instead,

    (A + π√λ I) ⊗ (G + √λ/π I),   π = sqrt((tr A / n) / (tr G / m)),

for ``A`` (``n x n``, input side) and ``G`` (``m x m``, output side) of an ``(m, n)`` block. ``π``
balances the shifts by the factors' mean eigenvalues; it is 1 when either trace is not positive.
The product is ``A ⊗ G + λI`` plus the cross terms ``π√λ I ⊗ G + √λ/π A ⊗ I``, so it over-damps.
"""

from __future__ import annotations

import math

from tensorcurv.core.options import Option


class DampingKind(Option):
    """How ``λ`` enters a Kronecker solve: exact Tikhonov ``(Ĉ + λI)^{-1}`` or π-damped factors."""

    TIKHONOV = "tikhonov"
    PI = "pi"


def pi_ratio(trace_A: float, trace_G: float, shape: tuple[int, int]) -> float:
    """``π = sqrt((tr A / n) / (tr G / m))`` for a block of ``shape = (m, n)``; 1 if a trace is ``≤ 0``."""
    m, n = shape
    mean_A, mean_G = trace_A / n, trace_G / m
    if mean_A <= 0 or mean_G <= 0:
        return 1.0
    return math.sqrt(mean_A / mean_G)


def factored_shifts(pi: float, damping: float) -> tuple[float, float]:
    """``(π√λ, √λ/π)``: the shifts added to ``A`` and to ``G``."""
    sq = math.sqrt(damping)
    return pi * sq, sq / pi
