"""``power`` route of the Kronecker SVD: block subspace iteration on the implicit ``R(C)`` (any ``T``, ``K``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tensorcurv.linalg.krylov import orthonormalize
from tensorcurv.linalg.rearrange.operator import RearrangedOperator
from tensorcurv.linalg.rearrange.ritz import check_finite_ritz, pad_terms, pair_change


def _sym_random(p: int, d: int, like: Tensor, generator: torch.Generator | None, symmetric: bool = True) -> Tensor:
    X = torch.randn(p, d, d, generator=generator, dtype=like.dtype, device="cpu").to(like.device)
    return 0.5 * (X + X.transpose(-1, -2)) if symmetric else X


def _orth(X: Tensor) -> Tensor:
    if X.shape[1] == 1:
        return X / torch.linalg.vector_norm(X).clamp_min(torch.finfo(X.dtype).tiny)
    return orthonormalize(X)


def power_svd(stats, rank, p, tol, max_iter, init, generator, out):
    """Block subspace iteration on the implicit ``R(C)`` (any ``T``, ``K``), block size ``p``, started from
    ``G_prev`` (``init``, warm start) or from the K-FAC output factor plus random (``T = 1``: symmetric)
    matrices. Each iteration is ``p`` products with ``R(C)`` and ``p`` with ``R(C)ᵀ`` (each ≈ one K-FAC
    factor pass) followed by Rayleigh–Ritz. For ``rank = 1`` this is alternating least squares on ``A ⊗ G``."""
    op = RearrangedOperator(stats)
    n, m = stats.n, stats.m
    cols = []
    if init is not None:
        cols.append(init.reshape(-1, m, m)[:p].to(stats.a.dtype))
    else:
        cols.append(stats.output_factor("expand").unsqueeze(0))
    have = sum(c.shape[0] for c in cols)
    if have < p:  # T > 1: antisymmetric singular vectors exist too, so start from general matrices
        cols.append(_sym_random(p - have, m, stats.a, generator, symmetric=stats.T == 1))
    X = _orth((cols[0] if len(cols) == 1 else torch.cat(cols)).reshape(p, -1).T)  # (m², p')
    theta2_prev, it, change = None, 0, math.inf
    while True:
        it += 1
        Y = op.matvec(X.T.reshape(-1, m, m)).reshape(X.shape[1], -1).T  # (n², p)
        if Y.shape[1] == 1:  # rank 1: QR of one column is a normalization
            ny = torch.linalg.vector_norm(Y)
            Q, sy = Y / ny.clamp_min(torch.finfo(Y.dtype).tiny), ny.reshape(1)
        else:
            Q, Rf = torch.linalg.qr(Y, mode="reduced")
            sy = torch.linalg.svdvals(Rf)
        Z = op.rmatvec(Q.T.reshape(-1, n, n)).reshape(Q.shape[1], -1).T  # (m², p)
        if Z.shape[1] == 1:  # rank 1: no Rayleigh–Ritz rotation
            sz, V = torch.linalg.vector_norm(Z).reshape(1), None
        else:
            evals, V = torch.linalg.eigh(Z.T @ Z)
            evals, V = evals.flip(0).clamp_min(0), V.flip(1)
            sz = evals.sqrt()
        theta2 = sz.pow(2)
        check_finite_ritz(theta2, stats)
        change = pair_change(
            theta2, sy.pow(2) if theta2_prev is None else theta2_prev, rank, tol, torch.finfo(Z.dtype).eps
        )
        theta2_prev = theta2
        keep = sz > sz[0] * torch.finfo(Z.dtype).eps
        if V is None:
            X = Z / sz.clamp_min(torch.finfo(Z.dtype).tiny)
        else:
            X = (Z @ V[:, keep]) / sz[keep]
        if change <= tol or it >= max_iter:
            break
    r = min(rank, int(keep.sum()))
    A = (Q[:, :r] if V is None else Q @ V[:, :r]).T.reshape(r, n, n)
    G = X[:, :r].T.reshape(r, m, m)
    # p = 1 (rank 1): A and G are (±) the last two products themselves; one-signed sample weights
    # prove both PSD (nonnegative combinations of a_s a_sᵀ and g_sk g_skᵀ) — no eigendecomposition.
    certified = p == 1 and r == 1 and op.one_signed["matvec"] and op.one_signed["rmatvec"]
    out.update(
        iterations=it, products=op.products, converged=change <= tol, energy_change=change, psd_certificate=certified
    )
    return pad_terms(sz[:r], A, G, rank)
