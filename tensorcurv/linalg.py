"""Linear-algebra helpers shared by structures and studies.

``vec`` is column-major throughout: for ``V`` of shape ``(m, n)``, ``vec(V)[j*m + i] = V[i, j]``,
so that ``vec(G V Aᵀ) = (A ⊗ G) vec(V)`` and ``torch.kron(A, G)`` is the matching dense matrix.
"""
from __future__ import annotations

from torch import Tensor


def vec(V: Tensor) -> Tensor:
    """Column-major vectorization of the trailing two dims: ``(..., m, n) -> (..., m*n)``."""
    return V.transpose(-1, -2).reshape(*V.shape[:-2], -1)


def unvec(v: Tensor, m: int, n: int) -> Tensor:
    """Inverse of :func:`vec`: ``(..., m*n) -> (..., m, n)``."""
    return v.reshape(*v.shape[:-1], n, m).transpose(-1, -2)
