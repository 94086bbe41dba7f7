"""How close to the exact GGN must a structure be for a faithful unlearning step?

For a one-layer model (multinomial logistic regression, where the GGN is the Hessian) and one request
``Z → Z̃``, the second-order update ``θ = θ* − (Ĉ + μI)⁻¹ Δg`` is computed with every approximation
``Ĉ`` below *solved exactly* (a dense solve of the ``mn x mn`` matrix ``Ĉ + μI``), so that what is
measured is the approximation, not an iterative solver:

* ``kron_sum(r)``: the rank-``r`` Kronecker-sum fit of the GGN block, ``r = 1 … rank R(C)``, Eckart–Young
  (``psd="none"``) and made PSD (``psd="shrink"``, the default);
* K-FAC deflated by ``k`` generalized eigenvectors: with ``(C + μI) v = λ (K + μI) v``, ``Vᵀ(K + μI)V = I``,
  ``(Ĉ + μI)⁻¹ = (K + μI)⁻¹ + V_k (Λ_k⁻¹ − I) V_kᵀ`` for the ``k`` pairs of largest ``|log λ|`` — exact on their
  span, K-FAC elsewhere (``k = 0``: K-FAC, ``k = mn``: the exact step).

Fidelity is ``‖θ − θ_r‖ / ‖θ* − θ_r‖`` against retraining ``θ_r``, next to the exact Newton step and LiSSA
(the benchmark's settings). ``scripts/unlearn_fidelity.py`` runs it on the digits scenarios.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tensorcurv import structures
from tensorcurv.linalg import unvec, vec
from tensorcurv.unlearn.cache import CurvatureCache
from tensorcurv.unlearn.updates import AffectedSet


def _single_block(cache: CurvatureCache, affected: AffectedSet):
    stats, _ = cache.corrected_stats(affected)
    if len(stats) != 1:
        raise ValueError(f"the fidelity study needs a one-layer model (one GGN block), got {len(stats)} blocks")
    ((name, st),) = stats.items()
    return name, st


def deflated_kfac_solves(C: Tensor, K: Tensor, mu: float, b: Tensor, ks: list[int]) -> dict[int, Tensor]:
    """``x_k = ((K+μI)⁻¹ + V_k (Λ_k⁻¹ − I) V_kᵀ) b`` for every ``k`` in ``ks`` (dense ``C``, ``K`` of size d x d)."""
    d = C.shape[0]
    eye = torch.eye(d, dtype=C.dtype, device=C.device)
    ek, Qk = torch.linalg.eigh(0.5 * (K + K.T) + mu * eye)
    S = Qk @ torch.diag(ek.rsqrt()) @ Qk.T  # (K + μI)^{-1/2}
    lam, U = torch.linalg.eigh(S @ (C + mu * eye) @ S)
    V = S @ U  # Vᵀ(K + μI)V = I, Vᵀ(C + μI)V = diag(λ)
    order = torch.argsort(lam.log().abs(), descending=True)
    base = S @ (S @ b)
    out = {}
    for k in ks:
        if not 0 <= k <= d:
            raise ValueError(f"deflation size k={k} must be in [0, {d}]")
        idx = order[:k]
        out[k] = base + V[:, idx] @ ((1.0 / lam[idx] - 1.0) * (V[:, idx].T @ b))
    return out


def structure_fidelity(
    cache: CurvatureCache, affected: AffectedSet, theta_retrain: Tensor, *, ranks: list[int], deflation: list[int]
) -> list[dict[str, Any]]:
    """Rows ``{family, size, rel_dist, solve_error}`` for one request served from ``cache`` (fitted at θ*):
    ``family`` in ``exact``, ``kron_sum psd=none``, ``kron_sum psd=shrink``, ``kfac deflated``; ``solve_error``
    is ``‖x − x_exact‖ / ‖x_exact‖`` with ``x_exact = (C + μI)⁻¹ Δg``."""
    name, st = _single_block(cache, affected)
    mu = cache.obj.mu + cache.damping
    dg_mat = cache.layout.to_mats(cache.gradient_difference(affected))[name]
    b = vec(dg_mat)
    G = vec(st.per_sample_grads())  # the exact block C = scale Σ vec(G_sk) vec(G_sk)ᵀ
    C = (G.T @ G) * st.scale
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    x_exact = torch.linalg.solve(C + mu * eye, b)
    theta_star = cache.theta_star
    base = (theta_star - theta_retrain).norm()

    def row(family: str, size: int, x: Tensor) -> dict[str, Any]:
        theta = theta_star - cache.layout.to_flat({name: unvec(x, *dg_mat.shape)})
        return {
            "family": family,
            "size": size,
            "rel_dist": float((theta - theta_retrain).norm() / base),
            "solve_error": float((x - x_exact).norm() / x_exact.norm()),
        }

    rows = [row("exact", C.shape[0], x_exact)]
    max_rank = min(st.n * (st.n + 1) // 2, st.m * (st.m + 1) // 2)  # symmetric factors: rank of R(C) at most this
    for r in ranks:
        if not 1 <= r <= max_rank:
            raise ValueError(f"rank {r} outside [1, {max_rank}] for a block of shape {st.shape}")
        for psd in ("none", "shrink"):
            block = structures.create("kron_sum", st.shape, rank=r, psd=psd, tol=1e-10).fit(st)
            rows.append(row(f"kron_sum psd={psd}", r, torch.linalg.solve(block.to_dense() + mu * eye, b)))
    K = structures.create("kfac", st.shape).fit(st).to_dense()
    for k, x in deflated_kfac_solves(C, K, mu, b, deflation).items():
        rows.append(row("kfac deflated", k, x))
    return rows
