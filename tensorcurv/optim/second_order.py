"""Natural-gradient and Gauss-Newton optimizers with any registered structure as preconditioner.

    opt = GaussNewton(model, nn.MSELoss(), structure="kfac", lr=1.0, damping=1e-3)
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), structure="kron_sum", kind="mc", rank=2)
    loss = opt.step(inputs, targets)

One step: forward + backward (statistics captured when due, :class:`Preconditioner`), optional
gradient clipping of the raw gradient, ``d = ν (Ĉ + λI)^{-1} g`` (exact Tikhonov damping unless
the structure's hparams say otherwise, e.g. kfac ``damping_kind="pi"``), decoupled weight decay
``θ ← θ(1 − η wd)``, then torch's SGD on ``d`` (heavy-ball momentum ``b ← μ b + d``,
``θ ← θ − η b``). Under ``damping_rule="lm"`` the loss on the same batch after the step gives the
reduction ratio ``ρ = (L(θ+δ) − L(θ)) / (gᵀδ + ½δᵀĈδ)`` (``Ĉδ`` from ``Curvature.mv``, the undamped
structured curvature) that adapts λ.

Krylov refinement (``refine=k > 0``, :mod:`tensorcurv.optim.refine`): ``d`` is replaced by at most
``k`` PCG steps on the damped exact mini-batch curvature, ``(C + λI) d = g`` from ``d = 0``, with
``(Ĉ + λI)^{-1}`` as preconditioner (Hessian-free with the structure as preconditioner; the
products ``C v`` from the captured per-sample factors, or the GGN by torch.func). ``info`` reports
``refine_iterations``, ``refine_residual``, ``refine_cosine`` (to the unrefined ``d``) and ``refine_time``.
Under data parallelism each product is all-reduced (the global batch's ``C``, the same iterates on every rank).

L1 (``l1 = α > 0``, :mod:`tensorcurv.optim.proximal`): proximal Gauss-Newton, after the step
``θ ← argmin_u (1/2η)‖u − z‖²_{Ĉ+λI} + α‖u‖₁`` (``z`` the damped GN point); fixed points solve
``0 ∈ ∇L + α∂‖θ‖₁``, the LASSO for a linear least-squares model.

Damping ↔ ridge (linear model, one output, ``nn.MSELoss()`` mean over ``N`` samples): the GGN
is ``(2/N) X̃ᵀX̃`` (exact for a linear model), so one step with ``lr=1`` from ``θ = 0`` lands on
``(X̃ᵀX̃ + μI)^{-1} X̃ᵀy`` with ``μ = Nλ/2`` (``X̃ = [X, 1]`` with the bias column).

Structure hyper-parameters (``rank=2``, ``damping_kind="pi"``, ...) are forwarded to
``tensorcurv.Curvature(model, structure, kind, **hparams)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tensorcurv.distributed.reduce import global_product, reduce_loss
from tensorcurv.optim import config as cfgs
from tensorcurv.optim import proximal
from tensorcurv.optim.damping import FixedDamping, LevenbergMarquardt, reduction_ratio
from tensorcurv.optim.damping import build as build_damping
from tensorcurv.optim.preconditioner import Preconditioner
from tensorcurv.optim.refine import Refinement


def _damping_of(c: cfgs.SecondOrderConfig) -> FixedDamping | LevenbergMarquardt:
    """The damping schedule of config ``c``: fixed (λ or λ(step)), or Levenberg–Marquardt under ``lm``."""
    return build_damping(
        c.damping_rule,
        c.damping,
        **(
            dict(
                factor=c.lm_factor,
                rho_low=c.rho_low,
                rho_high=c.rho_high,
                min_damping=c.min_damping,
                max_damping=c.max_damping,
            )
            if c.damping_rule == "lm"
            else {}
        ),
    )


class SecondOrderOptimizer:
    """``θ ← θ − η ν (Ĉ + λI)^{-1} ∇L`` with momentum / weight decay / clipping / LM damping."""

    name = "second_order"

    def __init__(self, model: nn.Module, loss_fn: Any, **kwargs: Any) -> None:
        comm = kwargs.pop("comm", None)  # tensorcurv.distributed.Comm (or a DDP-wrapped model)
        opt_kw, struct_kw = cfgs.split_structure_hparams(self.name, kwargs)
        exclude = struct_kw.pop("exclude", ())
        self.config = cfgs.make_second_order_config(self.name, opt_kw, struct_kw)
        c = self.config
        damping = _damping_of(c)
        self.model = model
        self.preconditioner = Preconditioner(
            model,
            loss_fn,
            c.structure,
            c.kind,
            damping,
            decay=c.decay,
            decay_schedule=c.decay_schedule,
            stats_interval=c.stats_interval,
            inverse_interval=c.inverse_interval,
            kl_clip=c.kl_clip,
            stats_fraction=c.stats_fraction,
            mc_samples=c.mc_samples,
            seed=c.seed,
            fallback=c.fallback,
            exclude=exclude,
            comm=comm,
            **struct_kw,
        )
        self.model = self.preconditioner.model  # unwrapped if DDP
        self.curvature = self.preconditioner.curvature
        self.loss = self.preconditioner.loss
        self.params = self.preconditioner.params
        lr0 = c.lr(0) if callable(c.lr) else c.lr
        self.optimizer = torch.optim.SGD(self.params, lr=lr0, momentum=c.momentum)
        self.proximal = proximal.attach(  # proximal Gauss-Newton (L1); None when l1 = 0
            self.optimizer,
            c,
            metric=lambda v: self.preconditioner.solver.mv(v),
            damping=lambda: self.preconditioner.info["damping"],
            prox_steps=c.l1_prox_steps,
        )
        self.info: dict[str, Any] = {}
        self.refinement: Refinement | None = None
        if c.refine:
            self.refinement = Refinement(
                self.preconditioner.solver, c.refine, c.refine_tol, c.refine_coupling, c.refine_operator
            )
            self.preconditioner.keep_stats = c.refine_operator == "stats"

    @property
    def steps(self) -> int:
        return self.preconditioner.steps

    @property
    def damping(self) -> float:
        return self.preconditioner.damping.value(self.steps)

    def _lr(self) -> float:
        if callable(self.config.lr):
            lr = float(self.config.lr(self.steps))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One optimizer step: forward, backward, curvature update when due, preconditioned update.

        Args:
            inputs: a batch of model inputs.
            targets: the batch's targets, as ``loss_fn`` expects them.

        Returns:
            The loss on the batch before the step (detached). A step with non-finite values is skipped
            (parameters, curvature and counters unchanged) and ``info["skipped"]`` says so.
        """
        c, pre = self.config, self.preconditioner
        lr = self._lr()
        t = self.steps
        loss = pre.backward(inputs, targets)
        if pre.last_skipped:
            self.info = dict(pre.info, step=t, lr=lr)
            return loss
        lm_due = getattr(pre.damping, "adaptive", False) and t % c.lm_interval == 0
        if lm_due:
            g = [p.grad.detach().clone() for p in self.params]  # type: ignore[union-attr]  # set by backward
            theta = [p.detach().clone() for p in self.params]
        grad_norm = None
        if c.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip))
        if not pre.precondition(lr, None if self.refinement is None else self._refine(inputs, targets)):
            self.info = dict(pre.info, step=t, lr=lr)
            return loss
        if c.weight_decay:
            with torch.no_grad():
                for p in self.params:
                    p.mul_(1.0 - lr * c.weight_decay)
        self.optimizer.step()
        info = dict(pre.info, step=t, lr=lr)  # pre.info["loss"] is already the host float (one sync per step)
        if grad_norm is not None:
            info["grad_norm"] = grad_norm
        if self.proximal is not None:
            info.update(self.proximal.info)
        if lm_due:
            info.update(self._levenberg_marquardt(inputs, targets, float(loss), g, theta))
        self.info = info
        return loss

    def _refine(self, inputs: Tensor, targets: Tensor):
        """The refinement of this step's direction (``Preconditioner.precondition``'s ``refine``)."""
        refinement, pre = self.refinement, self.preconditioner

        def refine(grads, directions, damping):
            mv = refinement.operator_for(pre.last_stats, self.model, self.loss, inputs, targets)
            if pre.comm is not None:  # data parallel: the global batch's C, identical on every rank
                mv = global_product(pre.comm, mv, inputs.shape[0], self.loss.reduction)
            return refinement(grads, directions, damping, mv)

        return refine

    @torch.no_grad()
    def _levenberg_marquardt(self, inputs, targets, loss_before, g, theta) -> dict[str, float]:
        delta = [p.detach() - t0 for p, t0 in zip(self.params, theta)]
        Cd = self.preconditioner.solver.mv(delta)
        model_decrease = sum(float((gi * d).sum()) + 0.5 * float((d * cd).sum()) for gi, d, cd in zip(g, delta, Cd))
        out = self.model(inputs)
        loss_after = float(self.loss(out.flatten(1) if out.dim() != 2 else out, targets))
        if self.preconditioner.comm is not None:  # data parallel: the global-batch loss on every rank
            loss_after = reduce_loss(self.preconditioner.comm, loss_after, inputs.shape[0], self.loss.reduction)
        rho = reduction_ratio(loss_before, loss_after, model_decrease)
        self.preconditioner.damping.observe(rho)
        return {"rho": rho, "loss_after": loss_after, "model_decrease": model_decrease, "damping_next": self.damping}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Curvature (statistics, factors, RNG of MC sampling), solver copy, damping, counters,
        and the inner torch optimizer (momentum buffers, lr)."""
        state = {
            "name": self.name,
            "preconditioner": self.preconditioner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.proximal is not None:
            state["proximal"] = self.proximal.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for optimizer {state.get('name')!r}, this is {self.name!r}")
        self.preconditioner.load_state_dict(state["preconditioner"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.proximal is not None and "proximal" in state:
            self.proximal.load_state_dict(state["proximal"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class GaussNewton(SecondOrderOptimizer):
    """Gauss-Newton: GGN curvature (``kind="ggn"``), exact Tikhonov damping, ``lr=1`` by default.

    Args:
        model: the model; its covered layers get one structure each (``Curvature``).
        loss_fn: the loss (e.g. ``nn.MSELoss()``); the curvature is the GGN of exactly this loss.
        structure: any name of ``tensorcurv.structures.names()``.
        lr: learning rate ``η`` (a number or a callable of the step).
        damping: ``λ > 0`` of ``(Ĉ + λI)^{-1}`` (a number or a callable of the step).
        **hparams: the other keys of ``tensorcurv.optim.config`` (momentum, intervals, ``kl_clip``,
            ``damping_rule``, ...) and the structure's hyper-parameters (e.g. ``rank=2``).
    """

    name = "gauss_newton"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        structure: str = "kfac",
        lr: Any = 1.0,
        damping: Any = 1e-3,
        **hparams: Any,
    ) -> None:
        super().__init__(model, loss_fn, structure=structure, lr=lr, damping=damping, **hparams)


class NaturalGradient(SecondOrderOptimizer):
    """Natural gradient: Fisher curvature, ``kind="mc"`` (sampled labels) or ``"empirical"``.

    Args:
        model: the model; its covered layers get one structure each (``Curvature``).
        loss_fn: the loss (e.g. ``nn.CrossEntropyLoss()``).
        structure: any name of ``tensorcurv.structures.names()``.
        kind: ``"mc"`` (Monte-Carlo Fisher), ``"empirical"`` or ``"ggn"``.
        lr: learning rate ``η`` (a number or a callable of the step).
        damping: ``λ > 0`` of ``(Ĉ + λI)^{-1}`` (a number or a callable of the step).
        **hparams: the other keys of ``tensorcurv.optim.config`` (momentum, intervals, ``kl_clip``,
            ``damping_rule``, ...) and the structure's hyper-parameters (e.g. ``rank=2``).
    """

    name = "natural_gradient"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        structure: str = "kfac",
        kind: str = "mc",
        lr: Any = 1.0,
        damping: Any = 1e-3,
        **hparams: Any,
    ) -> None:
        super().__init__(model, loss_fn, structure=structure, kind=kind, lr=lr, damping=damping, **hparams)


__all__ = ["GaussNewton", "NaturalGradient", "SecondOrderOptimizer"]
