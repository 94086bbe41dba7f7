"""Layer adapters: how a module's input/output-gradient become the factors ``a``, ``g``.

Each adapter knows, for one module type, the weight-matrix shape ``(m, n)``, how to turn the
module input into ``a`` of shape ``(N, T, n)`` (bias folded as a trailing 1), how to turn
(batched) output gradients into ``g`` of shape ``(N, K, T, m)``, and how to move between the
module's parameters and the matrix ``[W, b]``. See ``stats.py`` for the conventions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def extract_patches(x: Tensor, kernel_size, dilation=1, padding=0, stride=1, ones: bool = False) -> Tensor:
    """Convolution patches of ``x`` (N, C, H, W) as ``(N, T, C*kh*kw)``, same order as ``F.unfold``
    (``ones=True``: with a trailing column of ones for the folded bias, written in the same copy).

    Built from strided views (one copy) instead of ``F.unfold``, whose CPU kernel loops over the
    batch and was ~10x slower than the convolution itself in ``scripts/bench_capture.py``.
    """
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(_pair, (kernel_size, dilation, padding, stride))
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    p = x.unfold(2, span_h, sh).unfold(3, span_w, sw)  # (N, C, Ho, Wo, span_h, span_w)
    if dh > 1 or dw > 1:
        p = p[..., ::dh, ::dw]
    N, C, Ho, Wo = p.shape[:4]
    p = p.permute(0, 2, 3, 1, 4, 5)
    if not ones:
        return p.reshape(N, Ho * Wo, C * kh * kw)
    # one copy straight into (N, T, C*kh*kw + 1) with the bias column of ones (no second cat copy)
    out = x.new_empty(N, Ho, Wo, C * kh * kw + 1)
    out[..., :-1].view(N, Ho, Wo, C, kh, kw).copy_(p)
    out[..., -1] = 1
    return out.reshape(N, Ho * Wo, -1)


class LayerAdapter:
    """Base class; subclasses implement one module type."""

    module_type: type[nn.Module] = nn.Module

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def params(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the Kronecker block covers, in matrix-column order (weight, then bias)."""
        out: list[tuple[str, Any]] = [("weight", self.module.weight)]
        if getattr(self.module, "bias", None) is not None:
            out.append(("bias", self.module.bias))
        return out

    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def inputs(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def output_grads(self, gz: Tensor) -> Tensor:
        """``gz`` has shape ``(K, N, *output)``; returns ``(N, K, T, m)``."""
        raise NotImplementedError

    def to_matrix(self, tensors: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def from_matrix(self, M: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def weight_matrix_shape(self) -> tuple[int, int] | None:
        """``(m, n')`` when ``to_matrix(tensors) = [weight.view(m, n'), bias]`` (bias column only if
        present), so a solve can read and write the parameter tensors through views, without the
        ``[W, b]`` copies; None when the block matrix is not such a column split (general path)."""
        return None


class LinearAdapter(LayerAdapter):
    """``nn.Linear``; extra leading input dims (sequences) become positions ``T``."""

    module_type = nn.Linear

    def shape(self):
        m, d = self.module.weight.shape
        return (m, d + (self.module.bias is not None))

    def inputs(self, x):
        a = x.reshape(x.shape[0], -1, x.shape[-1])
        return _with_ones(a) if self.module.bias is not None else a

    def output_grads(self, gz):
        K, N = gz.shape[:2]
        return gz.reshape(K, N, -1, gz.shape[-1]).transpose(0, 1)

    def to_matrix(self, tensors):
        if self.module.bias is None:
            return tensors[0]
        return torch.cat([tensors[0], tensors[1].unsqueeze(1)], dim=1)

    def from_matrix(self, M):
        if self.module.bias is None:
            return [M]
        return [M[:, :-1].contiguous(), M[:, -1].contiguous()]

    def weight_matrix_shape(self):
        return tuple(self.module.weight.shape)


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` (groups=1, zero padding): ``a`` = unfolded patches, one per output position."""

    module_type = nn.Conv2d

    def _conv_args(self):
        c = self.module
        padding = 0 if c.padding == "valid" else c.padding
        return dict(kernel_size=c.kernel_size, dilation=c.dilation, padding=padding, stride=c.stride)

    def shape(self):
        w = self.module.weight
        return (w.shape[0], w[0].numel() + (self.module.bias is not None))

    def inputs(self, x):
        return extract_patches(x, **self._conv_args(), ones=self.module.bias is not None)  # (N, T, C_in*kh*kw [+1])

    def output_grads(self, gz):
        K, N, C = gz.shape[:3]
        return gz.reshape(K, N, C, -1).permute(1, 0, 3, 2)

    def to_matrix(self, tensors):
        W = tensors[0].reshape(tensors[0].shape[0], -1)
        return W if self.module.bias is None else torch.cat([W, tensors[1].unsqueeze(1)], dim=1)

    def from_matrix(self, M):
        shape = self.module.weight.shape
        if self.module.bias is None:
            return [M.reshape(shape)]
        return [M[:, :-1].reshape(shape), M[:, -1].contiguous()]

    def weight_matrix_shape(self):
        w = self.module.weight
        return (w.shape[0], w[0].numel())


class ConvTranspose2dAdapter(LayerAdapter):
    """``nn.ConvTranspose2d`` (groups=1): ``W = weight.reshape(C_in, -1).T``, ``(C_out*kh*kw, C_in)``.

    A transposed convolution is the adjoint of the convolution with the same weight, so its
    weight gradient is ``Σ_t x_t ⊗ unfold(gz)_t`` over *input* positions ``t``: ``a`` is the input
    pixel (``C_in`` channels) and ``g`` an unfolded patch of the output gradient. Its bias sums
    the output gradient over output positions and cannot be folded into this product, so the
    bias is left to the fallback (reported by ``Curvature.coverage()``).
    """

    module_type = nn.ConvTranspose2d

    def params(self):
        return [("weight", self.module.weight)]

    def shape(self):
        w = self.module.weight
        return (w[0].numel(), w.shape[0])

    def inputs(self, x):
        return x.flatten(2).transpose(1, 2)  # (N, H*W, C_in)

    def output_grads(self, gz):
        c = self.module
        K, N = gz.shape[:2]
        patches = extract_patches(
            gz.reshape(K * N, *gz.shape[2:]),
            kernel_size=c.kernel_size,
            dilation=c.dilation,
            padding=c.padding,
            stride=c.stride,
        )  # (K*N, T, C_out*kh*kw)
        return patches.reshape(K, N, *patches.shape[1:]).transpose(0, 1)

    def to_matrix(self, tensors):
        w = tensors[0]
        return w.reshape(w.shape[0], -1).T

    def from_matrix(self, M):
        return [M.T.reshape(self.module.weight.shape)]


ADAPTERS: tuple[type[LayerAdapter], ...] = (LinearAdapter, Conv2dAdapter, ConvTranspose2dAdapter)


@dataclass
class Coverage:
    """Why a module is (not) covered by a Kronecker-factored block."""

    name: str
    module_type: str
    adapter: LayerAdapter | None
    reason: str


def adapter_for(name: str, module: nn.Module) -> Coverage:
    """Return the adapter for ``module``, or the reason it is not covered."""
    kind = type(module).__name__
    for cls in ADAPTERS:
        if type(module) is cls.module_type:
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                if module.groups != 1:
                    return Coverage(name, kind, None, f"groups={module.groups} (only groups=1 is covered)")
                if module.padding_mode != "zeros":
                    return Coverage(name, kind, None, f"padding_mode={module.padding_mode!r} (only 'zeros')")
                if isinstance(module.padding, str):
                    if module.padding != "valid":
                        return Coverage(name, kind, None, f"padding={module.padding!r} (use integer padding)")
            if not module.weight.requires_grad:
                return Coverage(name, kind, None, "weight is frozen")
            adapter = cls(module)
            if any(not p.requires_grad for _, p in adapter.params()):
                return Coverage(
                    name, kind, None, "bias is frozen while the weight trains (the [W, b] block needs both)"
                )
            return Coverage(name, kind, adapter, "kronecker block")
    return Coverage(name, kind, None, "no Kronecker adapter for this layer type")
