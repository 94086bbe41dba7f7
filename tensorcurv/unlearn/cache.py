"""Curvature statistics captured once at ``θ*`` and served to many unlearning requests (amortized).

A model owner captures the per-sample GGN factors of all of ``D`` at ``θ*`` once —
``CurvatureCache(model, X, y, mu=...)``, whose cost is ``oneoff_time`` (capture + structure fit +
the structure's factorization for the damping ``μ + λ``) —
and answers each request ``Z → Z̃`` with :meth:`CurvatureCache.update`, whose cost is the result's
``time``. The statistics of ``D̃`` at ``θ*`` follow from those of ``D`` without touching other rows:

* relabel: nothing changes — the GGN columns ``J_sᵀ S_s`` depend on inputs and ``θ*``, not on labels;
* removal: the rows of ``Z`` are dropped;
* feature change: the rows of ``Z`` are recaptured on the new features (``|Z̃|`` points).

Each block gives the block of ``D̃`` through ``Structure.downdate``: K-FAC exactly (``Σ aaᵀ ← Σ aaᵀ −
Σ_Z aaᵀ + Σ_Z̃ ããᵀ``, likewise for ``g``; only these ``|Z| + |Z̃|`` rows are read), and so is
``dense`` (``C ← C − C_Z + C_Z̃``; its eigendecomposition is then recomputed); other structures
are refit on the updated rows. For a relabel every structure —
and the dense block's cached eigendecomposition — is reused as is. ``Δg`` comes from the
same statistics in closed form (:func:`~tensorcurv.unlearn.stats_ggn.output_coefficients`), and the
inverse-HVP is the structure-preconditioned refinement on the exact GGN of ``D̃`` (``refine`` PCG
iterations on :class:`~tensorcurv.core.exact.ExactModel`; ``refine=0``: the structure alone;
``refine_strict=False``: accept the ``refine``-step iterate without reaching ``refine_tol``).
``refine_operator="linearized"``: the same exact GGN of ``D̃`` from the network linearized at ``θ*`` on ``D``
once (:class:`~tensorcurv.unlearn.linearized_ggn.LinearizedGGN`, one-off; removed rows weighted 0, rows with
new features replaced by a product on ``Z̃``), a product then costing about two forward passes — cheaper than
the per-sample statistics where layers see many positions (convolutions).
The result equals the non-cached ``second_order_update`` with ``StructureSolver(..., refine=...)``.
A request is relative to ``(D, θ*)``; after applying one, build a new cache for the next.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from tensorcurv import structures
from tensorcurv.core.capture import capture
from tensorcurv.core.exact import ExactModel, ParamLayout, check_coupling
from tensorcurv.core.stats import LayerStats
from tensorcurv.unlearn.ihvp_base import IHVPResult
from tensorcurv.unlearn.linearized_ggn import LinearizedGGN
from tensorcurv.unlearn.objective import Objective
from tensorcurv.unlearn.stats_ggn import output_coefficients, stats_gradient
from tensorcurv.unlearn.structure_solver import refine_solve
from tensorcurv.unlearn.updates import AffectedSet, UpdateResult, finish_update

REFINE_OPERATORS = ("stats", "linearized")  # the exact GGN of the refinement: ExactModel or LinearizedGGN


def _rows(st: LayerStats, idx: Tensor) -> LayerStats:
    return LayerStats(a=st.a[idx], g=st.g[idx], scale=st.scale, name=st.name)


class CurvatureCache:
    """GGN statistics of ``D`` at the model's current parameters ``θ*`` plus the fitted structure."""

    def __init__(
        self,
        model: nn.Module,
        X: Tensor,
        y: Tensor,
        *,
        loss="cross_entropy",
        mu: float = 0.0,
        structure: str = "kfac",
        damping: float = 0.0,
        refine: int = 50,
        refine_tol: float = 1e-3,
        coupling: str = "full",
        refine_strict: bool = True,
        refine_operator: str = "stats",
        **hparams: Any,
    ) -> None:
        from tensorcurv.curvature import Curvature

        t0, c0 = time.perf_counter(), time.process_time()
        self.obj = Objective(model, loss, mu)
        if not (isinstance(refine, int) and refine >= 0):
            raise ValueError(f"cache: refine must be an integer >= 0, got {refine!r}")
        check_coupling(coupling)
        if refine_operator not in REFINE_OPERATORS:
            raise ValueError(f"cache: unknown refine_operator {refine_operator!r}; valid: {list(REFINE_OPERATORS)}")
        self.refine_operator = refine_operator
        self.structure, self.damping, self.refine, self.refine_tol, self.coupling = (
            structure,
            float(damping),
            refine,
            float(refine_tol),
            coupling,
        )
        self.hparams, self.refine_strict = hparams, bool(refine_strict)
        self.X, self.y = X, y
        self.theta_star = self.obj.theta()
        self.spec = type(self.obj.loss)("sum")
        self.curv = Curvature(model, structure=structure, kind="ggn", **hparams)
        if not self.curv.model_structure.block_diagonal:
            raise ValueError(
                f"cache: structure {structure!r} couples the layers; the cache serves "
                "block-diagonal structures only (per-layer blocks)"
            )
        self.layout = ParamLayout(self.curv.named_params, self.curv.adapters)
        res = self.curv.capture(X, y, self.spec)
        self.stats, self.outputs = res.stats, res.outputs.flatten(1)
        self.capture_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        self.curv.fit_stats(self.stats)
        delta = self.obj.mu + self.damping
        for name, block in self.curv.blocks.items():  # factorize now (eigh, ...): a relabel reuses it as is
            block.solve(
                torch.zeros(block.shape, dtype=self.stats[name].a.dtype, device=self.stats[name].a.device), delta
            )
        self.linearized = (
            LinearizedGGN(self.obj, self.theta_star, X) if refine and refine_operator == "linearized" else None
        )
        self.fit_time = time.perf_counter() - t1
        self.oneoff_time = time.perf_counter() - t0
        self.oneoff_cpu_time = time.process_time() - c0

    # ------------------------------------------------------------------ rows of D̃
    def _recapture(self, Xz: Tensor, yz: Tensor) -> tuple[dict[str, LayerStats], Tensor]:
        res = capture(self.obj.model, self.curv.adapters, Xz, yz, self.spec, "ggn")
        return res.stats, res.outputs.flatten(1)

    def corrected_stats(self, affected: AffectedSet) -> tuple[dict[str, LayerStats], dict[str, LayerStats] | None]:
        """``(stats of D̃, stats of the Z̃ rows or None when they equal Z's rows)`` at ``θ*``; rows in
        the order of ``AffectedSet.apply``. Relabel returns the cached objects themselves."""
        affected.check(self.X, self.y)
        idx = affected.indices
        if affected.is_removal:
            keep = torch.ones(self.X.shape[0], dtype=torch.bool)
            keep[idx] = False
            return {k: _rows(st, keep) for k, st in self.stats.items()}, None
        if affected.X_new is None:
            return self.stats, None
        new, _ = self._recapture(affected.X_new.to(self.X.dtype), affected.corrected(self.X, self.y)[1])
        out = {}
        for k, st in self.stats.items():
            a, g = st.a.clone(), st.g.clone()
            a[idx], g[idx] = new[k].a, new[k].g
            out[k] = LayerStats(a=a, g=g, scale=st.scale, name=st.name)
        return out, new

    # ------------------------------------------------------------------ Δg
    def gradient_difference(self, affected: AffectedSet) -> Tensor:
        """``Δg = Σ_Z̃ ∇ℓ − Σ_Z ∇ℓ`` at ``θ*`` from the cached rows (closed form, see ``stats_ggn``);
        ``torch.func`` only where no closed form applies."""
        idx = affected.indices
        Zx, Zy = affected.original(self.X, self.y)
        Zx_new, Zy_new = affected.corrected(self.X, self.y)
        old_rows = {k: _rows(st, idx) for k, st in self.stats.items()}
        try:
            c_old = output_coefficients(self.obj.loss, self.outputs[idx], Zy)
            if affected.is_removal:
                mats = stats_gradient(old_rows, -c_old)
            elif affected.X_new is None:  # same rows, new labels: one pass with the coefficient difference
                mats = stats_gradient(old_rows, output_coefficients(self.obj.loss, self.outputs[idx], Zy_new) - c_old)
            else:
                new_rows, out_new = self._recapture(Zx_new, Zy_new)
                g_new = stats_gradient(new_rows, output_coefficients(self.obj.loss, out_new, Zy_new))
                g_old = stats_gradient(old_rows, c_old)
                mats = {k: g_new[k] - g_old[k] for k in g_old}
            return self.layout.to_flat(mats)
        except ValueError:
            th = self.theta_star
            return self.obj.data_grad(th, Zx_new, Zy_new) - self.obj.data_grad(th, Zx, Zy)

    # ------------------------------------------------------------------ structure of D̃
    def corrected_blocks(
        self, affected: AffectedSet, stats: dict[str, LayerStats], new_rows: dict[str, LayerStats] | None
    ) -> dict[str, structures.Structure]:
        """The structure of ``D̃``: the cached blocks (relabel), else each block's ``downdate`` (exact
        for structures additive in the samples, a refit on the rows of ``D̃`` otherwise)."""
        if stats is self.stats:
            return self.curv.blocks
        return {
            k: block.downdate(
                self.stats[k],
                _rows(self.stats[k], affected.indices),
                None if new_rows is None else new_rows[k],
                stats[k],
            )
            for k, block in self.curv.blocks.items()
        }

    # ------------------------------------------------------------------ the exact GGN of D̃ (refinement)
    def _ggn_of_corrected(self, affected: AffectedSet, stats: dict[str, LayerStats], delta: float):
        """``v ↦ (G(D̃) + δI) v`` at ``θ*``: from the statistics of ``D̃`` (``ExactModel``), or from the
        linearization of ``D`` (removed and re-featured rows weighted 0, plus ``G(Z̃)`` for new features)."""
        if self.linearized is None:
            op = ExactModel.from_stats(stats, self.coupling)
            return lambda v: self.layout.to_flat(op.mv(self.layout.to_mats(v))) + delta * v
        lin, weights = self.linearized, None
        if affected.is_removal or affected.X_new is not None:
            weights = torch.ones(self.X.shape[0], dtype=self.X.dtype, device=self.X.device)
            weights[affected.indices.to(self.X.device)] = 0.0
        if affected.X_new is None:
            return lambda v: lin.mv(v, weights) + delta * v
        Zx, Zy = affected.corrected(self.X, self.y)
        mu, th = self.obj.mu, self.theta_star
        return lambda v: lin.mv(v, weights) + (self.obj.ggn_vp(th, Zx, Zy, v) - mu * v) + delta * v

    # ------------------------------------------------------------------ the request
    def update(self, affected: AffectedSet, *, tau: float = 1.0, inplace: bool = False) -> UpdateResult:
        """``θ = θ* − τ (G(D̃) + (μ + λ)I)^{-1} Δg`` from the cache; the model is written only if
        ``inplace`` and the solve succeeded. ``time`` is the per-request cost (no capture of ``D``)."""
        t0 = time.perf_counter()
        affected.check(self.X, self.y)
        dg = self.gradient_difference(affected)
        t1 = time.perf_counter()
        stats, new_rows = self.corrected_stats(affected)
        blocks = self.corrected_blocks(affected, stats, new_rows)
        t2 = time.perf_counter()
        delta = self.obj.mu + self.damping

        def precond(v: Tensor) -> Tensor:
            mats = self.layout.to_mats(v)
            return self.layout.to_flat({k: blocks[k].solve(M, delta) for k, M in mats.items()})

        name = f"cached:{self.structure}"
        if self.refine:
            matvec = self._ggn_of_corrected(affected, stats, delta)
            r = refine_solve(
                matvec,
                precond,
                dg,
                self.refine,
                self.refine_tol,
                f"{name}+refine",
                {"coupling": self.coupling},
                self.refine_strict,
            )
        else:
            r = IHVPResult(precond(dg), True, name)
        t3 = time.perf_counter()
        r.time = t3 - t2
        times = {"grad_diff": t1 - t0, "prepare": t2 - t1, "solve": t3 - t2}
        info = {
            "oneoff_time": self.oneoff_time,
            "oneoff_cpu_time": self.oneoff_cpu_time,
            "capture_time": self.capture_time,
            "fit_time": self.fit_time,
        }
        if not r.converged:
            res = UpdateResult(
                r.method,
                f"ihvp not converged: {r.message}",
                self.theta_star.clone(),
                self.theta_star,
                tau=tau,
                times=times,
                ihvp=[r],
                info=info,
            )
            return finish_update(self.obj, res, False, t0)
        if not (isinstance(tau, (int, float)) and math.isfinite(tau)):
            raise ValueError(f"tau must be a finite number, got {tau!r}")
        res = UpdateResult(
            r.method, "ok", self.theta_star - tau * r.x, self.theta_star, tau=tau, times=times, ihvp=[r], info=info
        )
        return finish_update(self.obj, res, inplace, t0)
