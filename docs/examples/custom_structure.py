"""Tutorial: a custom curvature structure in one file, used by Curvature and an optimizer.

``Isotropic`` approximates a layer's block ``C`` by a multiple of the identity, ``Ĉ = τ I`` with
``τ = tr(C) / (mn)`` (the Frobenius-nearest multiple of ``I``). ``tr(C) = scale Σ_{s,k} ‖G_sk‖_F²`` is read
off the per-sample factors; the damped solve is ``V / (τ + λ)`` (exact Tikhonov).

Run: ``python docs/examples/custom_structure.py`` (add ``--tiny`` for the quick version the tests run).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

import tensorcurv
from tensorcurv.optim import NaturalGradient
from tensorcurv.structures import Structure, register


@dataclass
class IsotropicHparams:
    """``floor``: the smallest allowed ``τ`` (keeps ``Ĉ`` positive definite)."""

    floor: float = 0.0

    def __post_init__(self) -> None:
        if not self.floor >= 0:
            raise ValueError(f"isotropic.floor={self.floor} must be >= 0")


@register("isotropic")
class Isotropic(Structure):
    """``Ĉ = τ I`` with ``τ = max(tr(C) / (mn), floor)``; ``solve`` is exact."""

    Hparams = IsotropicHparams

    def _tau(self, stats) -> torch.Tensor:
        # ‖G_sk‖_F² for G_sk = Σ_t g_skt a_stᵀ, summed over samples and columns
        G = torch.einsum("sktm,stn->skmn", stats.g, stats.a)
        m, n = self.shape
        return (G.pow(2).sum() * stats.scale / (m * n)).clamp_min(self.hparams.floor)

    def fit(self, stats):
        self.tau = self._tau(stats)
        self.fitted = True
        return self

    def _update(self, stats, decay):
        self.tau = decay * self.tau + (1 - decay) * self._tau(stats)
        return self

    def mv(self, V):
        return self.tau * V

    def solve(self, V, damping):
        self.last_solve = {"method": "scalar", "damping": "tikhonov"}
        return V / (self.tau + damping)

    def to_dense(self):
        m, n = self.shape
        return self.tau * torch.eye(m * n, dtype=self.tau.dtype)

    def tensors(self):
        return {"tau": self.tau} if self.fitted else {}


def main(tiny: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    n_samples, steps = (64, 3) if tiny else (512, 50)
    X = torch.randn(n_samples, 8, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).double()

    # 1. the registry knows the new structure, and Curvature uses it like any built-in one
    assert "isotropic" in tensorcurv.structures.names()
    curv = tensorcurv.Curvature(model, structure="isotropic", kind="ggn", floor=1e-8)
    curv.update(X, y, nn.CrossEntropyLoss())
    block = curv.blocks["0"]
    dense = tensorcurv.Curvature(model, structure="dense", kind="ggn")
    dense.update(X, y, nn.CrossEntropyLoss())
    C = dense.blocks["0"].to_dense()
    # τ is the trace of the exact block divided by its size
    assert torch.allclose(block.tau, C.trace() / C.shape[0], rtol=1e-10)
    print(
        f"layer 0: tau = {block.tau.item():.4g} = tr(C)/mn, relative Frobenius error "
        f"{((C - block.to_dense()).norm() / C.norm()).item():.3f}"
    )

    # 2. an optimizer preconditions with it (natural gradient with Ĉ = τ I is a per-layer scaled SGD)
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), structure="isotropic", lr=0.1, damping=1e-1)
    losses = [opt.step(X, y) for _ in range(steps)]
    print(f"natural gradient with 'isotropic': loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps")
    return {"first_loss": float(losses[0]), "last_loss": float(losses[-1])}


if __name__ == "__main__":
    main(tiny="--tiny" in sys.argv)
