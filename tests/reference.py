"""Independent dense references for curvature blocks (float64, tiny models).

Built only from ``torch.func`` (per-sample Jacobians, per-sample gradients and loss Hessians
by automatic differentiation) — none of tensorcurv's capture, losses or structures is used,
so agreement with tensorcurv is evidence, not tautology.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap


def per_sample_loss(loss_name: str, reduction: str = "mean"):
    """ℓ(z, y) for one sample, as torch's losses define the per-sample contribution."""
    if loss_name == "cross_entropy":
        return lambda z, y: F.cross_entropy(z.unsqueeze(0), y.unsqueeze(0))
    if loss_name == "mse":
        if reduction == "mean":
            return lambda z, y: F.mse_loss(z, y, reduction="mean")
        return lambda z, y: F.mse_loss(z, y, reduction="sum")
    if loss_name == "bce_with_logits":  # torch's "mean" averages over all N·C elements: 1/C per sample
        return lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction=reduction)
    raise ValueError(loss_name)


def _params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def full_block(model, x, y, loss_name, kind, reduction="mean"):
    """Dense ``C = c Σ_s J_sᵀ H_s J_s`` (ggn) or ``c Σ_s ∇ℓ_s ∇ℓ_sᵀ`` (empirical) over all params.

    Returns ``(C, names, shapes)`` with parameters flattened in ``model.named_parameters()`` order.
    """
    params = _params(model)
    names = list(params)
    shapes = [params[n].shape for n in names]
    ell = per_sample_loss(loss_name, reduction)
    N = x.shape[0]
    c = 1.0 / N if reduction == "mean" else 1.0

    def f(p, xs):
        return functional_call(model, p, (xs.unsqueeze(0),)).flatten()

    def flat(d):
        return torch.cat([d[n].reshape(*d[n].shape[: d[n].dim() - len(params[n].shape)], -1) for n in names], -1)

    if kind == "empirical":
        gs = vmap(grad(lambda p, xs, ys: ell(f(p, xs), ys)), in_dims=(None, 0, 0))(params, x, y)
        G = flat(gs)  # (N, P)
        return c * G.T @ G, names, shapes
    if kind == "ggn":
        J = flat(vmap(jacrev(f), in_dims=(None, 0))(params, x))  # (N, C, P)
        z = vmap(lambda xs: f(params, xs))(x)
        H = vmap(hessian(ell), in_dims=(0, 0))(z, y)  # (N, C, C)
        return c * torch.einsum("sci,scd,sdj->ij", J, H, J), names, shapes
    raise ValueError(kind)


def layer_index(model, layer_name, names, shapes):
    """Indices into the flat parameter vector giving column-major ``vec([W, b])`` of a layer."""
    offsets, o = {}, 0
    for n, s in zip(names, shapes):
        offsets[n] = o
        o += int(torch.Size(s).numel())
    module = dict(model.named_modules())[layer_name]
    prefix = f"{layer_name}." if layer_name else ""
    w = module.weight
    if isinstance(module, nn.ConvTranspose2d):
        # W̃ = weight.reshape(in, -1).T  ->  W̃[i, j] = weight_flat[j * (out*kh*kw) + i]
        m, n = w[0].numel(), w.shape[0]
        idx = torch.arange(w.numel()).reshape(n, m).T  # (m, n) of flat positions
    else:
        m = w.shape[0]
        idx = torch.arange(w.numel()).reshape(m, -1)
    idx = idx + offsets[prefix + "weight"]
    if getattr(module, "bias", None) is not None and not isinstance(module, nn.ConvTranspose2d):
        b = torch.arange(m).unsqueeze(1) + offsets[prefix + "bias"]
        idx = torch.cat([idx, b], dim=1)
    return idx.T.reshape(-1)  # column-major vec


def layer_block(model, x, y, loss_name, kind, layer_name, reduction="mean"):
    C, names, shapes = full_block(model, x, y, loss_name, kind, reduction)
    idx = layer_index(model, layer_name, names, shapes)
    return C[idx][:, idx]
