"""The regularized empirical risk that unlearning works with, as a function of a flat ``θ``.

    L(D; θ) = Σ_{i ∈ D} ℓ(f(x_i; θ), y_i) + (μ/2) ‖θ‖²          (sum over points, not mean)

``θ`` is the concatenation of all trainable parameters of the model in ``named_parameters()``
order (weights *and* biases are regularized). The Hessian is ``H = Σ_i ∇²ℓ_i + μI`` and the
generalized Gauss-Newton ``G = Σ_i J_iᵀ ∇²_z ℓ_i J_i + μI``; both are positive definite for
``μ > 0`` (``H`` at least near a minimizer), so retraining on ``D̃`` is well defined for a convex
model (logistic regression). Everything here is functional (``torch.func``): the model's own
parameters are never read except by :meth:`Objective.theta` and written only by :meth:`load`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from tensorcurv.core.losses import LossSpec, as_loss_spec
from tensorcurv.core.options import Option


class Objective:
    """``L(D; θ) = Σ_i ℓ(f(x_i; θ), y_i) + (μ/2)‖θ‖²`` for a model and a per-sample loss."""

    def __init__(self, model: nn.Module, loss: LossSpec | nn.Module | str = "cross_entropy", mu: float = 0.0) -> None:
        if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
            raise ValueError(f"regularization mu must be a finite number >= 0, got {mu!r}")
        self.model, self.loss, self.mu = model, as_loss_spec(loss), float(mu)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("the model has no trainable parameters")
        self.names = [n for n, _ in self.named]
        self.shapes = [p.shape for _, p in self.named]
        self.numels = [p.numel() for _, p in self.named]
        self.dim = sum(self.numels)

    # ------------------------------------------------------------------ parameters
    def theta(self) -> Tensor:
        """The model's current trainable parameters as one flat (detached) vector."""
        return torch.cat([p.detach().reshape(-1) for _, p in self.named]).clone()

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        if theta.shape != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {tuple(theta.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.numels), self.shapes)}

    def as_list(self, theta: Tensor) -> list[Tensor]:
        return list(self.unflatten(theta).values())

    def flatten(self, tensors) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def load(self, theta: Tensor) -> None:
        """Write ``θ`` into the model's parameters (in place)."""
        with torch.no_grad():
            for (_, p), t in zip(self.named, self.as_list(theta)):
                p.copy_(t)

    @contextmanager
    def loaded(self, theta: Tensor) -> Iterator[None]:
        """Temporarily load ``θ`` into the model (for hook-based code such as ``Curvature``)."""
        saved = self.theta()
        self.load(theta)
        try:
            yield
        finally:
            self.load(saved)

    # ------------------------------------------------------------------ values
    def outputs(self, theta: Tensor, X: Tensor) -> Tensor:
        params = {**dict(self.model.named_buffers()), **self.unflatten(theta)}
        return functional_call(self.model, params, (X,)).flatten(1)

    def data_loss(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """``Σ_i ℓ_i`` (0 for an empty set)."""
        if X.shape[0] == 0:
            return (theta * 0).sum()
        return self.loss.per_sample(self.outputs(theta, X), y).sum()

    def regularizer(self, theta: Tensor) -> Tensor:
        return 0.5 * self.mu * theta.dot(theta)

    def value(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        return self.data_loss(theta, X, y) + self.regularizer(theta)

    def data_grad(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """``Σ_i ∇ℓ_i(θ)`` (zeros for an empty set)."""
        if X.shape[0] == 0:
            return torch.zeros_like(theta)
        return grad(self.data_loss)(theta, X, y)

    def grad(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """``∇L(D; θ) = Σ_i ∇ℓ_i + μθ``."""
        return self.data_grad(theta, X, y) + self.mu * theta

    # ------------------------------------------------------------------ curvature products
    def hvp(self, theta: Tensor, X: Tensor, y: Tensor, v: Tensor, weight: float = 1.0) -> Tensor:
        """``(weight · Σ_i ∇²ℓ_i + μI) v`` (reverse-over-reverse autograd: cheaper than
        ``torch.func`` forward-over-reverse for small models)."""
        if X.shape[0] == 0:
            return self.mu * v
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.data_loss(t, X, y), t, create_graph=True)
            (hv,) = torch.autograd.grad(g, t, v)
        return weight * hv + self.mu * v

    def ggn_vp(self, theta: Tensor, X: Tensor, y: Tensor, v: Tensor, weight: float = 1.0) -> Tensor:
        """``(weight · Σ_i J_iᵀ ∇²_z ℓ_i J_i + μI) v``: ``Jv`` by the double-VJP trick, the loss
        Hessian ``S Sᵀ`` in output space, one VJP; all on one forward graph."""
        if X.shape[0] == 0:
            return self.mu * v
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            z = self.outputs(t, X)
            u = torch.zeros_like(z, requires_grad=True)
            (jtu,) = torch.autograd.grad(z, t, u, create_graph=True)
            (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True)
            S = self.loss.hessian_factor(z.detach()).to(jv.dtype)  # (N, C, K), S Sᵀ = ∇²_z ℓ
            hz = torch.einsum("nck,nk->nc", S, torch.einsum("nck,nc->nk", S, jv))
            (gv,) = torch.autograd.grad(z, t, hz)
        return weight * gv + self.mu * v

    def curvature_vp(self, curvature: str):
        check_curvature(curvature)
        return self.hvp if curvature == "hessian" else self.ggn_vp

    # ------------------------------------------------------------------ dense matrices (small models)
    def hessian(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Dense ``H = Σ_i ∇²ℓ_i + μI`` of shape ``(P, P)`` (``torch.func``, forward over reverse)."""
        eye = torch.eye(self.dim, dtype=theta.dtype, device=theta.device)
        if X.shape[0] == 0:
            return self.mu * eye
        H = vmap(lambda v: jvp(lambda t: self.data_grad(t, X, y), (theta,), (v,))[1])(eye)
        return 0.5 * (H + H.T) + self.mu * eye

    def ggn(self, theta: Tensor, X: Tensor, y: Tensor, chunk: int = 256) -> Tensor:
        """Dense ``G = Σ_i J_iᵀ S_i S_iᵀ J_i + μI`` (per-sample Jacobians, ``S`` from ``losses.py``)."""
        G = self.mu * torch.eye(self.dim, dtype=theta.dtype, device=theta.device)

        def out1(t, x):
            return self.outputs(t, x.unsqueeze(0))[0]

        for start in range(0, X.shape[0], chunk):
            Xc = X[start : start + chunk]
            J = vmap(jacrev(out1), in_dims=(None, 0))(theta, Xc)  # (n, C, P)
            S = self.loss.hessian_factor(self.outputs(theta, Xc).detach()).to(J.dtype)  # (n, C, K)
            JS = torch.einsum("ncp,nck->nkp", J, S).reshape(-1, self.dim)
            G = G + JS.T @ JS
        return G


class ObjectiveCurvature(Option):
    """The curvature of an unlearning objective: its exact ``hessian`` or its Gauss-Newton ``ggn``."""

    HESSIAN = "hessian"
    GGN = "ggn"


def check_curvature(curvature: str) -> None:
    if curvature not in ObjectiveCurvature.values():
        raise ValueError(f"unknown curvature {curvature!r}; valid: {ObjectiveCurvature.values()}")
