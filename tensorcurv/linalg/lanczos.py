"""The Lanczos iteration of the package: Ritz values of a symmetric operator, with their residuals.

For a symmetric ``M`` on ``R^d`` and a start ``q_1``, ``k`` steps build an orthonormal basis ``Q_k`` of
the Krylov space ``span{q_1, M q_1, …, M^{k−1} q_1}`` and the tridiagonal ``T_k = Q_kᵀ M Q_k``
(diagonal ``α``, off-diagonal ``β``). Its eigenpairs ``(θ_i, y_i)`` are the Ritz pairs; the residual
of the Ritz vector ``Q_k y_i`` is ``β_k |e_kᵀ y_i|``, and an eigenvalue of ``M`` lies within that
distance of ``θ_i``. The extreme ``θ`` converge first and lie inside the spectrum (estimates, not
bounds). Every new vector is re-orthogonalized against the whole basis (twice, which is enough in
floating point), so there are no spurious copies of converged Ritz values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LanczosResult:
    """Ritz values (ascending, float64) and their residuals ``β_k |e_kᵀ y_i|`` after ``steps`` steps.

    ``exhausted``: the Krylov space is invariant (``β_k`` negligible) or has reached dimension ``d``;
    the Ritz values are then eigenvalues of the operator (up to rounding)."""

    ritz_values: Tensor
    residuals: Tensor
    steps: int
    exhausted: bool


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    *,
    max_iter: int = 200,
    tol: float = 0.0,
    breakdown_tol: float = 1e-14,
) -> LanczosResult:
    """Lanczos with full re-orthogonalization for the symmetric ``matvec`` on vectors shaped like ``start``.

    ``start`` is a flat ``(d,)`` vector or a ``(d, 1)`` column; ``matvec`` maps that shape to itself.
    Runs ``min(max_iter, d)`` steps from ``start`` (normalized here; vectors keep its dtype, ``T_k`` is
    float64). The Ritz values come from ``eigvalsh(T_k)``, the residuals from ``eigh(T_k)``. Stops early when
    ``β_k ≤ breakdown_tol · max|θ|`` (invariant subspace), or, for
    ``tol > 0``, from step 3 on when the residuals of both extreme Ritz pairs are ``≤ tol · max|θ|``.
    """
    d = start.numel()
    steps = min(max_iter, d)
    Q = start.new_zeros(d, steps)  # the basis as columns
    q = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for k in range(steps):
        Q[:, k] = q.reshape(d)
        w = matvec(q)
        alphas.append(float((q * w).sum()))
        basis = Q[:, : k + 1]
        for _ in range(2):
            w = w - basis @ (basis.T @ w)
        beta = float(w.norm())
        T = _tridiagonal(alphas, betas)
        theta, Y = torch.linalg.eigh(T)
        scale = float(theta.abs().max())
        residuals = beta * Y[-1].abs()
        breakdown = beta <= breakdown_tol * max(scale, 1e-300)
        converged = tol > 0 and k >= 2 and float(residuals[[0, -1]].max()) <= tol * scale
        if breakdown or converged or k == steps - 1:
            return LanczosResult(torch.linalg.eigvalsh(T), residuals, k + 1, breakdown or k + 1 == d)
        betas.append(beta)
        q = w / beta
    raise ValueError("lanczos needs max_iter >= 1 and a non-empty start vector")


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


@dataclass
class BidiagonalResult:
    """Leading ``rank`` singular triplets of an operator ``L`` from a Golub–Kahan bidiagonalization:
    ``L ≈ Σ_k sigma_k u_k v_kᵀ`` (``u`` columns of ``U``, ``v`` of ``V``), after ``steps`` steps."""

    sigma: Tensor
    U: Tensor
    V: Tensor
    steps: int


def golub_kahan(
    matvec: Callable[[Tensor], Tensor],
    rmatvec: Callable[[Tensor], Tensor],
    start: Tensor,
    rank: int,
    steps: int,
    breakdown_tol: float = 1e-14,
) -> BidiagonalResult:
    """Golub–Kahan (Lanczos) bidiagonalization of ``L`` with full re-orthogonalization.

    ``matvec: R^p -> R^q`` applies ``L``, ``rmatvec`` applies ``Lᵀ``; ``start`` is a flat ``(p,)`` vector.
    ``k`` steps build orthonormal ``V_k`` (``R^p``), ``U_k`` (``R^q``) and the upper-bidiagonal ``B_k``
    (diagonal ``α``, super-diagonal ``β``) with ``L V_k = U_k B_k``; the SVD ``B_k = P Σ Qᵀ`` gives the
    Ritz triplets ``(σ_i, U_k p_i, V_k q_i)``, exact once the Krylov space is invariant (``β_k``, ``α_k``
    negligible, or ``k = min(p, q)``). Stops after ``steps`` steps or at such a breakdown.
    """
    p = start.numel()
    v = start.reshape(p) / start.norm()
    Vs: list[Tensor] = [v]  # the two orthonormal bases
    Us: list[Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    u = matvec(v)
    for k in range(min(steps, p)):
        for _ in range(2):
            for w in Us:
                u = u - w * (w @ u)
        alpha = float(u.norm())
        if alpha <= breakdown_tol * max([1e-300] + alphas):
            Vs.pop()
            break
        u = u / alpha
        Us.append(u)
        alphas.append(alpha)
        w_v = rmatvec(u) - alpha * Vs[-1]
        for _ in range(2):
            for w in Vs:
                w_v = w_v - w * (w @ w_v)
        beta = float(w_v.norm())
        if k == min(steps, p) - 1 or beta <= breakdown_tol * max(alphas):
            break
        betas.append(beta)
        Vs.append(w_v / beta)
        u = matvec(Vs[-1]) - beta * Us[-1]
    k = len(alphas)
    B = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        B = B + torch.diag(torch.tensor(betas[: k - 1], dtype=torch.float64), 1)
    P, sigma, Qt = torch.linalg.svd(B)
    r = min(rank, k)
    U = torch.stack(Us, 1) @ P[:, :r].to(start.dtype)
    V = torch.stack(Vs[:k], 1) @ Qt[:r].T.to(start.dtype)
    return BidiagonalResult(sigma[:r].to(start.dtype), U, V, k)
