"""Per-sample Kronecker factors of one layer: the statistics every structure is fitted from.

Conventions (one place; the documentation's design page, docs/concepts/design.md, explains them):

* A covered layer has a weight matrix ``W`` of shape ``(m, n)`` (outputs x inputs). A bias is
  folded in as a trailing input column, so ``n = d_in + 1`` and the matrix is ``[W, b]``.
  Conv2d: ``W = weight.reshape(out_channels, -1)`` (unfold order: in_channel, kernel row,
  kernel column). ConvTranspose2d: ``W = weight.reshape(in_channels, -1).T``, shape
  ``(out_channels*kh*kw, in_channels)``; its bias cannot be folded (see ``layers.py``).
* ``vec`` is column-major, so the gradient of one sample is ``vec(dW_s) = sum_t a_st ⊗ g_st``.
* ``a`` has shape ``(N, T, n)``: layer inputs, ``T`` = weight-sharing positions (conv output
  positions, sequence positions; 1 for a plain Linear layer).
* ``g`` has shape ``(N, K, T, m)``: output-gradient vectors, ``K`` backward columns per sample
  (1 for ``empirical``; ``mc_samples`` for ``mc``, each scaled by ``1/sqrt(k)``; the columns of
  the loss-Hessian factor ``S`` for ``ggn``).
* The exact block is ``C = scale * sum_{s,k} vec(G_sk) vec(G_sk)^T`` with
  ``G_sk = sum_t g_skt a_st^T`` (``m x n``) and ``scale = 1/N`` for a mean-reduced loss, ``1`` for
  a sum-reduced one. So ``C`` is the GGN/Fisher of exactly the loss the user passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tensorcurv.core.options import Option
from tensorcurv.linalg import gram

SUPPORTED_DTYPES = (torch.float32, torch.float64)


class WeightSharing(Option):
    """Conv / sequence layers' ``T`` positions: ``expand`` (positions as samples) or ``reduce`` (summed)."""

    EXPAND = "expand"
    REDUCE = "reduce"


class NonFiniteError(ValueError):
    """Non-finite (NaN/±Inf) statistics, model outputs, fitted curvature or solve; nothing was changed.
    A training loop can catch it to skip the step (``tensorcurv.optim`` does)."""


@dataclass
class LayerStats:
    """Per-sample factors ``a`` (N, T, n) and ``g`` (N, K, T, m) with ``C = scale Σ vec(G)vec(G)ᵀ``."""

    a: Tensor
    g: Tensor
    scale: float
    name: str = ""
    _finite: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.a.dim() != 3 or self.g.dim() != 4:
            raise ValueError(
                f"layer {self.name!r}: expected a of shape (N, T, n) and g of shape (N, K, T, m), "
                f"got {tuple(self.a.shape)} and {tuple(self.g.shape)}"
            )
        if self.a.shape[0] != self.g.shape[0] or self.a.shape[1] != self.g.shape[2]:
            raise ValueError(
                f"layer {self.name!r}: a {tuple(self.a.shape)} and g {tuple(self.g.shape)} "
                "disagree on the number of samples N or positions T"
            )
        if self.a.dtype not in SUPPORTED_DTYPES or self.g.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"layer {self.name!r}: statistics in {self.a.dtype}/{self.g.dtype}; supported dtypes are "
                "float32 and float64 (run the capture outside torch.autocast, on a float32/float64 model)"
            )

    # ---------------------------------------------------------------- shapes
    @property
    def N(self) -> int:
        return self.a.shape[0]

    @property
    def T(self) -> int:
        return self.a.shape[1]

    @property
    def K(self) -> int:
        return self.g.shape[1]

    @property
    def n(self) -> int:
        return self.a.shape[2]

    @property
    def m(self) -> int:
        return self.g.shape[3]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(m, n)`` of the layer's weight matrix ``[W, b]``."""
        return (self.m, self.n)

    # ---------------------------------------------------------------- checks
    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` (a ``ValueError``) naming the layer if ``a`` or ``g`` holds NaN/Inf.

        One reduction per tensor: a NaN or ±Inf anywhere makes the sum non-finite. A passed check is
        remembered, so ``Curvature`` (all layers first) and each structure do not scan twice.
        """
        if self._finite:
            return
        for label, t in (("inputs a", self.a), ("output gradients g", self.g)):
            if not torch.isfinite(t.sum()):
                raise NonFiniteError(f"layer {self.name!r}: non-finite values in the {label} statistics")
        self._finite = True

    def mark_finite(self) -> None:
        """Record that ``a`` and ``g`` were checked elsewhere (e.g. one fused check over all layers), so
        :meth:`check_finite` does not scan them again."""
        self._finite = True

    # ---------------------------------------------------------------- derived quantities
    def per_sample_grads(self) -> Tensor:
        """``G_sk = Σ_t g_skt a_stᵀ`` stacked as ``(N*K, m, n)``; ``C = scale Σ vec(G)vec(G)ᵀ``."""
        G = torch.einsum("sktm,stn->skmn", self.g, self.a)
        return G.reshape(-1, self.m, self.n)

    def kron_factors(self, weight_sharing: str = "expand") -> tuple[Tensor, Tensor]:
        """K-FAC factors ``(A (n, n), G (m, m))`` with ``C ≈ A ⊗ G``.

        ``expand``: ``A = (1/(N T)) Σ_{s,t} a aᵀ``, ``G = scale Σ_{s,k,t} g gᵀ``.
        ``reduce``: ``A = (1/N) Σ_s â âᵀ`` with ``â_s = mean_t a_st``, ``G = scale Σ_{s,k} ĝ ĝᵀ`` with
        ``ĝ_sk = Σ_t g_skt`` (Eschenhagen et al. 2023). Both reduce to K-FAC for ``T = 1``.
        """
        check_weight_sharing(weight_sharing)
        if weight_sharing == "expand" or self.T == 1:
            a = self.a.reshape(-1, self.n)
            A = gram(a, 1.0 / a.shape[0])
        else:
            A = gram(self.a.mean(1), 1.0 / self.N)
        return A, self.output_factor(weight_sharing)

    def output_factor(self, weight_sharing: str = "expand") -> Tensor:
        """K-FAC's output factor ``G (m, m)`` of :meth:`kron_factors` alone (one gemm fewer)."""
        check_weight_sharing(weight_sharing)
        if weight_sharing == "expand" or self.T == 1:
            return gram(_rows(self.g), self.scale)
        return gram(self.g.sum(2).reshape(-1, self.m), self.scale)


def _rows(g: Tensor) -> Tensor:
    """All vectors of ``g`` (N, K, T, m) as rows ``(N K T, m)``, in any order (a Gram sums over them): a view
    of the capture's ``(K, N, T, m)`` layout where there is one, instead of a copy in ``(s, k, t)`` order."""
    kn = g.transpose(0, 1)
    return kn.reshape(-1, g.shape[-1]) if kn.is_contiguous() else g.reshape(-1, g.shape[-1])


def check_weight_sharing(value: str) -> None:
    WeightSharing.parse(value, "weight_sharing")
