"""Sample-space kernels of a layer block with ``T = 1``: Grams of the per-sample factors, weighted
covariances and quadratic forms (``a_s``: rows of ``a`` (N x n); ``g_sk``: rows of ``g`` (N x K x m)).

``R(C) = scale U Wᵀ`` with ``U = [vec(a_s a_sᵀ)]`` and ``W = [vec(Σ_k g_sk g_skᵀ)]``; these kernels apply
``UᵀU``, ``WᵀW`` and the weighted sums ``Σ_s w_s a_s a_sᵀ`` without forming ``U`` or ``W``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import gram, summed_outer_products, symmetric_part


def symmetric_part_or_self(X: Tensor) -> Tensor:
    """Symmetric part ``(X + Xᵀ)/2`` (a quadratic form sees only it); ``X`` itself if exactly symmetric."""
    return X if torch.equal(X, X.T) else 0.5 * (X + X.T)


def one_signed(w: Tensor) -> bool:
    """Every row of ``w`` (p, N) is ``≥ 0`` or ``≤ 0``: then ``Σ_s w_s a_s a_sᵀ`` is ± PSD (a certificate)."""
    return bool(((w >= 0).all(-1) | (w <= 0).all(-1)).all())


def sample_grams(stats: LayerStats) -> tuple[Tensor, Tensor]:
    """For ``T = 1``: ``Gu[s,t] = (a_sᵀa_t)²`` and ``Gw[s,t] = Σ_{k,k'} (g_skᵀ g_tk')²`` (N x N), so
    that ``R(C) = scale U Wᵀ`` with ``U = [vec(a_s a_sᵀ)]``, ``W = [vec(Σ_k g_sk g_skᵀ)]`` and
    ``UᵀU = Gu``, ``WᵀW = Gw``. Cost ``2N²(n + K²m)`` flops."""
    if stats.T != 1:
        raise ValueError("sample-space Gram matrices need T = 1 (no weight sharing)")
    a = stats.a[:, 0]
    g = stats.g[:, :, 0].reshape(-1, stats.m)
    Gu = sym_gram(a).square_()
    Gw = sym_gram(g).square_()
    if stats.K > 1:
        Gw = Gw.reshape(stats.N, stats.K, stats.N, stats.K).sum((1, 3))
    return Gu, Gw


def gram_operator(X: Tensor, max_elems: int = 2**24) -> Callable[[Tensor], Tensor]:
    """``C ↦ M C`` for the sample Gram ``M[s,t] = Σ_{k,k'} (x_skᵀ x_tk')² = ⟨S_s, S_t⟩_F``,
    ``S_s = Σ_k x_sk x_skᵀ``, from ``X`` of shape ``(N, K, d)``.

    Small ``d`` (``d(d+1)/2 ≤ N/2``): factored, ``M = Φ Φᵀ`` with ``Φ_s`` the symmetric vec of ``S_s``
    (off-diagonal entries times √2), so ``M C = Φ (Φᵀ C)`` costs ``O(N d² p)`` and ``M`` is never formed.
    Otherwise ``M`` is formed once (:func:`sym_gram` and an entrywise square; for ``K > 1`` in chunks
    of samples whose ``(chunk K) x (N K)`` products stay below ``max_elems`` entries)."""
    N, K, d = X.shape
    if d * (d + 1) // 2 <= N // 2:
        i, j = torch.triu_indices(d, d, device=X.device)
        S = summed_outer_products(X)
        w = torch.full(i.shape, math.sqrt(2.0), dtype=X.dtype, device=X.device).masked_fill_(i == j, 1.0)
        Phi = S[:, i, j] * w
        return lambda C: Phi @ (Phi.T @ C)
    if K == 1:
        M = sym_gram(X[:, 0]).square_()
    else:  # row chunks of samples: the (N K)² products never exist at once
        flat, M = X.reshape(N * K, d), X.new_empty(N, N)
        step = max(1, max_elems // (K * K * N))
        for i in range(0, N, step):
            blk = (X[i : i + step].reshape(-1, d) @ flat.T).square_()
            M[i : i + step] = blk.reshape(-1, K, N, K).sum((1, 3))
    return lambda C: M @ C


def sym_gram(X: Tensor) -> Tensor:
    """``X Xᵀ`` (``N x N`` for ``X`` of shape ``(N, d)``): one plain gemm, made exactly symmetric (a gemm is
    bitwise symmetric only when both triangles are summed in the same order, which threading does not promise)."""
    return symmetric_part(gram(X.mT))


def weighted_covariances(X: Tensor, W: Tensor | None) -> Tensor:
    """``Σ_s W[s,k] x_s x_sᵀ`` for every column ``k`` of ``W`` (``N x r``), as ``(r, d, d)`` for ``X`` of
    shape ``(N, d)``: one plain gemm ``(W_k ⊙ X)ᵀ X`` per column (one weighted copy of ``X`` at a time), made
    exactly symmetric. ``W = None``: ``XᵀX`` as ``(1, d, d)`` (no weighting pass)."""
    if W is None:
        return gram(X).unsqueeze(0)
    return symmetric_part(torch.stack([(X * w[:, None]).mT @ X for w in W.mT]))


def sym_quadratic_forms(X: Tensor, M: Tensor) -> Tensor:
    """``x_sᵀ M x_s`` for every row of ``X`` (``N x d``) and ``M`` (``d x d``): ``rowsum((X M) ∘ X)``."""
    return torch.linalg.vecdot(X @ M, X)
