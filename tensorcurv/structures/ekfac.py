"""``ekfac``: eigenvalue-corrected K-FAC (George et al. 2018).

``Ĉ = (Q_A ⊗ Q_G) diag(vec(S)) (Q_A ⊗ Q_G)ᵀ`` with the K-FAC eigenbases ``Q_A``, ``Q_G`` and the
core re-fitted to the exact block: ``S = scale Σ_{s,k} (Q_Gᵀ G_sk Q_A)²`` (elementwise). ``S`` is the
diagonal of ``C`` in the Kronecker eigenbasis, the Frobenius-optimal diagonal core there, so
``‖C − Ĉ_ekfac‖_F ≤ ‖C − Ĉ_kfac‖_F``. Solve is exact: ``Q_G [(Q_Gᵀ V Q_A) / (S + λ)] Q_Aᵀ``.

``update`` averages ``A``, ``G`` and ``S`` with the same decay; ``S`` is re-projected into the new
eigenbasis of the averaged factors at every call (the batch's projected core is averaged in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats, WeightSharing
from tensorcurv.linalg import vec
from tensorcurv.structures.base import Structure, register, sym_eig
from tensorcurv.structures.generic import top_entries


@dataclass
class EKFACHparams:
    weight_sharing: str = WeightSharing.EXPAND
    """Weight-sharing treatment for the K-FAC factors that define the eigenbasis."""
    chunk: int = 256
    """Samples per chunk when projecting per-sample gradients of weight-shared layers."""

    def __post_init__(self) -> None:
        self.weight_sharing = WeightSharing.parse(self.weight_sharing, "weight_sharing")
        if self.chunk < 1:
            raise ValueError(f"ekfac.chunk must be >= 1, got {self.chunk}")


def projected_core(stats: LayerStats, QA: Tensor, QG: Tensor, chunk: int) -> Tensor:
    """``scale Σ_{s,k} (Q_Gᵀ G_sk Q_A)²`` without materializing all per-sample gradients."""
    a = stats.a @ QA  # (N, T, n)
    g = stats.g @ QG  # (N, K, T, m)
    if stats.T == 1:
        return (g[:, :, 0].pow(2).sum(1).T @ a[:, 0].pow(2)) * stats.scale
    S = a.new_zeros(stats.shape)
    for i in range(0, stats.N, chunk):
        S += torch.einsum("sktm,stn->skmn", g[i : i + chunk], a[i : i + chunk]).pow(2).sum((0, 1))
    return S * stats.scale


@register("ekfac")
class EKFAC(Structure):
    Hparams = EKFACHparams

    def _set(self, stats, A, G):
        self.A, self.G = A, G
        _, self.QA = sym_eig(A)
        _, self.QG = sym_eig(G)
        S = projected_core(stats, self.QA, self.QG, self.hparams.chunk)
        self.fitted = True
        return S

    def fit(self, stats):
        self._check_stats(stats)
        self.S = self._set(stats, *stats.kron_factors(self.hparams.weight_sharing))
        return self

    def _update(self, stats, decay):
        self._check_stats(stats)
        A, G = stats.kron_factors(self.hparams.weight_sharing)
        QA_old, QG_old, S_old = self.QA, self.QG, self.S
        S_batch = self._set(stats, decay * self.A + (1 - decay) * A, decay * self.G + (1 - decay) * G)
        # diagonal of the old Ĉ in the new eigenbasis: (Q_newᵀ Q_old)² weights per Kronecker factor
        PA, PG = (QA_old.T @ self.QA).pow(2), (QG_old.T @ self.QG).pow(2)
        self.S = decay * (PG.T @ S_old @ PA) + (1 - decay) * S_batch
        return self

    def mv(self, V):
        self._check(V)
        return self.QG @ (self.S * (self.QG.T @ V @ self.QA)) @ self.QA.T

    def solve(self, V, damping):
        self._check(V, damping)
        self.last_solve = {"method": "eigenbasis-diagonal", "damping": "tikhonov"}
        return self.QG @ ((self.QG.T @ V @ self.QA) / (self.S + damping)) @ self.QA.T

    def to_dense(self):
        Q = torch.kron(self.QA, self.QG)
        return Q @ torch.diag(vec(self.S)) @ Q.T

    def tensors(self):
        return {"A": self.A, "G": self.G, "QA": self.QA, "QG": self.QG, "S": self.S} if self.fitted else {}

    def inner_with_exact(self, stats: LayerStats, chunk: int = 128) -> float:
        """``⟨C, Q diag(S) Qᵀ⟩ = ⟨diag(Qᵀ C Q), S⟩`` (the projected core of ``stats``)."""
        return float((projected_core(stats, self.QA, self.QG, chunk) * self.S).sum())

    def frobenius_sq(self, dense_max_dim: int = 0) -> float:
        """``‖S‖_F²`` (``Q_A ⊗ Q_G`` is orthogonal)."""
        return float(self.S.pow(2).sum())

    # data-parallel fit: factors summed, eigenbasis from one rank, projected core summed
    def additive_statistics(self, stats: LayerStats, weight: float) -> dict[str, Tensor]:
        """The K-FAC factors that define the eigenbasis (``A`` a per-sample mean: weighted)."""
        A, G = stats.kron_factors(self.hparams.weight_sharing)
        return {"A": A * weight, "G": G}

    def _reduced_factors(self, reduced: dict[str, Tensor], decay: float | None) -> tuple[Tensor, Tensor]:
        """Factors after this step: the batch's, or their running average as in :meth:`_update`."""
        if decay is None or not self.fitted:
            return reduced["A"], reduced["G"]
        return decay * self.A + (1 - decay) * reduced["A"], decay * self.G + (1 - decay) * reduced["G"]

    def shared_basis(self, reduced: dict[str, Tensor], decay: float | None) -> dict[str, Tensor]:
        A, G = self._reduced_factors(reduced, decay)
        return {"QA": sym_eig(A)[1], "QG": sym_eig(G)[1]}

    def shared_basis_like(self, reduced: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"QA": torch.empty_like(reduced["A"]), "QG": torch.empty_like(reduced["G"])}

    def additive_projection(self, stats: LayerStats, basis: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"S": projected_core(stats, basis["QA"], basis["QG"], self.hparams.chunk)}

    def load_reduced(self, reduced, basis, projected, decay):
        """The old core re-projected on the new basis for an update: ``S = decay·P_Gᵀ S_old P_A + (1−decay)·S_b``."""
        A, G = self._reduced_factors(reduced, decay)
        QA, QG, S_b = basis["QA"], basis["QG"], projected["S"]
        if decay is not None and self.fitted:
            PA, PG = (self.QA.T @ QA).pow(2), (self.QG.T @ QG).pow(2)
            S = decay * (PG.T @ self.S @ PA) + (1 - decay) * S_b
        else:
            S = S_b
        self.load_state_dict({"tensors": {"A": A, "G": G, "QA": QA, "QG": QG, "S": S}, "fitted": True})

    def leading_eigenpairs(self, k: int) -> tuple[Tensor, Tensor]:
        """The largest core entries ``S[i, j]``, eigenvectors ``vec(Q_G[:, i] Q_A[:, j]ᵀ)``."""
        top, i, j = top_entries(self.S, k)
        return top, self.QG[:, i].T[:, :, None] * self.QA[:, j].T[:, None, :]

    def solve_flops(self):
        m, n = self.shape
        return 4 * (m * m * n + m * n * n)
