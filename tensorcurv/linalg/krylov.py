"""Krylov / subspace helpers: the one conjugate gradient solver, used by structures, studies and unlearning.

* :func:`pcg` — the conjugate gradient solver of the package (preconditioner optional), on tensors of
  any shape (inner product ``⟨X, Y⟩ = Σ X∘Y``), with a *relative* residual stopping rule and an
  iteration/residual report.
* :func:`preconditioned_refinement` — a budget of :func:`pcg` steps on an exact operator,
  preconditioned by an approximate damped solve (a fitted structure), with the cosine of the result
  to that solve's own answer: the one refinement the optimizers and the unlearning solvers share.
* :func:`pcg_or_fallback` — :func:`pcg` that never returns a non-finite or negative-curvature
  answer: it falls back to the (damped, PSD) preconditioner solve and says why (``fallback``).
* :func:`orthonormalize` — orthonormal basis of the columns of a tall matrix (QR, rank-revealing
  enough for subspace iteration).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _solved_info() -> dict[str, Any]:
    """:func:`pcg`'s info before any step: that of ``b = 0``, solved exactly by ``x = 0``."""
    return {
        "iterations": 0,
        "residual": 0.0,
        "residuals": [0.0],
        "converged": True,
        "negative_curvature": False,
        "non_finite": False,
    }


