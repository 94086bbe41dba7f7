"""The structure solver: ``(Ĉ + (μ + λ)I)^{-1} v`` with a tensorcurv structure fitted on the data,
optionally refined by PCG on the exact GGN from the same statistics (:func:`refine_solve`).

``Ĉ`` is fitted on the sum loss of ``B`` of the ``N`` points and rescaled by ``N/B`` (see
:class:`StructureSolver`); the refinement is preconditioned by the structure's own solve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tensorcurv.linalg.krylov import preconditioned_refinement
from tensorcurv.unlearn.ihvp_base import IHVPResult, IHVPSolver

if TYPE_CHECKING:
    from tensorcurv.core.exact import ExactModel
    from tensorcurv.curvature import Curvature


class StructureSolver(IHVPSolver):
    """``(Ĉ + (μ + λ)I)^{-1} v`` with ``Ĉ`` a tensorcurv structure fitted on the data.

    ``Ĉ`` approximates the (block-diagonal) GGN ``C = Σ_i J_iᵀ ∇²_z ℓ_i J_i`` of the *sum* loss: it
    is fitted by ``tensorcurv.Curvature(model, structure, kind, ...)`` on ``fit_batch_size`` random
    points (all if None) with a sum-reduced loss, ``Ĉ_B``, and rescaled by ``N/B``, so

        (N/B · Ĉ_B + δI)^{-1} v = (B/N) · (Ĉ_B + δ B/N · I)^{-1} v,   δ = μ + λ,

    which is what :meth:`Curvature.solve` computes. With the ``dense`` structure on a one-layer
    model this is the exact GGN solve. Parameters outside covered layers use the exact diagonal
    fallback. ``μI`` of the objective is thus added exactly, not approximated.

    ``refine > 0``: structure-preconditioned refinement — PCG (at most ``refine`` iterations, relative
    residual ``refine_tol``) on ``(N/B) C_B + δI`` with ``C_B`` the *exact* GGN applied from the same
    statistics the structure was fitted from (:class:`~tensorcurv.core.exact.ExactModel`; ``coupling``
    ``"full"``: cross-layer GGN of all parameters, ``"block"``: its block diagonal), preconditioned by the
    structure's solve. Exact for logistic regression; fails (``converged=False``) if ``refine_tol`` is
    not reached. Needs every trainable parameter in a covered layer.
    """

    name = "structure"

    def __init__(
        self,
        structure: str = "kfac",
        damping: float = 0.0,
        kind: str = "ggn",
        fit_batch_size: int | None = None,
        seed: int = 0,
        refine: int = 0,
        refine_tol: float = 1e-3,
        coupling: str = "full",
        **hparams: Any,
    ) -> None:
        super().__init__(damping)
        from tensorcurv.core.exact import check_coupling

        if not (isinstance(refine, int) and refine >= 0):
            raise ValueError(f"structure: refine must be an integer >= 0 (max PCG iterations), got {refine!r}")
        if not (isinstance(refine_tol, (int, float)) and refine_tol > 0):
            raise ValueError(f"structure: refine_tol must be > 0, got {refine_tol!r}")
        check_coupling(coupling)
        if refine and kind != "ggn":
            raise ValueError(f"structure: refine needs kind='ggn' statistics (the GGN columns), got kind={kind!r}")
        self.refine, self.refine_tol, self.coupling = refine, float(refine_tol), coupling
        from tensorcurv import structures

        structures.get(structure)  # clear error for an unknown name
        structures.make_hparams(structure, **hparams)
        if fit_batch_size is not None and not (isinstance(fit_batch_size, int) and fit_batch_size >= 1):
            raise ValueError(f"structure: fit_batch_size must be None or an integer >= 1, got {fit_batch_size!r}")
        self.structure, self.kind, self.fit_batch_size, self.seed = structure, kind, fit_batch_size, seed
        self.hparams = hparams
        self.curv: Curvature | None = None
        self.op: ExactModel | None = None

    def _prepare(self) -> None:
        from tensorcurv.curvature import Curvature

        X, y = self.X, self.y
        N = X.shape[0]
        if N == 0:
            raise ValueError("structure: cannot fit a curvature on an empty data set")
        B = N if self.fit_batch_size is None else min(self.fit_batch_size, N)
        if B < N:
            idx = torch.randperm(N, generator=torch.Generator().manual_seed(self.seed))[:B]
            X, y = X[idx], y[idx]
        self.ratio = B / N
        spec = type(self.obj.loss)("sum")
        self.curv = Curvature(
            self.obj.model,
            structure=self.structure,
            kind=self.kind,
            fallback="diagonal",
            seed=self.seed,
            **self.hparams,
        )
        with self.obj.loaded(self.theta):
            res = self.curv.capture(X, y, spec)
            self.curv.fit_capture(X, res)
        self.op = None
        if self.refine:
            from tensorcurv.core.exact import ExactModel, ParamLayout

            self.layout = ParamLayout(self.curv.named_params, self.curv.adapters)
            self.op = ExactModel.from_stats(res.stats, self.coupling)

    def _precond(self, v: Tensor) -> Tensor:
        """``(N/B · Ĉ_B + δI)^{-1} v`` through the structure's own solve."""
        assert self.curv is not None  # fitted by _prepare
        out = self.curv.solve(self.obj.as_list(v), damping=(self.obj.mu + self.damping) * self.ratio)
        return self.obj.flatten(out) * self.ratio

    def matvec(self, v: Tensor) -> Tensor:
        """``(N/B · C_B + δI) v`` with the exact ``C_B`` from the statistics (needs ``refine > 0``)."""
        assert self.op is not None  # built by _prepare when refine > 0
        mats = self.op.mv(self.layout.to_mats(v))
        return self.layout.to_flat(mats) / self.ratio + (self.obj.mu + self.damping) * v

    def _solve(self, v: Tensor) -> IHVPResult:
        x = self._precond(v)
        assert self.curv is not None  # fitted by _prepare
        blocks = {k: dict(b.last_solve) for k, b in self.curv.blocks.items()}
        failed = [k for k, b in blocks.items() if b.get("converged", True) is False]
        msg = f"iterative block solve did not converge in {failed}" if failed else ""
        name = f"structure:{self.structure}"
        if not self.refine:
            return IHVPResult(x, not failed, name, message=msg, info={"blocks": blocks})
        return refine_solve(
            self.matvec,
            self._precond,
            v,
            self.refine,
            self.refine_tol,
            f"{name}+refine",
            {"blocks": blocks, "coupling": self.coupling},
        )

    def describe(self):
        out = {
            **super().describe(),
            "structure": self.structure,
            "kind": self.kind,
            "fit_batch_size": self.fit_batch_size,
            **self.hparams,
        }
        if self.refine:
            out.update(refine=self.refine, refine_tol=self.refine_tol, coupling=self.coupling)
        return out


