"""Unlearning's view of the captured per-sample factors: flat ``θ`` ↔ layer matrices, and gradients in closed form.

The exact GGN of the covered parameters as an operator on the factors is
:class:`tensorcurv.core.exact.ExactModel` (``coupling="full"``: cross-layer, ``"block"``: block diagonal;
for a one-layer model such as logistic regression both are the exact GGN = Hessian).
:class:`~tensorcurv.core.exact.ParamLayout` (re-exported here) maps the flat parameter vector of the unlearning
objective onto its layer matrices.

With ``g`` captured as the columns of ``J_sᵀ S_s`` (capture kind ``ggn``, ``S_s S_sᵀ = ∇²_z ℓ_s``), the same
columns give per-sample gradients in closed form: if ``S_s c_s = ∇_z ℓ_s`` then ``Σ_k c_sk G_sk = ∇_W ℓ_s``
(:func:`output_coefficients`, :func:`stats_gradient`).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from tensorcurv.core.exact import ParamLayout, weighted_gradient_sum
from tensorcurv.core.losses import BinaryCrossEntropyWithLogits, CrossEntropy, LossSpec, MeanSquaredError
from tensorcurv.core.stats import LayerStats


def output_coefficients(loss: LossSpec, outputs: Tensor, targets: Tensor) -> Tensor:
    """``c_s`` (N, K) with ``S_s c_s = ∇_z ℓ_s`` for the loss-Hessian factor ``S`` of ``losses.py``.

    Cross-entropy: ``S₀ = (I − p1ᵀ) diag(√p)`` has ``S₀ c₀ = p − e_y`` for ``c₀ = √p − e_y/√p_y``; ``S`` is ``S₀``
    reflected to its ``C − 1`` independent columns, ``c`` the reflected ``c₀``
    (:meth:`~tensorcurv.core.losses.CrossEntropy.factor_coordinates`).
    MSE: ``S = √(2ρ) I``, so ``c = ∇_z ℓ / √(2ρ)``.
    BCE with logits: ``S = diag(√(ρ p(1−p)))`` with ``p = sigmoid(z)`` per flattened output, so
    ``c = ∇_z ℓ / √(ρ p(1−p))`` elementwise (``∇_z ℓ = ρ (p − y)``).
    ``ValueError`` where no closed form applies (another loss, ``p_y`` so small that ``1/√p_y`` overflows,
    or ``p(1−p)`` underflowing to zero).
    """
    if isinstance(loss, CrossEntropy):
        p = outputs.softmax(-1)
        py = p.gather(1, targets.unsqueeze(1))
        if bool((py < 1e-250).any()):
            raise ValueError("a probability of the true class underflows; no stable closed-form coefficient")
        c = p.sqrt()
        c.scatter_add_(1, targets.unsqueeze(1), -py.rsqrt())
        return loss.factor_coordinates(outputs, c)
    if isinstance(loss, MeanSquaredError):
        return loss.output_gradient(outputs, targets) / (2.0 * loss.rho(outputs)) ** 0.5
    if isinstance(loss, BinaryCrossEntropyWithLogits):
        v = loss.variance(outputs).flatten(1)
        if bool((v < 1e-250).any()):
            raise ValueError("a Bernoulli variance p(1 − p) underflows; no stable closed-form coefficient")
        return loss.output_gradient(outputs, targets) / (loss.rho(outputs) * v).sqrt()
    raise ValueError(f"no closed-form per-sample gradient from GGN statistics for loss {type(loss).__name__}")


def stats_gradient(stats: Mapping[str, LayerStats], coeffs: Tensor) -> dict[str, Tensor]:
    """``Σ_{s,k} c_sk G_sk`` per layer (no scale): with :func:`output_coefficients` the summed
    per-sample gradient ``Σ_s ∇_W ℓ_s`` of every layer's ``[W, b]``."""
    return {k: weighted_gradient_sum(st, coeffs) for k, st in stats.items()}


__all__ = ["ParamLayout", "output_coefficients", "stats_gradient"]
