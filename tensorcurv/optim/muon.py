"""Muon on the hidden weight matrices and AdamW on the rest, as one ``torch.optim.Optimizer``.

Muon (Jordan et al. 2024; torch's :class:`torch.optim.Muon`) replaces the momentum ``B`` of an ``m×n``
weight matrix by its orthogonal factor: with ``B̃ = U S Vᵀ``, the step is ``U Vᵀ`` (approximated by
``k`` Newton–Schulz iterations), scaled by ``η √max(1, m/n)``. It is meant for the matrices of hidden
layers only. The split (:func:`split_parameters`), following Jordan et al.:

* Muon: every 2-D parameter (``nn.Linear`` weights, in registration order), except those below;
* AdamW: 1-D and 0-D parameters (biases, norm gains), ``nn.Embedding`` tables, the last 2-D weight
  (the output layer; ``adamw_last_layer``), optionally the first (``adamw_first_layer``), and weights
  of more than two dimensions (convolution kernels: ``torch.optim.Muon`` takes matrices only).

:class:`MuonAdamW` holds both optimizers; its ``param_groups`` are theirs (Muon's first), so an LR
scheduler scales both learning rates, and ``step``, ``zero_grad``, ``state_dict`` cover both.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def split_parameters(
    model: nn.Module, adamw_first_layer: bool = False, adamw_last_layer: bool = True
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(muon, adamw)``: the trainable parameters of ``model`` split by the rule of the module docstring."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() == 2 and id(p) not in embeddings]
    excluded = set()
    if matrices and adamw_first_layer:
        excluded.add(id(matrices[0]))
    if matrices and adamw_last_layer:
        excluded.add(id(matrices[-1]))
    muon = [p for p in matrices if id(p) not in excluded]
    chosen = {id(p) for p in muon}
    return muon, [p for p in params if id(p) not in chosen]


class MuonAdamW(torch.optim.Optimizer):
    """:class:`torch.optim.Muon` on ``muon_params`` and :class:`torch.optim.AdamW` on ``adamw_params``.

    Either list may be empty (not both). ``muon`` / ``adamw`` are the inner optimizers (None when empty).
    """

    def __init__(
        self,
        muon_params: list[nn.Parameter],
        adamw_params: list[nn.Parameter],
        *,
        lr: float,
        momentum: float,
        nesterov: bool,
        ns_steps: int,
        adjust_lr: str,
        weight_decay: float,
        adamw_lr: float,
        adamw_betas: tuple[float, float],
        adamw_eps: float,
        adamw_weight_decay: float,
    ) -> None:
        if not muon_params and not adamw_params:
            raise ValueError("MuonAdamW: no parameters to optimize")
        self.muon = (
            torch.optim.Muon(
                muon_params,
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                adjust_lr_fn=adjust_lr,
                weight_decay=weight_decay,
            )
            if muon_params
            else None
        )
        self.adamw = (
            torch.optim.AdamW(
                adamw_params, lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay
            )
            if adamw_params
            else None
        )
        super().__init__(self._inner_groups(), {})

    def _inners(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    def _inner_groups(self) -> list[dict[str, Any]]:
        return [g for o in self._inners() for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self._inners():
            o.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "muon": self.muon.state_dict() if self.muon is not None else None,
            "adamw": self.adamw.state_dict() if self.adamw is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, o in (("muon", self.muon), ("adamw", self.adamw)):
            if (state_dict.get(key) is None) != (o is None):
                raise ValueError(
                    f"MuonAdamW state has {key}={'none' if state_dict.get(key) is None else 'some'} "
                    f"parameters, this optimizer the opposite"
                )
            if o is not None:
                o.load_state_dict(state_dict[key])
        self.param_groups = self._inner_groups()  # load_state_dict replaces the inner group dicts


def build(model: nn.Module, c: Any) -> MuonAdamW:
    """The optimizer of a validated :class:`~tensorcurv.optim.config.MuonConfig` ``c`` for ``model``."""
    muon, adamw = split_parameters(model, c.adamw_first_layer, c.adamw_last_layer)
    if not muon:
        warnings.warn(
            "tensorcurv.optim: muon found no hidden weight matrix in the model; every parameter is on AdamW",
            UserWarning,
            stacklevel=4,
        )
    return MuonAdamW(
        muon,
        adamw,
        lr=c.lr,
        momentum=c.momentum,
        nesterov=c.nesterov,
        ns_steps=c.ns_steps,
        adjust_lr=c.adjust_lr,
        weight_decay=c.weight_decay,
        adamw_lr=c.adamw_lr,
        adamw_betas=(c.adamw_beta1, c.adamw_beta2),
        adamw_eps=c.adamw_eps,
        adamw_weight_decay=c.adamw_weight_decay,
    )
