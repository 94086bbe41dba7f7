"""Inverse-Hessian-vector products ``x ≈ (H + λI)^{-1} v`` for the second-order unlearning update.

``H`` is the Hessian (or GGN) of the regularized sum objective of :mod:`.objective` on a data set
(normally the remaining/corrected data ``D̃``) at a point ``θ``; it already contains ``μI``, and
``λ`` (``damping``) is *extra* Tikhonov damping on top (0 by default). Every solver is used as

    solver.prepare(objective, theta, X, y)   # factorize / fit / estimate scale (timed)
    res = solver.solve(v)                    # IHVPResult(x, converged, iterations, residual, ...)

Solvers: ``exact`` (dense matrix, Cholesky), ``cg`` (conjugate gradients on matrix-free products),
``lissa`` (Agarwal et al. 2017 stochastic Neumann recursion) here, and ``structure`` (any tensorcurv
curvature structure fitted on the data: ``(Ĉ + (μ + λ)I)^{-1} v`` per layer block) in
:mod:`.structure_solver`. The interface is :mod:`.ihvp_base`; :func:`build_solver` builds any of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tensorcurv.linalg.krylov import pcg
from tensorcurv.unlearn.ihvp_base import IHVPResult, IHVPSolver
from tensorcurv.unlearn.objective import check_curvature
from tensorcurv.unlearn.structure_solver import StructureSolver


class ExactSolver(IHVPSolver):
    """Dense ``H + λI`` (Hessian via forward-over-reverse, or GGN via per-sample Jacobians), Cholesky.

    Fails (``converged=False``) if the matrix is not positive definite. ``O(P³)``: small models only.
    """

    name = "exact"

    def __init__(self, curvature: str = "hessian", damping: float = 0.0, max_dim: int = 6000) -> None:
        super().__init__(damping)
        check_curvature(curvature)
        self.curvature, self.max_dim = curvature, max_dim

    def _prepare(self) -> None:
        if self.obj.dim > self.max_dim:
            raise ValueError(f"exact: {self.obj.dim} parameters exceed max_dim={self.max_dim}; use cg or a structure")
        build = self.obj.hessian if self.curvature == "hessian" else self.obj.ggn
        self.matrix = build(self.theta, self.X, self.y)
        self.matrix.diagonal().add_(self.damping)
        self.chol, info = torch.linalg.cholesky_ex(self.matrix)
        self.pd = int(info) == 0

    def _solve(self, v: Tensor) -> IHVPResult:
        if not self.pd:
            return IHVPResult(
                torch.full_like(v, math.nan),
                False,
                self.name,
                message=f"{self.curvature} + damping is not positive definite",
            )
        x = torch.cholesky_solve(v.unsqueeze(1), self.chol).squeeze(1)
        r = float((self.matrix @ x - v).norm() / v.norm().clamp_min(1e-300))
        return IHVPResult(x, True, self.name, residual=r, info={"curvature": self.curvature})

    def describe(self):
        return {**super().describe(), "curvature": self.curvature}


class CGSolver(IHVPSolver):
    """Conjugate gradients on matrix-free ``(H + λI) p`` (``torch.func`` JVP/VJP, full data).

    Stops when ``‖r‖ ≤ tol ‖v‖`` (:func:`tensorcurv.linalg.krylov.pcg`); fails on ``max_iter`` without
    convergence or on non-positive curvature ``pᵀ(H + λI)p ≤ 0`` (possible for the Hessian of a
    non-convex model).
    ``preconditioner``: an optional :class:`IHVPSolver` (e.g. a :class:`StructureSolver` with K-FAC),
    prepared on the same data, whose ``solve`` is applied as ``M^{-1} r`` (preconditioned CG; it
    must be symmetric positive definite, which every PSD structure with ``μ + λ > 0`` is).
    """

    name = "cg"

    def __init__(
        self,
        curvature: str = "hessian",
        damping: float = 0.0,
        tol: float = 1e-8,
        max_iter: int = 500,
        preconditioner: IHVPSolver | None = None,
    ) -> None:
        super().__init__(damping)
        check_curvature(curvature)
        if not (tol > 0):
            raise ValueError(f"cg: tol must be > 0, got {tol!r}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"cg: max_iter must be an integer >= 1, got {max_iter!r}")
        self.curvature, self.tol, self.max_iter = curvature, tol, max_iter
        self.preconditioner = preconditioner
        if preconditioner is not None:
            self.name = f"pcg:{getattr(preconditioner, 'structure', preconditioner.name)}"

    def _prepare(self) -> None:
        if self.preconditioner is not None:
            self.preconditioner.prepare(self.obj, self.theta, self.X, self.y)

    def _precond(self, r: Tensor) -> Tensor:
        assert self.preconditioner is not None  # only passed to pcg with a preconditioner
        return self.preconditioner.solve(r).x

    def matvec(self, p: Tensor) -> Tensor:
        mv = self.obj.curvature_vp(self.curvature)
        return mv(self.theta, self.X, self.y, p) + self.damping * p

    def _solve(self, v: Tensor) -> IHVPResult:
        x, info = pcg(
            self.matvec, v, None if self.preconditioner is None else self._precond, tol=self.tol, max_iter=self.max_iter
        )
        it, res = info["iterations"], info["residual"]
        if info["converged"]:
            return IHVPResult(x, True, self.name, it, res)
        if info["negative_curvature"] or info["non_finite"]:
            what = "non-positive" if info["negative_curvature"] else "non-finite"
            return IHVPResult(x, False, self.name, it, res, f"{what} curvature pᵀ(H + λI)p at iteration {it + 1}")
        return IHVPResult(
            x,
            False,
            self.name,
            it,
            res,
            f"no convergence in {it} iterations (relative residual {res:.3g} > tol {self.tol:g})",
        )

    def describe(self):
        out = {**super().describe(), "curvature": self.curvature, "tol": self.tol, "max_iter": self.max_iter}
        if self.preconditioner is not None:
            out["preconditioner"] = self.preconditioner.describe()
        return out


class LiSSASolver(IHVPSolver):
    """LiSSA (Agarwal et al. 2017): ``u_0 = v``, ``u_j = v + (1 − d) u_{j−1} − H_B u_{j−1} / s``.

    ``H_B = (N/B) Σ_{i∈B} ∇²ℓ_i + μI`` on a fresh random minibatch of size ``B`` per step (unbiased
    for ``H``). The fixed point is ``u = s (H + d s I)^{-1} v``, so the estimate ``u_depth / s``
    (averaged over ``repetitions``) approximates ``(H + d s I)^{-1} v`` — LiSSA's damping ``d`` acts as
    Tikhonov damping ``d·s``. Converges when ``s > λ_max(H_B)``; ``scale=None`` picks
    ``s = scale_factor · λ̂_max`` with ``λ̂_max`` the largest power-iteration estimate over
    ``power_batches`` minibatches. The error contracts like ``(1 − d − μ/s)^depth``, so the depth
    needed grows with the condition number ``s/μ``. ``damping`` (λ) is not used by LiSSA itself
    (its damping is ``d``); ``tol``: if given, converged requires the true relative residual
    ``‖(H + d s I)x − v‖/‖v‖ ≤ tol`` (one extra full-data product).
    """

    name = "lissa"

    def __init__(
        self,
        curvature: str = "hessian",
        d: float = 0.0,
        scale: float | None = None,
        depth: int = 1000,
        repetitions: int = 1,
        batch_size: int | None = 128,
        scale_factor: float = 1.5,
        power_iters: int = 20,
        power_batches: int = 5,
        tol: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(0.0)
        check_curvature(curvature)
        if not (0.0 <= d < 1.0):
            raise ValueError(f"lissa: damping d must be in [0, 1), got {d!r}")
        if scale is not None and not (scale > 0):
            raise ValueError(f"lissa: scale must be > 0, got {scale!r}")
        for key, val in (
            ("depth", depth),
            ("repetitions", repetitions),
            ("power_iters", power_iters),
            ("power_batches", power_batches),
        ):
            if not (isinstance(val, int) and val >= 1):
                raise ValueError(f"lissa: {key} must be an integer >= 1, got {val!r}")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"lissa: batch_size must be None or an integer >= 1, got {batch_size!r}")
        if not (scale_factor >= 1.0):
            raise ValueError(f"lissa: scale_factor must be >= 1, got {scale_factor!r}")
        self.curvature, self.d, self.scale_given = curvature, float(d), scale
        self.depth, self.repetitions, self.batch_size = depth, repetitions, batch_size
        self.scale_factor, self.power_iters, self.power_batches = scale_factor, power_iters, power_batches
        self.tol, self.seed = tol, seed

    def _batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
        N = self.X.shape[0]
        if self.batch_size is None or self.batch_size >= N:
            return self.X, self.y, 1.0
        idx = torch.randperm(N, generator=gen)[: self.batch_size]
        return self.X[idx], self.y[idx], N / self.batch_size

    def _mv(self, Xb, yb, w, u):
        return self.obj.curvature_vp(self.curvature)(self.theta, Xb, yb, u, weight=w)

    def _prepare(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)
        if self.scale_given is not None:
            self.scale, self.lambda_max = float(self.scale_given), math.nan
            return
        est = 0.0
        batches = 1 if (self.batch_size is None or self.batch_size >= self.X.shape[0]) else self.power_batches
        for _ in range(batches):
            Xb, yb, w = self._batch(self.gen)
            u = torch.randn(self.theta.shape, generator=self.gen, dtype=self.theta.dtype).to(self.theta.device)
            u = u / u.norm()
            lam = 0.0
            for _ in range(self.power_iters):
                Hu = self._mv(Xb, yb, w, u)
                lam = float(u.dot(Hu))
                u = Hu / Hu.norm().clamp_min(1e-300)
            est = max(est, lam)
        self.lambda_max = est
        self.scale = self.scale_factor * est

    def _solve(self, v: Tensor) -> IHVPResult:
        s, d = self.scale, self.d
        total = torch.zeros_like(v)
        for _ in range(self.repetitions):
            u = v.clone()
            for _ in range(self.depth):
                Xb, yb, w = self._batch(self.gen)
                u = v + (1.0 - d) * u - self._mv(Xb, yb, w, u) / s
                if not bool(torch.isfinite(u).all()):
                    return IHVPResult(
                        u / s, False, self.name, self.depth, message=f"diverged (scale s={s:.4g} too small?)"
                    )
            total = total + u / s
        x = total / self.repetitions
        Hx = self.obj.curvature_vp(self.curvature)(self.theta, self.X, self.y, x) + d * s * x
        res = float((Hx - v).norm() / v.norm().clamp_min(1e-300))
        ok = self.tol is None or res <= self.tol
        msg = "" if ok else f"relative residual {res:.3g} > tol {self.tol:g}"
        return IHVPResult(
            x,
            ok,
            self.name,
            self.depth * self.repetitions,
            res,
            msg,
            info={"scale": s, "lambda_max": self.lambda_max, "effective_damping": d * s},
        )

    def describe(self):
        return {
            **super().describe(),
            "curvature": self.curvature,
            "d": self.d,
            "depth": self.depth,
            "repetitions": self.repetitions,
            "batch_size": self.batch_size,
        }


SOLVERS = {"exact": ExactSolver, "cg": CGSolver, "lissa": LiSSASolver, "structure": StructureSolver}


def build_solver(method: str, **kwargs: Any) -> IHVPSolver:
    """Build an inverse-HVP solver ``v ↦ (H + (μ + λ)I)^{-1} v``.

    Args:
        method: ``exact``, ``cg``, ``lissa``, ``structure``, or a structure name (``kfac``, ``ekfac``, ...)
            as a shortcut for ``structure`` with ``structure=<name>``.
        **kwargs: the solver's options (e.g. ``refine=50, refine_tol=1e-2`` for a structure).

    Returns:
        The solver, to pass to :func:`second_order_update`.

    Raises:
        ValueError: an unknown method (the message lists the valid ones).
    """
    if method in SOLVERS:
        return SOLVERS[method](**kwargs)
    from tensorcurv import structures

    if method in structures.names():
        return StructureSolver(structure=method, **kwargs)
    raise ValueError(
        f"unknown inverse-HVP method {method!r}; valid: {sorted(SOLVERS)} or a structure "
        f"name ({', '.join(structures.names())})"
    )