def _pcg_start(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    precond: Callable[[Tensor], Tensor] | None,
    x0: Tensor | None,
    precond_b: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The first iterate ``x`` (``x0`` or 0), residual ``r = b − M x`` and preconditioned residual ``z = P⁻¹ r``."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    if precond is None:
        z = r
    elif x0 is None and precond_b is not None:
        z = precond_b
    else:
        z = precond(r)
    return x, r, z


def _breakdown(pMp: float, rz: float) -> str | None:
    """Why CG cannot take the step: ``non_finite`` (``pᵀ M p`` or ``rᵀ z``), ``negative_curvature``
    (``pᵀ M p ≤ 0``), or None."""
    if not (math.isfinite(pMp) and math.isfinite(rz)):
        return "non_finite"
    if pMp <= 0.0:
        return "negative_curvature"
    return None


def pcg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    precond: Callable[[Tensor], Tensor] | None = None,
    tol: float = 1e-8,
    max_iter: int | None = None,
    x0: Tensor | None = None,
    precond_b: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Solve ``M x = b`` for symmetric positive definite ``M`` by (preconditioned) conjugate gradients.

    ``b`` may have any shape (a flat vector, an ``(m, n)`` matrix, ...): ``matvec`` and ``precond``
    map tensors of that shape to tensors of that shape, and the inner product is ``⟨X, Y⟩ = Σ X∘Y``.
    ``precond`` applies ``P⁻¹ ≈ M⁻¹`` (symmetric positive definite); None: plain CG.
    ``max_iter`` None: ``10·b.numel() + 10``. Stops when ``‖b − M x‖_F ≤ tol · ‖b‖_F``.
    ``precond_b``: ``precond(b)`` when the caller has it already (used only with ``x0`` None, where
    the first residual is ``b``; saves one preconditioner application).

    Returns ``x`` and an info dict: ``iterations`` (completed steps), ``residual`` (relative, of the
    returned ``x``), ``residuals`` (its history, the start included), ``converged``,
    ``negative_curvature`` (``pᵀ M p ≤ 0`` met: ``M`` is not positive definite; the iteration stops)
    and ``non_finite`` (``pᵀ M p``, ``rᵀ z`` or the residual not finite; the last finite iterate is
    returned).
    """
    max_iter = 10 * b.numel() + 10 if max_iter is None else max_iter
    bnorm = float(torch.linalg.norm(b))
    info = _solved_info()
    if bnorm == 0.0:
        return torch.zeros_like(b), info
    x, r, z = _pcg_start(matvec, b, precond, x0, precond_b)
    p = z.clone()
    rz = float((r * z).sum())
    res = float(torch.linalg.norm(r)) / bnorm
    history = [res]
    it = 0
    while res > tol and it < max_iter:
        Mp = matvec(p)
        pMp = float((p * Mp).sum())
        breakdown = _breakdown(pMp, rz)
        if breakdown is not None:
            info[breakdown] = True
            break
        alpha = rz / pMp
        x = x + alpha * p
        r = r - alpha * Mp
        it += 1
        res = float(torch.linalg.norm(r)) / bnorm
        if not math.isfinite(res):
            info["non_finite"] = True
            x = x - alpha * p
            res = history[-1]
            break
        history.append(res)
        if res <= tol or it >= max_iter:  # (no preconditioner application that no step would use)
            break
        z = precond(r) if precond is not None else r
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    info.update(iterations=it, residual=res, residuals=history, converged=res <= tol)
    return x, info


def preconditioned_refinement(
    matvec: Callable[[Tensor], Tensor],
    precond: Callable[[Tensor], Tensor],
    b: Tensor,
    max_iter: int,
    tol: float,
    unrefined: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """At most ``max_iter`` steps of :func:`pcg` on ``M x = b`` from ``x0 = 0``, preconditioned by ``P⁻¹``.

    ``M`` is the exact (damped) operator, ``P⁻¹ ≈ M⁻¹`` an approximate damped solve, e.g. a fitted
    structure's ``(Ĉ + λI)⁻¹`` (symmetric positive definite): Martens' Hessian-free step with the
    structure as preconditioner. The unrefined answer is ``d₀ = P⁻¹ b`` (``unrefined`` when the
    caller has it; then ``P⁻¹`` is applied ``max_iter − 1`` times, otherwise ``max_iter`` times).
    The first iterate is ``d₀`` scaled by the exact line search on ``½xᵀMx − bᵀx``; each further
    one minimizes that quadratic over the next Krylov space ``span{P⁻¹b, (P⁻¹M)P⁻¹b, …}``. Cost:
    ``max_iter`` products with ``M`` at most.

    Returns ``x`` and :func:`pcg`'s info (``iterations``, ``residual`` = ``‖b − Mx‖/‖b‖``,
    ``residuals``, ``converged``, ``negative_curvature``, ``non_finite``) plus ``cosine``:
    ``⟨x, d₀⟩ / (‖x‖ ‖d₀‖)`` (1.0 when either is zero).
    """
    d0 = precond(b) if unrefined is None else unrefined
    x, info = pcg(matvec, b, precond, tol=tol, max_iter=max_iter, precond_b=d0)
    nx, nd = float(torch.linalg.norm(x)), float(torch.linalg.norm(d0))
    info["cosine"] = float((x * d0).sum()) / (nx * nd) if nx > 0 and nd > 0 else 1.0
    return x, info


def pcg_or_fallback(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    precond: Callable[[Tensor], Tensor],
    tol: float,
    max_iter: int,
    damping: float,
) -> tuple[Tensor, dict[str, Any]]:
    """:func:`pcg` on an operator that may be indefinite (a fitted format that is not PSD).

    ``precond`` must be a damped PSD solve ``(P + λI)^{-1}`` (always finite for ``λ > 0``).
    Falls back to ``x = precond(b)`` — a descent direction for a gradient ``b`` — when PCG meets
    negative curvature (``Ĉ + λI`` not PD: its solution would not be one), produces non-finite
    numbers, or stops unconverged with a larger residual than the fallback's. If even
    ``precond(b)`` is not finite the answer is ``b / λ`` (gradient step). ``info["fallback"]`` is
    ``None`` or the reason; ``info["residual"]`` is the relative residual of the returned ``x``.
    """
    x, info = pcg(matvec, b, precond, tol, max_iter)
    reason = None
    if info["non_finite"] or not bool(torch.isfinite(x).all()):
        reason = "non-finite"
    elif info["negative_curvature"]:
        reason = "negative curvature"
    elif not info["converged"]:
        reason = "not converged"
    info["fallback"] = None
    if reason is None:
        return x, info
    y = precond(b)
    if not bool(torch.isfinite(y).all()):
        y, reason = b / damping, reason + "; preconditioner non-finite: gradient step b/λ"
    bnorm = float(torch.linalg.norm(b))
    res_y = float(torch.linalg.norm(b - matvec(y))) / bnorm if bnorm > 0 else 0.0
    if reason == "not converged" and not res_y < info["residual"]:
        return x, info  # the unconverged PCG iterate is the better answer: keep it (reported unconverged)
    info.update(
        fallback=reason,
        pcg_residual=info["residual"],
        residual=res_y if math.isfinite(res_y) else math.inf,
        converged=False,
    )
    return y, info


def orthonormalize(X: Tensor) -> Tensor:
    """Orthonormal basis (columns) of the span of ``X`` (``d x p``), via reduced QR."""
    Q, _ = torch.linalg.qr(X, mode="reduced")
    return Q


# ---------------------------------------------------------------------- Kronecker products of several factors
def mode_apply(mats: list[Tensor], X: Tensor) -> Tensor:
    """``(F_1 ⊗ … ⊗ F_D) vec(X)`` as a tensor, for ``X`` of shape ``(d_1, …, d_D)`` (row-major
    ``vec``, first mode slowest: the ``torch.kron(F_1, F_2, …)`` ordering). ``None`` = identity."""
    for k, F in enumerate(mats):
        if F is not None:
            X = torch.movedim(torch.tensordot(F, X, dims=([1], [k])), 0, k)
    return X


def kron_eig_solve(
    evals: list[Tensor], evecs: list[Tensor], X: Tensor, damping: float, floor: float | None = 0.0
) -> Tensor:
    """``(⊗_k Q_k Λ_k Q_kᵀ + λI)^{-1} vec(X)`` from per-factor eigendecompositions (exact).

    The eigenvalues of the product are ``Π_k λ_k``; with ``floor`` not None they are clamped at
    ``floor`` first (a PSD preconditioner), otherwise used as they are.
    """
    Y = mode_apply([Q.T for Q in evecs], X)
    lam = evals[0]
    for e in evals[1:]:
        lam = lam.unsqueeze(-1) * e
    if floor is not None:
        lam = lam.clamp_min(floor)
    return mode_apply(evecs, Y / (lam + damping))
