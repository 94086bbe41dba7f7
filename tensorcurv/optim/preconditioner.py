"""A curvature preconditioner that composes with any ``torch.optim`` optimizer.

    pre = Preconditioner(model, nn.MSELoss(), structure="kfac", kind="ggn", damping=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)    # or SGD, ...
    loss = pre.backward(x, y)   # forward + backward; statistics captured when due; p.grad = ∇L
    pre.precondition(lr)        # p.grad ← ν (Ĉ + λI)^{-1} ∇L for covered layers (uncovered: fallback)
    opt.step()

``Ĉ`` is the block-diagonal :class:`tensorcurv.Curvature` (any registered structure, any kind);
the solve is the structure's own ``solve`` (exact Tikhonov ``(Ĉ + λI)^{-1}`` unless the structure
documents otherwise). Schedule of the work:

* ``stats_interval = k_s``: statistics are captured (and folded into the running average with
  ``decay``, i.e. the structure's ``fit``/``update`` runs) on steps ``t ≡ 0 mod k_s``; other steps
  do one plain backward (no hooks, no extra backward).
* ``decay_schedule``: ``constant`` uses ``decay`` from the second update on (the first update fits);
  ``average`` uses ``min(1 − 1/k, decay)`` at the k-th update (k = 1, 2, ...; Martens & Grosse 2015
  §5), i.e. the plain mean of the first ``1/(1 − decay)`` batches, then the EMA, so the estimate is
  not dominated by the first batch.
* ``stats_fraction = f``: the statistics come from the first ``⌈f N⌉`` samples of the batch (one extra
  capture on them; the gradient is still the whole batch's, from a plain backward), e.g. the thesis's
  MC Fisher on a quarter of the mini-batch (``f = 0.25``); ``1`` captures on the whole batch in the
  same pass as the gradient.
* ``inverse_interval = k_i``: the solves use a copy of the curvature refreshed on steps
  ``t ≡ 0 mod k_i``; cached decompositions (K-FAC eigenbases, ...) are recomputed lazily at the
  first solve after a refresh. With ``k_i = 1`` the live curvature is used directly (no copy).
* KL clipping (Ba et al. 2017; Martens & Grosse 2015): ``ν = min(1, sqrt(κ / (η² Σ gᵀ P g)))``,
  ``gᵀ P g = Σ_layers ⟨g, Δ⟩`` from the gradient and the solved direction ``Δ`` (one fused sum).

Robustness: a non-finite loss, gradient or statistic skips the step *before* any curvature
block, counter or RNG state changes (all ``p.grad`` are set to ``None``, so a following
``opt.step()`` is a no-op) and warns naming the parameter or layer. So does a fit whose result is
non-finite although the statistics are finite (``NonFiniteError`` from ``fit_capture``, e.g. an
overflowing ``aᵀa``; ``Curvature`` has rolled every block back). A non-finite solve (only
possible for an indefinite structure) also skips the step and warns; the statistics of that
step are kept.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from tensorcurv.core.capture import CaptureResult
from tensorcurv.core.losses import as_loss_spec
from tensorcurv.core.options import Option
from tensorcurv.core.stats import NonFiniteError
from tensorcurv.curvature import Curvature
from tensorcurv.distributed import DistributedCurvature
from tensorcurv.distributed import resolve as resolve_distributed
from tensorcurv.distributed.reduce import sync_step
from tensorcurv.optim.damping import FixedDamping, LevenbergMarquardt


class DecaySchedule(Option):
    """Running-average decay over updates: ``constant`` or ``average`` (``min(1 − 1/k, decay)``)."""

    CONSTANT = "constant"
    AVERAGE = "average"


def scheduled_decay(decay: float | None, schedule: str, k: int) -> float | None:
    """Running-average decay at the k-th statistics update (k >= 1): ``decay`` (``constant``) or
    ``min(1 − 1/k, decay)`` (``average``); ``None`` (refit from each batch) stays ``None``."""
    if decay is None or schedule == "constant":
        return decay
    return min(1.0 - 1.0 / k, decay)


class NonFiniteStepWarning(RuntimeWarning):
    """A step was skipped because of a non-finite loss, gradient, statistic or solve."""


def first_nonfinite(named: Sequence[tuple[str, Tensor | None]]) -> list[str]:
    """Names whose tensor holds NaN/Inf. Fast path: one fused norm over all tensors, summed into one
    host number (norms are >= 0, so the sum is finite iff every tensor is, barring overflow, which
    only triggers the exact per-tensor check)."""
    present = [(n, t) for n, t in named if t is not None]
    if not present or math.isfinite(float(torch.stack(torch._foreach_norm([t for _, t in present])).sum())):
        return []
    return [n for n, t in present if not bool(torch.isfinite(t).all())]


class Preconditioner:
    """Damped curvature solve on ``.grad`` for any torch optimizer (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        structure: str = "kfac",
        kind: str = "ggn",
        damping: float | Callable[[int], float] | FixedDamping | LevenbergMarquardt = 1e-3,
        *,
        decay: float | None = 0.95,
        decay_schedule: str = "constant",
        stats_interval: int = 1,
        inverse_interval: int = 1,
        kl_clip: float | None = None,
        stats_fraction: float = 1.0,
        mc_samples: int = 1,
        seed: int | None = None,
        fallback: str = "identity",
        exclude: Sequence[str] = (),
        comm: Any = None,
        **structure_hparams: Any,
    ) -> None:
        for key, v in (("stats_interval", stats_interval), ("inverse_interval", inverse_interval)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
        decay_schedule = DecaySchedule.parse(decay_schedule, "decay_schedule")
        if not (isinstance(stats_fraction, (int, float)) and 0 < stats_fraction <= 1):
            raise ValueError(f"stats_fraction must be in (0, 1], got {stats_fraction!r}")
        self.stats_fraction = float(stats_fraction)
        # data parallel (tensorcurv.distributed): a DDP model is unwrapped; statistics, gradients and
        # loss are reduced across the process group so every rank takes the global-batch step
        model, self.comm = resolve_distributed(model, comm)
        self.model, self.loss = model, as_loss_spec(loss_fn)
        seed = torch.initial_seed() % (2**63) if seed is None else seed
        kw = dict(mc_samples=mc_samples, fallback=fallback, exclude=exclude, seed=seed, **structure_hparams)
        make = Curvature if self.comm is None else partial(DistributedCurvature, comm=self.comm)
        self.curvature = make(model, structure, kind, **kw)
        self.solver = self.curvature if inverse_interval == 1 else make(model, structure, kind, **kw)
        self.damping = damping if isinstance(damping, (FixedDamping, LevenbergMarquardt)) else FixedDamping(damping)
        self.decay, self.decay_schedule, self.kl_clip = decay, decay_schedule, kl_clip
        self.stats_interval, self.inverse_interval = stats_interval, inverse_interval
        self.steps = 0  # completed (preconditioned) steps
        self.skipped = 0
        self.last_skipped = False
        self.info: dict[str, Any] = {}
        #: keep the per-sample statistics of the last capture in ``last_stats`` (exact-curvature refinement)
        self.keep_stats = False
        self.last_stats: dict[str, Any] | None = None
        self._params = self.curvature.params  # listed once (the hot path reads them every step)
        self._names = [n for n, _ in self.curvature.named_params]

    @property
    def params(self) -> list[nn.Parameter]:
        return self.curvature.params

    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return self.curvature.named_params

    def _zero_grad(self) -> None:
        if getattr(self, "_all_params", None) is None:  # listed once (walking the modules costs per step)
            self._all_params = list(self.model.parameters())
        for p in self._all_params:
            p.grad = None

    def _skip(self, what: str) -> None:
        warnings.warn(f"tensorcurv.optim: {what}; step {self.steps} skipped", NonFiniteStepWarning, stacklevel=3)
        self._zero_grad()
        self.damping.on_skip()
        self.skipped += 1
        self.last_skipped = True
        self.info = {"skipped": True, "reason": what, "damping": self.damping.value(self.steps)}

    # ------------------------------------------------------------------ backward
    def backward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Forward + backward on one batch: ``p.grad = ∇L`` (replacing any old ``.grad``);
        statistics captured and fitted when due. Returns the detached loss."""
        self._zero_grad()
        self.last_skipped = False
        self.last_stats = None
        t = self.steps
        stats_due = t % self.stats_interval == 0 or self.curvature.num_updates == 0
        gen = self.curvature.generator if stats_due else None  # only a capture draws MC samples
        gen_state = gen.get_state() if gen is not None else None
        t0 = time.perf_counter()
        loss, res, stats_inputs = self._loss_and_grads(inputs, targets, stats_due)
        any_rank_bad = False
        if self.comm is not None:
            loss, any_rank_bad = sync_step(
                self.comm, self.named_params, loss, inputs.shape[0], self.loss.reduction, res
            )
        bad = self._nonfinite_batch(loss, res, any_rank_bad)
        if bad:
            if gen is not None:
                gen.set_state(cast(Tensor, gen_state))  # taken from gen above
            self._skip(f"non-finite values in {bad} (loss={float(loss):.4g})")
            return loss
        if res is not None:
            decay = scheduled_decay(self.decay, self.decay_schedule, self.curvature.num_updates + 1)
            try:  # e.g. finite statistics whose fitted factors overflow: every block is left unchanged
                self.curvature.fit_capture(stats_inputs, res, decay)
            except NonFiniteError as e:
                if gen is not None:
                    gen.set_state(cast(Tensor, gen_state))  # taken from gen above
                self._skip(str(e))
                return loss
        if res is not None and self.keep_stats:
            self.last_stats = res.stats
        if self.solver is not self.curvature and t % self.inverse_interval == 0:
            self.solver.load_state_dict(self.curvature.state_dict())
        self.info = {
            "skipped": False,
            "loss": float(loss),
            "stats": stats_due,
            "capture_time": self.curvature.last_capture_time if stats_due else 0.0,
            "curvature_fit_time": self.curvature.last_fit_time if stats_due else 0.0,
            "backward_time": time.perf_counter() - t0,
        }
        return loss

    def _loss_and_grads(
        self, inputs: Tensor, targets: Tensor, capture: bool
    ) -> tuple[Tensor, CaptureResult | None, Tensor]:
        """The detached loss with ``p.grad = ∇L``, a statistics capture when ``capture`` (not yet fitted; else
        ``None``) and the inputs it was taken on: the gradient's own capture, or with ``stats_fraction < 1`` a
        plain forward + backward for the gradient and a second capture on the batch's first rows."""
        if capture and self.stats_fraction < 1.0:
            k = max(1, math.ceil(self.stats_fraction * inputs.shape[0]))
            loss, _, _ = self._loss_and_grads(inputs, targets, False)
            return loss, self.curvature.capture(inputs[:k], targets[:k], self.loss), inputs[:k]
        if capture:
            res = self.curvature.capture(inputs, targets, self.loss, accumulate_grad=True)
            return res.loss, res, inputs
        out = self.model(inputs)
        value = self.loss(out.flatten(1) if out.dim() != 2 else out, targets)
        value.backward()
        return value.detach(), None, inputs

    def _nonfinite_batch(self, loss: Tensor, res: CaptureResult | None, any_rank_bad: bool) -> list[str]:
        """What on this batch holds NaN/Inf: the loss, gradients (by parameter), statistics (by layer), or
        those of another rank (``any_rank_bad``); empty if nothing, and then the statistics are marked finite."""
        bad = first_nonfinite([("loss", loss)] + [(n, p.grad) for n, p in self.named_params])  # one reduction
        if res is not None and not bad:  # one fused reduction over every layer's a and g
            layers = first_nonfinite([(name, t) for name, st in res.stats.items() for t in (st.a, st.g)])
            bad += [f"statistics of layer {name!r}" for name in dict.fromkeys(layers)]
            if not layers:  # the fused check passed: LayerStats.check_finite (in the fit) need not rescan
                for st in res.stats.values():
                    st.mark_finite()
        if any_rank_bad and not bad:
            bad.append("statistics on another rank")
        return bad

    # ------------------------------------------------------------------ solve
    def precondition(
        self, lr: float = 1.0, refine: Callable[..., tuple[list[Tensor], dict[str, Any]]] | None = None
    ) -> bool:
        """``p.grad ← ν (Ĉ + λI)^{-1} p.grad`` for every trainable parameter (uncovered ones get the
        curvature's fallback). Returns False (step skipped, grads cleared) if the solve is non-finite.

        ``refine(grads, directions, λ) -> (directions, info)``: applied to the solved directions before
        the KL clip (e.g. :class:`tensorcurv.optim.refine.Refinement`); its info joins :attr:`info`."""
        if self.last_skipped:
            return False
        lam = self.damping.value(self.steps)
        t0 = time.perf_counter()
        params = self._params
        grads_or_none = [p.grad for p in params]
        if any(g is None for g in grads_or_none):
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads_or_none = [p.grad for p in params]
        grads = cast(list[Tensor], grads_or_none)  # every .grad is set now
        gPg = None
        try:
            if self.kl_clip is None and refine is None:  # nothing else needs g: p.grad ← (Ĉ + λI)^{-1} p.grad
                pg = self.solver.solve(grads, damping=lam, out=grads)
            else:
                pg = self.solver.solve(grads, damping=lam)
        except NonFiniteError as e:  # Curvature.solve checks its result
            self._skip(str(e))
            return False
        refine_info: dict[str, Any] = {}
        if refine is not None:
            pg, refine_info = refine(grads, pg, lam)
        if self.kl_clip is not None:
            # ⟨g, Δ⟩ doubles as the finiteness check of Δ: g is finite, so a NaN/Inf entry of Δ makes the sum
            # non-finite (NaN, or ±Inf); only then are the parameters scanned one by one to name them
            gPg = float(torch.stack([torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(pg, grads)]).sum())
        if gPg is None or not math.isfinite(gPg):
            bad = first_nonfinite(list(zip(self._names, pg)))
            if bad:
                self._skip(f"non-finite preconditioned gradient for {bad} (damping={lam:.3g})")
                return False
        nu = 1.0
        if gPg is not None:
            assert self.kl_clip is not None  # gPg is only computed for the KL clip
            vg = lr * lr * gPg
            nu = min(1.0, math.sqrt(self.kl_clip / vg)) if 0 < vg < math.inf else 1.0
            if nu != 1.0:
                torch._foreach_mul_(pg, nu)
        for p, d in zip(params, pg):
            if p.grad is not d:  # (the in-place solve already wrote into p.grad)
                p.grad = d
        info = self.info
        info["damping"], info["kl_scale"], info["solve_time"] = lam, nu, time.perf_counter() - t0
        info.update(refine_info)
        self.steps += 1
        return True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "curvature": self.curvature.state_dict(),
            "solver": None if self.solver is self.curvature else self.solver.state_dict(),
            "damping": self.damping.state_dict(),
            "steps": self.steps,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curvature.load_state_dict(state["curvature"])
        if state["solver"] is not None and self.solver is not self.curvature:
            self.solver.load_state_dict(state["solver"])
        self.damping.load_state_dict(state["damping"])
        self.steps, self.skipped = state["steps"], state["skipped"]
