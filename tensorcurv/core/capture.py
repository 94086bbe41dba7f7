"""Statistics capture: forward hooks + one (batched) backward → :class:`LayerStats` per layer.

For a batch, the forward hooks of the covered modules record the layer input ``a`` and the
layer output ``z``. The output-gradient vectors ``g`` then come from ``torch.autograd.grad`` with
respect to the recorded outputs (never the parameters, unless the caller also wants the
gradient of the loss):

* ``empirical``: ``g_s = ∂ℓ(f(x_s), y_s)/∂z_s = J_sᵀ ∂ℓ_s/∂f_s``. With ``grad_params`` it is read off
  the same backward that yields the parameter gradients (``∂L/∂z_s = c ∂ℓ_s/∂z_s``, divided by ``c``).
* ``mc``: ``g_sk = ∂ℓ(f(x_s), ŷ_sk)/∂z_s / √k`` with ``ŷ_sk`` drawn from the model's predictive
  distribution, ``k = mc_samples``.
* ``ggn``: ``g_sc = J_sᵀ S_s[:, c]`` for every column ``c`` of the loss-Hessian factor ``S_s``.

Every ``J_sᵀ v`` is one backward from the model outputs: for one column the plain backward of the scalar
``Σ_s ⟨f_s, v_s⟩``; for several one backward batched over the columns (``vmap`` over the VJP, as
``is_grads_batched`` does).

Samples must not interact inside the model (e.g. no BatchNorm in training mode), otherwise
``∂L/∂z_s`` is not a per-sample quantity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tensorcurv.core.layers import LayerAdapter
from tensorcurv.core.losses import LossSpec
from tensorcurv.core.options import Option
from tensorcurv.core.stats import SUPPORTED_DTYPES, LayerStats

try:  # the batched backward behind torch.autograd.grad(..., is_grads_batched=True), see _batched_vjp
    from torch._vmap_internals import _vmap as _legacy_vmap
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - other torch versions: the public call
    _legacy_vmap = _engine_run_backward = None  # type: ignore[assignment]


class CurvatureKind(Option):
    """Which matrix the statistics estimate: empirical Fisher (true labels), MC Fisher (sampled labels) or GGN."""

    EMPIRICAL = "empirical"
    MC = "mc"
    GGN = "ggn"


def check_kind(kind: str, mc_samples: int = 1) -> None:
    if kind not in CurvatureKind.values():
        raise ValueError(f"unknown curvature kind {kind!r}; valid kinds: {CurvatureKind.values()}")
    if not (isinstance(mc_samples, int) and not isinstance(mc_samples, bool) and mc_samples >= 1):
        raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")


def check_batch(inputs: Tensor, targets: Tensor) -> None:
    """One batch: tensors with the same number ``N >= 1`` of samples along dim 0, float inputs in a
    supported dtype (integer inputs, e.g. token ids, pass)."""
    for label, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"empty batch: inputs of shape {tuple(inputs.shape)} hold no samples (need N >= 1 along dim 0)"
        )
    if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match the {inputs.shape[0]} samples of "
            f"inputs {tuple(inputs.shape)}"
        )
    if inputs.is_floating_point() and inputs.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"inputs are {inputs.dtype}; supported dtypes are float32 and float64")


@dataclass
class CaptureResult:
    loss: Tensor  # the user's loss (detached)
    outputs: Tensor  # model outputs (detached)
    stats: dict[str, LayerStats]
    grads: list[Tensor] | None  # ∂L/∂θ for the requested parameters, if asked for
    cotangents: Tensor  # (K, N, C): the output-space vectors v with g = Jᵀ v (per-sample loss scale)


class _Recorder:
    """Context manager: forward hooks that record ``(a, z)`` of each covered module once."""

    def __init__(self, adapters: dict[str, LayerAdapter]) -> None:
        self.adapters = adapters
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str, adapter: LayerAdapter):
        def hook(module, args, output):
            if name in self.outputs:
                raise RuntimeError(
                    f"module {name!r} was called more than once in one forward pass; "
                    "shared/tied layers are not covered — exclude it from the curvature"
                )
            self.inputs[name] = adapter.inputs(args[0].detach())
            self.outputs[name] = output

        return hook

    def __enter__(self) -> _Recorder:
        for name, adapter in self.adapters.items():
            self._handles.append(adapter.module.register_forward_hook(self._hook(name, adapter)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _batched_vjp(outputs: Tensor, zs: list[Tensor], cotangents: Tensor) -> Sequence[Tensor | None]:
    """One backward batched over the columns of ``cotangents`` (K, *outputs.shape): what
    ``torch.autograd.grad(outputs, zs, cotangents, is_grads_batched=True)`` runs, without its Python check of the
    ``grad_outputs`` shape (the caller builds them in that shape), whose first call in a process imports sympy
    (0.4–1.3 s). Through the public call where torch lacks these internals."""
    if _legacy_vmap is None or _engine_run_backward is None:
        return torch.autograd.grad(outputs, zs, cotangents, is_grads_batched=True, retain_graph=True, allow_unused=True)
    inputs = tuple(zs)

    def vjp(v: Tensor):
        return _engine_run_backward((outputs,), (v,), True, False, inputs, True, accumulate_grad=False)

    try:
        return _legacy_vmap(vjp, 0, 0, allow_none_pass_through=True)(cotangents)
    except TypeError:  # the internals' signatures changed in this torch: the public call
        return torch.autograd.grad(outputs, zs, cotangents, is_grads_batched=True, retain_graph=True, allow_unused=True)


def _vjp(outputs: Tensor, zs: list[Tensor], cotangents: Tensor) -> list[Tensor]:
    """``Jᵀ v`` of the recorded layer outputs ``zs`` for each cotangent ``v`` in ``cotangents``
    (K, *outputs.shape), as ``(K, *z.shape)`` per layer. One column: the backward of the scalar
    ``⟨outputs, v⟩`` (a tensor ``grad_outputs`` would make autograd's shape check import sympy on first use);
    several: one backward batched over the columns, or one per column for an op without a batching rule."""
    K = cotangents.shape[0]
    res: Sequence[Tensor | None]
    if K == 1:
        res = torch.autograd.grad((outputs * cotangents[0]).sum(), zs, allow_unused=True)
        res = [None if r is None else r.unsqueeze(0) for r in res]
    else:
        try:
            res = _batched_vjp(outputs, zs, cotangents)
        except RuntimeError:  # an op without a batching rule: one backward per column
            cols = [
                torch.autograd.grad((outputs * v).sum(), zs, retain_graph=True, allow_unused=True) for v in cotangents
            ]
            res = [None if c[0] is None else torch.stack(c) for c in zip(*cols)]
    return [z.new_zeros((K,) + z.shape) if r is None else r for r, z in zip(res, zs)]


def capture(
    model: nn.Module,
    adapters: dict[str, LayerAdapter],
    inputs: Tensor,
    targets: Tensor,
    loss: LossSpec,
    kind: str = "ggn",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    grad_params: Sequence[Tensor] | None = None,
) -> CaptureResult:
    """Run one forward/backward and return the statistics of every covered layer.

    ``grad_params``: if given, also return ``∂L/∂θ`` for these parameters (for the empirical
    kind this comes from the same backward pass).
    """
    check_kind(kind, mc_samples)
    check_batch(inputs, targets)
    names = list(adapters)
    with _Recorder(adapters) as rec, torch.enable_grad():
        outputs = model(inputs)
    if outputs.dim() != 2:
        outputs_2d = outputs.flatten(1)
    else:
        outputs_2d = outputs
    N = outputs.shape[0]
    c = loss.batch_scale(N)
    zs = [rec.outputs[n] for n in names]
    value = loss(outputs_2d, targets)
    wanted = list(grad_params or [])
    grads: list[Tensor] | None = None

    if kind == "empirical" and wanted:  # one backward for the parameter gradients and the statistics
        res = torch.autograd.grad(value, wanted + zs, allow_unused=True)
        grads = [torch.zeros_like(p) if r is None else r for r, p in zip(res[: len(wanted)], wanted)]
        gz = [torch.zeros_like(z) if r is None else r / c for r, z in zip(res[len(wanted) :], zs)]
        gz = [r.unsqueeze(0) for r in gz]  # K = 1
        V = loss.output_gradient(outputs_2d, targets).unsqueeze(0)
    else:
        if wanted:
            res = torch.autograd.grad(value, wanted, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if r is None else r for r, p in zip(res, wanted)]
        if kind == "empirical":
            V = loss.output_gradient(outputs_2d, targets).unsqueeze(0)  # (1, N, C)
        elif kind == "mc":
            cols = [
                loss.output_gradient(outputs_2d, loss.sample_targets(outputs_2d, generator)) for _ in range(mc_samples)
            ]
            V = torch.stack(cols) / math.sqrt(mc_samples)  # (k, N, C)
        else:
            V = loss.hessian_factor(outputs_2d).permute(2, 0, 1)  # (K, N, C)
        gz = _vjp(outputs, zs, V.reshape((V.shape[0],) + outputs.shape).to(outputs.dtype))

    stats = {}
    for name, g in zip(names, gz):
        stats[name] = LayerStats(a=rec.inputs[name], g=adapters[name].output_grads(g.detach()), scale=c, name=name)
    rec.inputs.clear()
    rec.outputs.clear()
    return CaptureResult(loss=value.detach(), outputs=outputs.detach(), stats=stats, grads=grads, cotangents=V.detach())
