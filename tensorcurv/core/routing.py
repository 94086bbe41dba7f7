"""How a whole-model operation reaches every trainable parameter (``Curvature.solve`` and ``mv``).

A covered layer's parameters become its weight matrix ``[W, b] = adapter.to_matrix`` (bias folded as the
last column, conv weights as ``(C_out, C_in kh kw)``), the model-level operator maps ``{layer: [W, b]}``
to ``{layer: X}`` and ``from_matrix`` splits ``X`` back; an uncovered parameter goes through the fallback
alone. Layers whose block has a copy-free ``solve_split`` are instead solved on views of ``W`` and ``b``
(no concatenation or split copies). The index maps are built once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tensorcurv.core.layers import LayerAdapter
from tensorcurv.core.parameters import gradient_list

if TYPE_CHECKING:
    from tensorcurv.structures.model import ModelStructure

#: ``(layer, adapter, parameter indices)`` per covered layer
LayerRows = list[tuple[str, LayerAdapter, list[int]]]
#: ``(block.solve_split, weight index, bias index or None, 2-D view shape or None)`` per copy-free layer
SplitRows = list[tuple[Callable[..., None], int, int | None, tuple[int, ...] | None]]


class ParameterRouting:
    """The parameters of a :class:`~tensorcurv.curvature.Curvature` (``named_params``, in ``params``
    order) routed to the covered layers of ``adapters``, the ``uncovered`` ones, and ``model_structure``."""

    def __init__(
        self,
        named_params: Sequence[tuple[str, Tensor]],
        adapters: Mapping[str, LayerAdapter],
        uncovered: Sequence[tuple[str, Tensor]],
        model_structure: ModelStructure,
    ) -> None:
        self.named_params = named_params
        self.params = [p for _, p in named_params]
        self.adapters, self.uncovered, self.model_structure = adapters, uncovered, model_structure
        self._layout_cache: tuple[LayerRows, list[tuple[str, int]]] | None = None
        self._split_cache: tuple[SplitRows, LayerRows] | None = None

    def layout(self) -> tuple[LayerRows, list[tuple[str, int]]]:
        """Index maps into ``params`` (built once): ``(layer, adapter, param indices)`` per
        covered layer and ``(name, index)`` per uncovered parameter."""
        if self._layout_cache is None:
            by_id = {id(p): i for i, p in enumerate(self.params)}
            layers = [(name, ad, [by_id[id(p)] for _, p in ad.params()]) for name, ad in self.adapters.items()]
            self._layout_cache = (layers, [(n, by_id[id(p)]) for n, p in self.uncovered])
        return self._layout_cache

    def split_plan(self) -> tuple[SplitRows, LayerRows]:
        """Built once: ``(block.solve_split, weight index, bias index or None, 2-D view shape or None)``
        for every layer the model structure solves alone with a copy-free ``solve_split``
        (``ModelStructure.split_solvers``) and whose adapter has a ``weight_matrix_shape``; the other
        layers (``layout`` rows) take the ``[W, b]`` path."""
        if self._split_cache is None:
            split: SplitRows = []
            rest: LayerRows = []
            solvers = self.model_structure.split_solvers()
            for name, ad, idx in self.layout()[0]:
                fn = solvers.get(name)
                shape = ad.weight_matrix_shape()
                if fn is None or shape is None:
                    rest.append((name, ad, idx))
                    continue
                view = None if tuple(self.params[idx[0]].shape) == tuple(shape) else tuple(shape)
                split.append((fn, idx[0], idx[1] if len(idx) > 1 else None, view))
            self._split_cache = (split, rest)
        return self._split_cache

    def apply(self, grads, fallback_op, model_op, split_op=None, out=None):
        """``op`` on every parameter. Covered layers go through ``[W, b] = adapter.to_matrix``, the
        model-level ``model_op({layer: [W, b]})`` and ``from_matrix``; with ``split_op(block.solve_split,
        W, b, out_W, out_b)`` the layers of :meth:`split_plan` are done on views of the parameter
        tensors instead (no concatenation or split copies). ``out``: tensors (aligned like ``grads``)
        to write the result into. Returns the type of ``grads`` (a list, or a dict by parameter name)."""
        as_dict = isinstance(grads, Mapping)
        vecs = gradient_list(self.named_params, grads)
        outs = None
        if out is not None:
            outs = [out[n] for n, _ in self.named_params] if isinstance(out, Mapping) else list(out)
        res: list[Tensor | None] = [None] * len(vecs)
        layers, uncovered = self.layout()
        if split_op is not None:
            split, rest = self.split_plan()
            for fn, iw, ib, shape in split:
                W = vecs[iw]
                oW = torch.empty_like(W, memory_format=torch.contiguous_format) if outs is None else outs[iw]
                if shape is not None:  # conv: (C_out, C_in, kh, kw) ↔ (C_out, C_in kh kw) views
                    if not (W.is_contiguous() and oW.is_contiguous()):
                        rest = rest + [ly for ly in layers if ly[2][0] == iw]
                        continue
                    W, Wv = W.view(shape), oW.view(shape)
                else:
                    Wv = oW
                res[iw] = oW
                if ib is None:
                    split_op(fn, W, None, Wv, None)
                else:
                    ob = torch.empty_like(vecs[ib]) if outs is None else outs[ib]
                    split_op(fn, W, vecs[ib], Wv, ob)
                    res[ib] = ob
        else:
            rest = layers
        if rest:
            mats = {name: ad.to_matrix([vecs[i] for i in idx]) for name, ad, idx in rest}
            solved = model_op(mats)
            for name, ad, idx in rest:
                for i, t in zip(idx, ad.from_matrix(solved[name])):
                    res[i] = t
        for n, i in uncovered:
            res[i] = fallback_op(n, vecs[i])
        if outs is not None:
            for i, (o, t) in enumerate(zip(outs, res)):
                if o is not t:
                    o.copy_(t)
                    res[i] = o
        if as_dict:
            return {n: t for (n, _), t in zip(self.named_params, res)}
        return res
