"""Van Loan rearrangement ``R(C)`` of a layer block, applied implicitly from the per-sample factors.

Index convention (column-major ``vec`` of ``W`` (m x n), so ``C[j*m + i, j'*m + i']``):

    R(C)[(j, j'), (i, i')] = C[j*m + i, j'*m + i']      (an n² x m² matrix)

rows flattened row-major over ``(j, j')``, columns over ``(i, i')``. Then ``R(A ⊗ G) =
vec(A) vec(G)ᵀ`` (``torch.kron(A, G)`` ordering, ``vec = X.reshape(-1)``), and ``C ≈ Σ_k σ_k A_k ⊗ G_k``
is the truncated SVD of ``R(C)`` (Eckart–Young; Van Loan & Pitsianis 1993).

With ``C = scale Σ_{s,k} vec(G_sk) vec(G_sk)ᵀ``, ``G_sk = g[s,k]ᵀ a[s]`` (``a[s]``: T x n, ``g[s,k]``:
T x m), the two products never form ``C`` or ``R(C)``:

    R(C)  vec(X) = scale Σ_{s,k} a[s]ᵀ (g[s,k] X g[s,k]ᵀ) a[s]        (X: m x m -> n x n)
    R(C)ᵀ vec(Y) = scale Σ_{s,k} g[s,k]ᵀ (a[s] Y a[s]ᵀ) g[s,k]        (Y: n x n -> m x m)

For ``T = 1`` this is the sample-space form ``R(C) vec(X) = Σ_s w_s vec(a_s a_sᵀ)`` with
``w_s = scale Σ_k g_skᵀ X g_sk``: one weighted covariance, i.e. the cost of one K-FAC factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.rearrange.sample_space import (
    one_signed,
    sample_grams,
    sym_quadratic_forms,
    symmetric_part_or_self,
    weighted_covariances,
)


def rearrange(C: Tensor, shape: tuple[int, int]) -> Tensor:
    """``R(C)`` (``n² x m²``) of a dense block ``C`` (``mn x mn``) of a weight of shape ``(m, n)``."""
    m, n = shape
    return C.reshape(n, m, n, m).permute(0, 2, 1, 3).reshape(n * n, m * m)


def dense_rearranged(stats: LayerStats) -> Tensor:
    """``R(C)`` formed densely from per-sample gradients (small layers / tests only)."""
    G = stats.per_sample_grads()  # (q, m, n)
    R = torch.einsum("qij,qkl->jlik", G, G) * stats.scale
    return R.reshape(stats.n**2, stats.m**2)


class RearrangedOperator:
    """Implicit ``R(C)`` of one layer block: :meth:`matvec` and :meth:`rmatvec` (batched over a
    leading dimension), each one pass over the per-sample factors. ``products`` counts how many
    single-matrix applications have been made.

    ``T = 1``: sample-space form (weights, then one weighted covariance; for a single matrix
    :func:`sym_quadratic_forms` and :func:`weighted_covariances`). ``T > 1``: per-sample
    position Gram (``T x T``) path or explicit per-sample gradients, whichever costs fewer flops,
    in chunks of samples so that intermediates stay below ``max_elems`` entries.
    """

    def __init__(self, stats: LayerStats, max_elems: int = 2**24) -> None:
        self.stats = stats
        self.a, self.g, self.scale = stats.a, stats.g, stats.scale
        self.N, self.T, self.K, self.n, self.m = stats.N, stats.T, stats.K, stats.n, stats.m
        self.shape = (self.n * self.n, self.m * self.m)
        self.max_elems = max_elems
        self.products = 0
        self.one_signed = {"matvec": False, "rmatvec": False}
        T, K, n, m = self.T, self.K, self.n, self.m
        cost_pos = K * T * m * m + K * T * T * m + T * T * n + T * n * n
        cost_grad = K * (m * m * n + m * n * n)
        self.path = "samples" if T == 1 else ("positions" if cost_pos <= cost_grad else "grads")

    # ------------------------------------------------------------------ helpers
    def _chunks(self, per_sample: int):
        step = max(1, min(self.N, self.max_elems // max(1, per_sample)))
        for i in range(0, self.N, step):
            yield slice(i, i + step)

    @staticmethod
    def _batch(X: Tensor, size: int) -> tuple[Tensor, bool]:
        if X.dim() == 2:
            X = X.unsqueeze(0)
        if X.shape[-2:] != (size, size):
            raise ValueError(f"expected ({size}, {size}) matrices, got {tuple(X.shape[-2:])}")
        return X, True

    # ------------------------------------------------------------------ products
    def matvec(self, X: Tensor) -> Tensor:
        """``R(C) vec(X)`` as ``(n, n)`` for ``X`` of shape ``(m, m)`` or ``(p, m, m)``."""
        single = X.dim() == 2
        X, _ = self._batch(X, self.m)
        p = X.shape[0]
        self.products += p
        if self.path == "samples":
            g = self.g[:, :, 0].reshape(-1, self.m)  # (NK, m)
            a = self.a[:, 0]
            if p == 1:  # one column: quadratic forms, then one (exactly symmetric) weighted covariance
                w = sym_quadratic_forms(g, symmetric_part_or_self(X[0])).reshape(1, self.N, self.K).sum(-1) * self.scale
                Y = weighted_covariances(a, w.T)
            else:
                w = ((g @ X) * g).sum(-1).reshape(p, self.N, self.K).sum(-1) * self.scale  # (p, N)
                Y = (a.T.unsqueeze(0) * w.unsqueeze(1)) @ a
            self.one_signed["matvec"] = one_signed(w)
        elif self.path == "positions":
            Y = X.new_zeros(p, self.n, self.n)
            per = p * self.K * self.T * max(self.m, self.T)
            for sl in self._chunks(per):
                a, g = self.a[sl], self.g[sl]
                gX = torch.einsum("sktm,cml->csktl", g, X)
                M = torch.einsum("csktl,skul->cstu", gX, g)
                Y += torch.einsum("stn,cstu,sul->cnl", a, M, a)
            Y *= self.scale
        else:
            Y = X.new_zeros(p, self.n, self.n)
            per = self.K * self.m * self.n * (p + 1)
            for sl in self._chunks(per):
                G = torch.einsum("sktm,stn->skmn", self.g[sl], self.a[sl]).reshape(-1, self.m, self.n)
                Y += torch.einsum("qmn,cml,qlo->cno", G, X, G)
            Y *= self.scale
        return Y[0] if single else Y

    def rmatvec(self, Y: Tensor) -> Tensor:
        """``R(C)ᵀ vec(Y)`` as ``(m, m)`` for ``Y`` of shape ``(n, n)`` or ``(p, n, n)``."""
        single = Y.dim() == 2
        Y, _ = self._batch(Y, self.n)
        p = Y.shape[0]
        self.products += p
        if self.path == "samples":
            a = self.a[:, 0]
            g = self.g[:, :, 0]  # (N, K, m)
            gf = g.reshape(-1, self.m)
            if p == 1:
                v = (sym_quadratic_forms(a, symmetric_part_or_self(Y[0])) * self.scale).unsqueeze(0)
                vk = v[0].repeat_interleave(self.K) if self.K > 1 else v[0]
                Z = weighted_covariances(gf, vk[:, None])
            else:
                v = ((a @ Y) * a).sum(-1) * self.scale  # (p, N)
                vk = v.unsqueeze(-1).expand(p, self.N, self.K).reshape(p, -1)
                Z = (gf.T.unsqueeze(0) * vk.unsqueeze(1)) @ gf
            self.one_signed["rmatvec"] = one_signed(v)
        elif self.path == "positions":
            Z = Y.new_zeros(p, self.m, self.m)
            per = p * self.T * max(self.n, self.T) * self.K
            for sl in self._chunks(per):
                a, g = self.a[sl], self.g[sl]
                M = torch.einsum("stn,cnl,sul->cstu", a, Y, a)
                Z += torch.einsum("sktm,cstu,skul->cml", g, M, g)
            Z *= self.scale
        else:
            Z = Y.new_zeros(p, self.m, self.m)
            per = self.K * self.m * self.n * (p + 1)
            for sl in self._chunks(per):
                G = torch.einsum("sktm,stn->skmn", self.g[sl], self.a[sl]).reshape(-1, self.m, self.n)
                Z += torch.einsum("qmn,cno,qlo->cml", G, Y, G)
            Z *= self.scale
        return Z[0] if single else Z

    def frobenius_sq(self) -> float:
        """``‖C‖_F² = ‖R(C)‖_F²`` from the sample Gram (``T = 1``) or per-sample gradients."""
        if self.path == "samples":
            Gu, Gw = sample_grams(self.stats)
            return float((Gu * Gw).sum()) * self.scale**2
        G = self.stats.per_sample_grads().reshape(-1, self.m * self.n)
        return float((G @ G.T).pow(2).sum()) * self.scale**2
