"""``diagonal``: ``Ĉ = diag(C)``, ``diag(C) = scale Σ_{s,k} vec(G_sk)²`` (stored as an ``(m, n)`` matrix)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import vec
from tensorcurv.structures.base import Structure, register
from tensorcurv.structures.generic import per_sample_grad_chunks, top_entries


def _diag(stats: LayerStats, chunk: int = 256) -> Tensor:
    if stats.T == 1:  # diag of (a aᵀ) ⊗ (g gᵀ) = (g²)(a²)ᵀ summed over samples: one matmul
        g2 = stats.g[:, :, 0].pow(2).sum(1)  # (N, m)
        return (g2.T @ stats.a[:, 0].pow(2)) * stats.scale
    D = stats.a.new_zeros(stats.shape)
    for i in range(0, stats.N, chunk):  # per-sample grads in chunks: memory O(chunk·K·m·n)
        G = torch.einsum("sktm,stn->skmn", stats.g[i : i + chunk], stats.a[i : i + chunk])
        D += G.pow(2).sum((0, 1))
    return D * stats.scale


@register("diagonal")
class Diagonal(Structure):
    """Diagonal of the exact block; ``solve`` divides elementwise (exact)."""

    def fit(self, stats):
        self._check_stats(stats)
        self.D = _diag(stats)
        self.fitted = True
        return self

    def _update(self, stats, decay):
        self._check_stats(stats)
        self.D = decay * self.D + (1 - decay) * _diag(stats)
        return self

    def mv(self, V):
        self._check(V)
        return self.D * V

    def solve(self, V, damping):
        self._check(V, damping)
        self.last_solve = {"method": "elementwise", "damping": "tikhonov"}
        return V / (self.D + damping)

    def to_dense(self):
        return torch.diag(vec(self.D))

    def inner_with_exact(self, stats: LayerStats, chunk: int = 128) -> float:
        """``⟨C, diag(D)⟩ = ⟨diag(C), D⟩``."""
        scale = float(stats.scale)
        if stats.T == 1:
            diag = scale * (stats.g[:, :, 0].pow(2).sum(1).T @ stats.a[:, 0].pow(2))
        else:
            diag = scale * cast(Tensor, sum(G.pow(2).sum(0) for G in per_sample_grad_chunks(stats, chunk)))
        return float((diag * self.D).sum())

    def frobenius_sq(self, dense_max_dim: int = 0) -> float:
        return float(self.D.pow(2).sum())

    def fit_flops(self) -> float:
        return float(self.shape[0] * self.shape[1])

    def additive_statistics(self, stats: LayerStats, weight: float) -> dict[str, Tensor]:
        return {"D": _diag(stats)}

    def leading_eigenpairs(self, k: int) -> tuple[Tensor, Tensor]:
        """The largest diagonal entries, eigenvectors the unit matrices there."""
        top, i, j = top_entries(self.D, k)
        V = self.D.new_zeros(k, *self.shape)
        V[torch.arange(k, device=V.device), i, j] = 1.0
        return top, V

    def tensors(self):
        return {"D": self.D} if self.fitted else {}

    def solve_flops(self):
        return self.shape[0] * self.shape[1]
