"""``dense``: the exact block ``C = scale Σ_{s,k} vec(G_sk) vec(G_sk)ᵀ`` (ground truth; small layers)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import unvec, vec
from tensorcurv.structures.base import Structure, register, sym_eig
from tensorcurv.structures.generic import per_sample_grad_chunks


@dataclass
class DenseHparams:
    max_dim: int = 8192
    """Refuse blocks larger than ``max_dim x max_dim`` (``mn`` > max_dim) to protect memory."""

    def __post_init__(self) -> None:
        if self.max_dim < 1:
            raise ValueError(f"dense.max_dim must be >= 1, got {self.max_dim}")


@register("dense")
class Dense(Structure):
    """Exact block from per-sample gradients; solve by one symmetric eigendecomposition (exact)."""

    Hparams = DenseHparams

    def __init__(self, shape, hparams=None):
        super().__init__(shape, hparams)
        dim = self.shape[0] * self.shape[1]
        if dim > self.hparams.max_dim:
            raise ValueError(
                f"dense: block of dimension {dim} exceeds max_dim={self.hparams.max_dim} "
                f"({dim * dim * 8 / 2**30:.1f} GiB in float64); raise max_dim or use another structure"
            )
        self._eig = None

    @staticmethod
    def contribution(stats: LayerStats) -> Tensor:
        """``scale Σ_{s,k} vec(G_sk) vec(G_sk)ᵀ`` over the rows of ``stats`` (``mn x mn``): the block is
        additive in the samples, so removing rows subtracts their contribution exactly."""
        G = vec(stats.per_sample_grads())  # (N*K, mn)
        return (G.T @ G) * stats.scale

    def _batch_block(self, stats: LayerStats) -> Tensor:
        return self.contribution(stats)

    def fit(self, stats: LayerStats) -> Dense:
        self._check_stats(stats)
        self.C = self._batch_block(stats)
        self.fitted, self._eig = True, None
        return self

    def _update(self, stats, decay):
        self._check_stats(stats)
        self.C = decay * self.C + (1 - decay) * self._batch_block(stats)
        self._eig = None
        return self

    def mv(self, V: Tensor) -> Tensor:
        self._check(V)
        return unvec(self.C @ vec(V), *self.shape)

    def solve(self, V: Tensor, damping: float) -> Tensor:
        self._check(V, damping)
        if self._eig is None:
            self._eig = sym_eig(self.C)
        evals, Q = self._eig
        self.last_solve = {"method": "eigh", "damping": "tikhonov"}
        return unvec(Q @ ((Q.T @ vec(V)) / (evals + damping)), *self.shape)

    def to_dense(self) -> Tensor:
        return self.C.clone()

    def inner_with_exact(self, stats: LayerStats, chunk: int = 128) -> float:
        """``⟨C_stats, C⟩ = scale Σ_j vec(G_j)ᵀ C vec(G_j)``."""
        return float(stats.scale) * sum(
            float(((vec(G) @ self.C) * vec(G)).sum()) for G in per_sample_grad_chunks(stats, chunk)
        )

    def frobenius_sq(self, dense_max_dim: int = 0) -> float:
        return float(self.C.pow(2).sum())

    def fit_flops(self) -> float:
        """One eigendecomposition of the ``mn x mn`` block."""
        return 9.0 * float(self.shape[0] * self.shape[1]) ** 3

    def additive_statistics(self, stats: LayerStats, weight: float) -> dict[str, Tensor]:
        return {"C": self.contribution(stats)}

    def downdate(self, full: LayerStats, removed: LayerStats, added: LayerStats | None, corrected: LayerStats) -> Dense:
        """``C − C_removed + C_added`` (additive in the samples at one loss scale; sum reduction)."""
        C = self.C - self.contribution(removed)
        out = Dense(self.shape, self.hparams)
        out.load_state_dict({"tensors": {"C": C if added is None else C + self.contribution(added)}, "fitted": True})
        return out

    def tensors(self):
        return {"C": self.C} if self.fitted else {}

    def solve_flops(self) -> int:
        d = self.shape[0] * self.shape[1]
        return 4 * d * d

    def _after_load(self):
        self._eig = None