def refine_solve(
    matvec, precond, v: Tensor, max_iter: int, tol: float, name: str, info: dict, strict: bool = True
) -> IHVPResult:
    """:func:`~tensorcurv.linalg.krylov.preconditioned_refinement` of ``matvec`` by ``precond`` (a structure
    solve) as an IHVPResult that reports iterations, the relative residual and the cosine to the unrefined
    solve (``info["cosine"]``), and fails unless ``‖Ax − v‖ ≤ tol‖v‖`` (``strict=False``: the ``max_iter``-step
    iterate is accepted whatever its residual — every PCG iterate minimizes the quadratic over a larger
    Krylov space than the structure's line-searched step — and fails only on negative curvature or
    non-finite values)."""
    x, it = preconditioned_refinement(matvec, precond, v, max_iter, tol)
    ok = bool(it["converged"]) or (not strict and not it["negative_curvature"] and not it["non_finite"])
    msg = (
        ""
        if ok
        else (
            f"refinement: relative residual {it['residual']:.3g} > tol {tol:g} after "
            f"{it['iterations']} PCG iterations" + (" (negative curvature)" if it["negative_curvature"] else "")
        )
    )
    return IHVPResult(x, ok, name, it["iterations"], it["residual"], msg, info={**info, "cosine": it["cosine"]})
