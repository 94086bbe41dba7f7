"""Losses the curvature understands: per-sample loss, Hessian factor ``S``, predictive sampling.

Convention: the user's loss is ``L = c Σ_s ℓ_s`` with ``c = 1/N`` (``reduction="mean"``) or
``c = 1`` (``reduction="sum"``), and the curvature is the GGN/Fisher of exactly ``L``:
``C = c Σ_s J_sᵀ H_s J_s`` with ``H_s = ∇²_z ℓ_s = S_s S_sᵀ``.

* cross-entropy: ``ℓ_s = -log softmax(z_s)[y_s]``, ``H = diag(p) − p pᵀ``,
  ``S = diag(√p) − p √pᵀ``; the model's predictive distribution is ``Categorical(p)``.
* MSE (torch's ``MSELoss``): ``ℓ_s = ρ Σ_c (z_sc − y_sc)²`` with ``ρ = 1/C`` for ``"mean"`` (torch
  averages over all N·C elements) and ``ρ = 1`` for ``"sum"``; ``H = 2ρ I`` (the factor 2 is kept),
  ``S = √(2ρ) I``; Fisher sampling draws ``ŷ ~ N(z, I/(2ρ))`` so that ``E[∇ℓ ∇ℓᵀ] = H``.
* binary cross-entropy with logits (torch's ``BCEWithLogitsLoss``, a Bernoulli likelihood per
  output): ``ℓ_s = ρ Σ_c [softplus(z_sc) − y_sc z_sc]`` with ``ρ`` as for MSE (torch averages over
  all N·C elements for ``"mean"``), targets 0/1 or soft in [0, 1]; with ``p = sigmoid(z)``,
  ``∇_z ℓ = ρ (p − y)``, ``H = ρ diag(p(1 − p))``, ``S = √ρ diag(√(p(1 − p)))``. Fisher sampling
  draws ``b ~ Bernoulli(p)``; the returned target is ``ŷ = p + (b − p)/√ρ`` (``= b`` for
  ``"sum"``), so that ``∇ℓ = √ρ (p − b)`` and ``E[∇ℓ ∇ℓᵀ] = ρ diag(p(1 − p)) = H``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tensorcurv.core.options import Option


class Reduction(Option):
    """How a loss combines its samples: ``mean`` (``c = 1/N``) or ``sum`` (``c = 1``)."""

    MEAN = "mean"
    SUM = "sum"


class LossSpec(ABC):
    """What capture needs to know about a loss ``L = c Σ_s ℓ_s``."""

    name: str = ""

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in Reduction.values():
            raise ValueError(f"loss reduction {reduction!r} is not supported; use one of {Reduction.values()}")
        self.reduction = reduction

    def batch_scale(self, n_samples: int) -> float:
        """``c`` in ``L = c Σ_s ℓ_s``."""
        return 1.0 / n_samples if self.reduction == "mean" else 1.0

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The user's loss ``L`` (mean or sum of the per-sample losses)."""
        return self.per_sample(outputs, targets).sum() * self.batch_scale(outputs.shape[0])

    @abstractmethod
    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``(N,)`` per-sample losses ``ℓ_s``."""

    @abstractmethod
    def hessian_factor(self, outputs: Tensor) -> Tensor:
        """``S`` of shape ``(N, C, K)`` with ``S_s S_sᵀ = ∇²_z ℓ_s``."""

    @abstractmethod
    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        """Targets drawn from the model's predictive distribution (for the MC Fisher)."""

    def output_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``∂ℓ_s/∂z_s`` for every sample, shape ``(N, C)``."""
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.per_sample(z, targets).sum(), z)
        return grad


class CrossEntropy(LossSpec):
    name = "cross_entropy"

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if targets.shape != outputs.shape[:1] or targets.is_floating_point() or targets.is_complex():
            raise ValueError(
                f"cross-entropy targets must be integer class indices of shape ({outputs.shape[0]},), "
                f"got {targets.dtype} of shape {tuple(targets.shape)} (soft labels are not supported)"
            )
        return F.cross_entropy(outputs, targets, reduction="none")

    def hessian_factor(self, outputs: Tensor) -> Tensor:
        """``S`` of shape ``(N, C, C − 1)``, the rank of ``∇²_z ℓ = diag(p) − p pᵀ`` (its null vector is ``1``).

        ``S₀ = diag(√p) − p √pᵀ`` squares to it but its ``C`` columns are dependent (``S₀ √p = 0``). With the
        Householder reflection ``Q = I − 2 u uᵀ / ‖u‖²``, ``u = √p + e_C``, which maps ``√p`` to ``−e_C``,
        ``S₀ Q = [S, 0]``: ``S[:, k] = S₀[:, k] − (2 uₖ / ‖u‖²) S₀ u`` for ``k < C``, ``S₀ u = S₀[:, C]``, and
        ``S Sᵀ = S₀ Q Qᵀ S₀ᵀ = S₀ S₀ᵀ``. ``‖u‖² = 2 (1 + √p_C) ≥ 2``: no cancellation. ``C = 1``: ``S₀ = 0``."""
        p = outputs.detach().softmax(dim=-1)
        sqrt_p = p.sqrt()
        S0 = torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)  # (N, C, C)
        if p.shape[-1] == 1:
            return S0
        u = sqrt_p.clone()
        u[:, -1] += 1
        coef = 2 * u[:, :-1] / (u * u).sum(-1, keepdim=True)  # (N, C − 1): 2 uₖ / ‖u‖²
        return S0[:, :, :-1] - S0[:, :, -1:] * coef.unsqueeze(1)

    def factor_coordinates(self, outputs: Tensor, c0: Tensor) -> Tensor:
        """``c`` (N, C − 1) with ``S c = S₀ c₀`` for the factor ``S`` of :meth:`hessian_factor` and coordinates
        ``c₀`` (N, C) in the columns of ``S₀ = diag(√p) − p √pᵀ``: ``S₀ = [S, 0] Q`` (``Q`` the symmetric orthogonal
        reflection), so ``c = (Q c₀)[:C − 1] = c₀[:C − 1] − (2 u / ‖u‖²)[:C − 1] uᵀc₀``."""
        if c0.shape[-1] == 1:
            return c0
        u = outputs.detach().softmax(dim=-1).sqrt()
        u[:, -1] += 1
        return c0[:, :-1] - 2 * u[:, :-1] * ((u * c0).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True))

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        # a row with NaN/Inf logits has no distribution (softmax is NaN): draw uniformly there instead
        # of failing in multinomial; its gradient p − onehot stays NaN, so the fit refuses the batch
        p = outputs.detach().softmax(dim=-1).nan_to_num_(nan=1.0)
        if generator is not None and generator.device != p.device:  # a CPU generator keeps runs reproducible on GPU
            return torch.multinomial(p.cpu(), 1, generator=generator).squeeze(-1).to(p.device)
        return torch.multinomial(p, 1, generator=generator).squeeze(-1)

    def output_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        p = outputs.detach().softmax(dim=-1)
        return p - F.one_hot(targets, p.shape[-1]).to(p.dtype)


class MeanSquaredError(LossSpec):
    name = "mse"

    def rho(self, outputs: Tensor) -> float:
        return 1.0 / outputs[0].numel() if self.reduction == "mean" else 1.0

    @staticmethod
    def matched(outputs: Tensor, targets: Tensor) -> Tensor:
        """``targets`` in the layout of ``outputs`` (same shape, or the same per-sample size: the
        outputs of an image model are flattened per sample); no broadcasting."""
        if targets.shape == outputs.shape:
            return targets
        if targets.dim() >= 1 and targets.shape[0] == outputs.shape[0] and targets.numel() == outputs.numel():
            return targets.reshape(outputs.shape)
        raise ValueError(
            f"MSE targets of shape {tuple(targets.shape)} do not match the model outputs of shape "
            f"{tuple(outputs.shape)} (broadcasting would silently change the loss)"
        )

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.rho(outputs) * (outputs - self.matched(outputs, targets)).pow(2).flatten(1).sum(1)

    def hessian_factor(self, outputs: Tensor) -> Tensor:
        N, C = outputs.shape[0], outputs[0].numel()
        eye = torch.eye(C, dtype=outputs.dtype, device=outputs.device)
        return (math.sqrt(2.0 * self.rho(outputs)) * eye).expand(N, C, C)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        z = outputs.detach()
        on = generator.device if generator is not None else z.device
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=on).to(z.device)
        return z + noise / math.sqrt(2.0 * self.rho(outputs))

    def output_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 2.0 * self.rho(outputs) * (outputs.detach() - self.matched(outputs, targets)).flatten(1)


class BinaryCrossEntropyWithLogits(LossSpec):
    """Independent Bernoulli outputs on logits ``z`` (``nn.BCEWithLogitsLoss`` without weights)."""

    name = "bce_with_logits"

    def rho(self, outputs: Tensor) -> float:
        return 1.0 / outputs[0].numel() if self.reduction == "mean" else 1.0

    @staticmethod
    def matched(outputs: Tensor, targets: Tensor) -> Tensor:
        """Float ``targets`` in the layout of ``outputs`` (same shape, or flattened per sample)."""
        if not targets.is_floating_point():
            raise ValueError(
                f"binary cross-entropy targets must be floating point (0/1 or soft labels in [0, 1]), "
                f"got {targets.dtype}"
            )
        return MeanSquaredError.matched(outputs, targets)

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        y = self.matched(outputs, targets)
        elementwise = F.binary_cross_entropy_with_logits(outputs, y, reduction="none")
        return self.rho(outputs) * elementwise.flatten(1).sum(1)

    @staticmethod
    def variance(outputs: Tensor) -> Tensor:
        """``p(1 − p)`` per output, as ``sigmoid(z) sigmoid(−z)`` (no cancellation in ``1 − p``)."""
        z = outputs.detach()
        return torch.sigmoid(z) * torch.sigmoid(-z)

    def hessian_factor(self, outputs: Tensor) -> Tensor:
        v = self.variance(outputs).flatten(1)
        return torch.diag_embed((self.rho(outputs) * v).sqrt())

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        # NaN logits give NaN probabilities: draw with p = 1/2 there; the gradient stays NaN (p − ŷ),
        # so the fit refuses the batch as it does for cross-entropy
        p = torch.sigmoid(outputs.detach())
        on = generator.device if generator is not None else p.device
        b = torch.bernoulli(p.nan_to_num(nan=0.5).to(on), generator=generator).to(p.device)
        rho = self.rho(outputs)
        return b if rho == 1.0 else p + (b - p) / math.sqrt(rho)

    def output_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        z = outputs.detach()
        return (self.rho(outputs) * (torch.sigmoid(z) - self.matched(outputs, targets))).flatten(1)


LOSSES: dict[str, type[LossSpec]] = {
    "cross_entropy": CrossEntropy,
    "mse": MeanSquaredError,
    "bce_with_logits": BinaryCrossEntropyWithLogits,
}


def as_loss_spec(loss_fn: LossSpec | nn.Module | str) -> LossSpec:
    """Map ``nn.CrossEntropyLoss`` / ``nn.MSELoss`` / ``nn.BCEWithLogitsLoss`` / a name to a :class:`LossSpec`."""
    if isinstance(loss_fn, LossSpec):
        return loss_fn
    if isinstance(loss_fn, str):
        if loss_fn not in LOSSES:
            raise ValueError(f"unknown loss {loss_fn!r}; valid: {sorted(LOSSES)}")
        return LOSSES[loss_fn]()
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise ValueError("CrossEntropyLoss with class weights or label smoothing is not supported")
        return CrossEntropy(loss_fn.reduction)
    if isinstance(loss_fn, nn.MSELoss):
        return MeanSquaredError(loss_fn.reduction)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError("BCEWithLogitsLoss with weight or pos_weight is not supported")
        return BinaryCrossEntropyWithLogits(loss_fn.reduction)
    raise TypeError(
        f"loss {type(loss_fn).__name__} is not supported; pass nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss, "
        f"or one of {sorted(LOSSES)}"
    )
