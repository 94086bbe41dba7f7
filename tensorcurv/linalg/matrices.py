"""Linear-algebra helpers shared by structures and studies.

``vec`` is column-major throughout: for ``V`` of shape ``(m, n)``, ``vec(V)[j*m + i] = V[i, j]``,
so that ``vec(G V Aᵀ) = (A ⊗ G) vec(V)`` and ``torch.kron(A, G)`` is the matching dense matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor


def vec(V: Tensor) -> Tensor:
    """Column-major vectorization of the trailing two dims: ``(..., m, n) -> (..., m*n)``."""
    return V.transpose(-1, -2).reshape(*V.shape[:-2], -1)


def unvec(v: Tensor, m: int, n: int) -> Tensor:
    """Inverse of :func:`vec`: ``(..., m*n) -> (..., m, n)``."""
    return v.reshape(*v.shape[:-1], n, m).transpose(-1, -2)


def summed_outer_products(X: Tensor) -> Tensor:
    """``S_s = Σ_k x_sk x_skᵀ`` for ``X`` of shape ``(N, K, d)``: ``(N, d, d)`` (for GGN columns ``g``: the per-sample
    output GGNs ``Λ_s``); ``K = 1`` as an outer product."""
    return X[:, 0, :, None] * X[:, 0, None, :] if X.shape[1] == 1 else X.transpose(1, 2) @ X


def symmetric_part(M: Tensor, scale: float = 1.0) -> Tensor:
    """``scale (M + Mᵀ)/2`` over the trailing two dims: exactly symmetric (``a + b == b + a`` in IEEE
    arithmetic), for products that are symmetric in exact arithmetic but whose gemm need not be bitwise."""
    return torch.add(M, M.mT).mul_(0.5 * scale)


def gram(X: Tensor, scale: float = 1.0) -> Tensor:
    """``scale XᵀX`` (``d x d``) for ``X`` of shape ``(N, d)``: one plain gemm, the scale as its ``alpha``.
    Symmetric to rounding (bitwise with MKL, whose two triangles sum the same products in the same order);
    use :func:`symmetric_part` where exact symmetry is required."""
    return torch.addmm(X.new_zeros(()), X.mT, X, beta=0, alpha=scale)


def symmetric_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric part ``(M + Mᵀ)/2`` (ascending eigenvalues, orthonormal eigenvectors).

    LAPACK's float32 divide-and-conquer can return NaN without raising on finite, nearly singular input
    (seen on a 785 x 785 K-FAC input factor of image data with a bias column); then the decomposition is
    recomputed in float64 and cast back, so a finite input never yields a non-finite result."""
    S = 0.5 * (M + M.mT)
    evals, evecs = torch.linalg.eigh(S)
    if (
        S.dtype != torch.float64
        and not (torch.isfinite(evals).all() and torch.isfinite(evecs).all())
        and torch.isfinite(S).all()
    ):
        evals, evecs = torch.linalg.eigh(S.double())
        evals, evecs = evals.to(S.dtype), evecs.to(S.dtype)
    return evals, evecs
