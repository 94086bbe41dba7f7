"""Tucker / TT of the *formed* split rearranged tensor ``𝒯`` with tensorly (small blocks only).

``𝒯`` is the block ``C`` (``mn x mn``, column-major vec, ``torch.kron`` ordering of the modes
``(n_1..n_d, m_1..m_e)``, see ``structures/tucker.py``) with one mode of size ``x_l²`` per index factor,
the ``(row, column)`` pair of that factor flattened row-major:

    𝒯[(r_1 c_1), …, (r_D c_D)] = C[(r_1..r_D), (c_1..c_D)].

All ``n`` modes precede all ``m`` modes, so ``𝒯`` flattened is the Van Loan rearrangement ``R(C)``
(``n² x m²``, ``R[(a b), (i j)] = C[(a i), (b j)]``) with rows and columns reordered into row/column pairs
(:func:`pair_permutation`). It is formed from the per-sample factors with the permutation applied to
those factors: ``T = 1``: ``R = scale Σ_s vec(a_s a_sᵀ) vec(Λ_s)ᵀ`` with ``Λ_s = Σ_k g_sk g_skᵀ`` (one
GEMM of ``N n² m²`` flops, ``K`` times cheaper than ``Gᵀ G`` over the ``N K`` per-sample gradients);
``T > 1``: ``R = scale Σ_q G_q ⊗ G_q`` rearranged, over the per-sample gradients in chunks of samples.
Forming costs ``(mn)²`` entries: only allowed up to :data:`MAX_ENTRIES`.

tensorly runs under ``tensorly.backend_context("pytorch", local_threadsafe=True)``: the tensors keep
the block's dtype and device (no host round trip or float64 copy on a GPU), the caller's torch thread
settings apply, and the backend switch is local to this thread and undone on exit — tensorly's
process-wide ``set_backend`` is never called, so a user's own tensorly backend is untouched.
"""

from __future__ import annotations

import math

import opt_einsum as oe
import tensorly as tl
import torch
from tensorly.decomposition import tensor_train, tucker
from torch import Tensor

from tensorcurv.core.options import Option
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import summed_outer_products

MAX_ENTRIES = 2**23
"""Largest formed ``𝒯`` (``(mn)²`` entries; 64 MiB in float64) that ``method="tensorly"`` accepts."""
AUTO_ENTRIES = {"tucker": 2**21, "tt": 2**23}
"""``method="auto"`` forms ``𝒯`` up to this many entries per structure and fits implicitly above. Measured
(2 shared CPU cores, N = 512, K = 10; ``scripts/bench_tensorly_fit.py --break-even``, README): TT-SVD on the formed
tensor beats the implicit ALS up to ~8M entries (1.0-1.7x at 8.2M, 0.5x at 17M); tensorly's HOOI makes full passes
over ``𝒯`` per sweep, so its break-even is lower and rank-dependent (1.3-2.8x at 1.1M entries, 0.65-2.3x at 2.4M)."""


class FitMethod(Option):
    """How tucker / tt fit ``𝒯``: ``implicit`` contractions, ``tensorly`` on the formed tensor, or ``auto``."""

    AUTO = "auto"
    IMPLICIT = "implicit"
    TENSORLY = "tensorly"


def check_method(name: str, method: str) -> None:
    if method not in FitMethod.values():
        raise ValueError(f"{name}.method={method!r} is not one of {', '.join(map(repr, FitMethod.values()))}")


def entries(shape: tuple[int, int]) -> int:
    """Number of entries ``(mn)²`` of the formed ``𝒯`` of a block of weight shape ``(m, n)``."""
    return (shape[0] * shape[1]) ** 2


def check_formable(name: str, shape: tuple[int, int]) -> None:
    """Refuse ``method="tensorly"`` on blocks whose formed ``𝒯`` exceeds :data:`MAX_ENTRIES`."""
    e = entries(shape)
    if e > MAX_ENTRIES:
        raise ValueError(
            f"{name}.method='tensorly' forms the split tensor of (mn)² = {e} entries "
            f"({e * 8 / 2**20:.0f} MiB in float64) for the block {shape}, more than MAX_ENTRIES={MAX_ENTRIES}; "
            f"use method='implicit' (or 'auto') for this layer"
        )


def use_tensorly(name: str, method: str, shape: tuple[int, int]) -> bool:
    """Whether structure ``name`` with ``method`` fits the block of weight shape ``shape`` through the formed 𝒯."""
    return method == "tensorly" or (method == "auto" and entries(shape) <= AUTO_ENTRIES[name])


def pair_permutation(k: int) -> list[int]:
    """Permutation of the axes ``(r_1..r_k, c_1..c_k)`` (all row factors, then all column factors) into
    the pairs ``(r_1, c_1, …, r_k, c_k)``: applied to a matrix over split indices viewed as a
    ``2k``-way tensor, it gives one ``(row, column)`` mode per index factor."""
    return [p for i in range(k) for p in (i, k + i)]


