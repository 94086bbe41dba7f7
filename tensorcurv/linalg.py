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


def block_edges(d: int, blocks: int = 8, min_block: int = 128) -> list[int]:
    """Edges of ``b = min(blocks, d // min_block)`` (at least 1) blocks of ``ceil(d / b)`` entries of a size-``d``
    axis (the last one may be shorter)."""
    b = max(1, min(blocks, d // min_block))
    step = -(-d // b)
    return list(range(0, d, step)) + [d]


def summed_outer_products(X: Tensor) -> Tensor:
    """``S_s = Σ_k x_sk x_skᵀ`` for ``X`` of shape ``(N, K, d)``: ``(N, d, d)`` (for GGN columns ``g``: the per-sample
    output GGNs ``Λ_s``); ``K = 1`` as an outer product."""
    return X[:, 0, :, None] * X[:, 0, None, :] if X.shape[1] == 1 else X.transpose(1, 2) @ X


def gram(X: Tensor, blocks: int = 8) -> Tensor:
    """``XᵀX`` (``d x d``) for ``X`` of shape ``(N, d)`` from its upper block triangle: one gemm
    ``X[:, :J_end]ᵀ X_J`` per column block ``J``, the lower triangle copied by transposition —
    ``(b+1)/(2b)`` of the ``2Nd²`` flops of ``X.T @ X`` (1.3–1.7x faster at d = 1024, N = 2048 on CPU).
    Below 256 columns a single block, i.e. the plain gemm."""
    edges = block_edges(X.shape[1], blocks)
    if len(edges) == 2:
        return X.T @ X
    d = X.shape[1]
    out = X.new_empty(d, d)
    for j0, j1 in zip(edges[:-1], edges[1:]):
        XJ = X[:, j0:j1]
        D = XJ.T @ XJ  # diagonal block; its upper triangle mirrored, so the result is exactly symmetric
        out[j0:j1, j0:j1] = D.triu_().add_(D.triu(1).T)
        if j0 > 0:
            blk = X[:, :j0].T @ XJ  # rows 0..J_start, columns J
            out[:j0, j0:j1] = blk
            out[j0:j1, :j0] = blk.T
    return out