def split_tensor(stats: LayerStats, sin: list[int], sout: list[int], chunk: int = 256) -> Tensor:
    """The formed ``𝒯`` of shape ``(x_1², …, x_D²)`` over the modes ``sin + sout``, summed over chunks of
    ``chunk`` samples. All ``n`` modes precede all ``m`` modes, so ``𝒯`` flattened is ``R(C)`` with its rows
    and columns reordered by :func:`pair_permutation`; the permutation is applied to the per-sample
    factors (``T = 1``: ``vec(a_s a_sᵀ)``, ``vec(Λ_s)``; ``T > 1``: the einsum output), never to ``𝒯``."""
    n, m, d, e = stats.n, stats.m, len(sin), len(sout)
    sq = [x * x for x in sin + sout]
    out = torch.zeros(n * n, m * m, dtype=stats.a.dtype, device=stats.a.device)
    pin, pout = [0] + [1 + p for p in pair_permutation(d)], [0] + [1 + p for p in pair_permutation(e)]
    sym = [oe.get_symbol(i) for i in range(1 + 2 * (d + e))]
    q, A, B, I, J = sym[0], sym[1 : 1 + d], sym[1 + d : 1 + 2 * d], sym[1 + 2 * d : 1 + 2 * d + e], sym[1 + 2 * d + e :]
    expr = (
        f"{q}{''.join(I)}{''.join(A)},{q}{''.join(J)}{''.join(B)}->"
        + "".join(a + b for a, b in zip(A, B))
        + "".join(i + j for i, j in zip(I, J))
    )
    for i in range(0, stats.N, chunk):
        if stats.T == 1:
            a, g = stats.a[i : i + chunk, 0], stats.g[i : i + chunk, :, 0]  # (s, n), (s, K, m)
            s = a.shape[0]
            X = (a[:, :, None] * a[:, None, :]).reshape(s, *sin, *sin).permute(pin).reshape(s, n * n)
            L = summed_outer_products(g)  # Λ_s
            Y = L.reshape(s, *sout, *sout).permute(pout).reshape(s, m * m)
            out += X.T @ Y
        else:
            G = LayerStats(stats.a[i : i + chunk], stats.g[i : i + chunk], stats.scale).per_sample_grads()  # (q, m, n)
            G = G.reshape(-1, *sout, *sin)
            out += oe.contract(expr, G, G).reshape(n * n, m * m)
    return (out * stats.scale).reshape(sq)


def gram_svd(matrix: Tensor, n_eigenvecs: int | None = None, **_) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD ``(U, S, Vᵀ)`` through the eigendecomposition of the Gram matrix of the *smaller* side
    (tensorly's ``svd=`` callable). The unfoldings of ``𝒯`` are very wide (e.g. 169 x 25600): one ``eigh``
    of the 169 x 169 Gram is ~20x faster than the SVD (measured, README "Small blocks through tensorly").
    Singular values below ``sqrt(eps)·σ_1`` lose relative accuracy, which only affects directions that carry a
    negligible share of the Frobenius norm. ``S·Vᵀ = Uᵀ M`` (wide) and ``U·S = M V`` (tall) hold to rounding, as
    TT-SVD needs."""
    rows, cols = matrix.shape
    k = min(rows, cols) if n_eigenvecs is None else min(n_eigenvecs, rows, cols)
    tiny = torch.finfo(matrix.dtype).tiny
    if rows <= cols:
        w, U = torch.linalg.eigh(matrix @ matrix.T)
        U, S = U.flip(1)[:, :k], w.flip(0)[:k].clamp_min(tiny).sqrt()
        return U, S, (U.T @ matrix) / S[:, None]
    w, V = torch.linalg.eigh(matrix.T @ matrix)
    V, S = V.flip(1)[:, :k], w.flip(0)[:k].clamp_min(tiny).sqrt()
    return (matrix @ V) / S, S, V.T


def tucker_hooi(
    T: Tensor, ranks: list[int], tol: float, max_iter: int, init: tuple[Tensor, list[Tensor]] | None = None
) -> tuple[list[Tensor], Tensor, dict]:
    """HOOI of ``T`` by ``tensorly.decomposition.tucker`` (truncated-HOSVD start, or ``init = (core, factors)``).
    Returns the orthonormal factors ``U_l`` (``x_l² x p_l``), the core and fit information. Stops when the
    relative error changes by less than ``tol`` (tensorly's rule) or after ``max_iter`` sweeps."""
    with tl.backend_context("pytorch", local_threadsafe=True):
        start = "svd" if init is None else tl.tucker_tensor.TuckerTensor((init[0], list(init[1])))
        (core, U), errors = tucker(
            T, rank=list(ranks), init=start, n_iter_max=max_iter, tol=tol, svd=gram_svd, return_errors=True
        )
    change = abs(float(errors[-2]) - float(errors[-1])) if len(errors) > 1 else math.inf
    return (
        list(U),
        core,
        {
            "iterations": len(errors),
            "converged": change < tol,
            "error_change": change,
            "relative_error": float(errors[-1]),
        },
    )


def tt_svd(T: Tensor, ranks: list[int], sizes: list[int]) -> list[Tensor]:
    """TT-SVD of ``T`` by ``tensorly.decomposition.tensor_train`` with bond ranks ``ranks`` (D − 1 of them),
    as cores ``(ρ_{l-1}, x_l, x_l, ρ_l)`` (the ``x_l²`` mode split back into its row/column pair)."""
    with tl.backend_context("pytorch", local_threadsafe=True):
        cores = tensor_train(T, [1, *ranks, 1], svd=gram_svd).factors
    return [c.reshape(c.shape[0], x, x, c.shape[-1]) for c, x in zip(cores, sizes)]
