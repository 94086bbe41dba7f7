"""PSD Kronecker-sum fit: ``min ‖C − Σ_{k≤r} A_k ⊗ G_k‖_F`` over ``A_k ⪰ 0, G_k ⪰ 0`` (so ``Ĉ ⪰ 0``).

Column-major vec; ``R`` is the Van Loan rearrangement, ``R(A ⊗ G) = vec(A) vec(G)ᵀ``. Two routes:

* **atoms** (``T = 1``, :func:`fit_samples`; running averages, :func:`recompress_psd`): the factors are
  nonnegative combinations of PSD atoms, ``A_k = Σ_i α_ik P_i``, ``G_k = Σ_i γ_ik Q_i`` with ``α, γ ≥ 0`` —
  PSD by construction, no eigendecomposition. For a Linear layer (``C = scale Σ_s (a_s a_sᵀ) ⊗ Λ_s``,
  ``Λ_s = Σ_k g_sk g_skᵀ``) the atoms are the rank-1 fit ``A_1, G_1`` and ``p`` evenly spaced samples'
  ``a_s a_sᵀ``, ``Λ_s``. With ``Ka = [⟨P_i, P_j⟩]``, ``Kg = [⟨Q_i, Q_j⟩]`` (``p x p``, entrywise ``≥ 0``) and
  ``Z = [⟨C, P_i ⊗ Q_j⟩]`` (``Xa D Xgᵀ``, ``Xa = [⟨P_i, a_s a_sᵀ⟩]``: ``p x N``),

      ‖C − Ĉ‖² = ‖C‖² − 2 tr(αᵀ Z γ) + tr((αᵀ Ka α)(γᵀ Kg γ)),

  minimized alternately over ``α`` and ``γ``: each half-step starts from the clipped unconstrained
  minimizer (``α = max(0, Z γ Q⁻¹)``, ``Q = γᵀ Kg γ``) and takes projected gradient steps with momentum
  (step ``1 / (λ_max(Ka) λ_max(Q))``). Everything after the Grams is ``p x p``.
* **factors** (any ``T``, :func:`fit_factors`): projected HALS on the implicit ``R(C)``. With the other
  terms fixed, ``A_k = Π(R_k vec(G_k)) / ‖G_k‖²`` (``R_k = R(C) − Σ_{j≠k} vec(A_j) vec(G_j)ᵀ``, ``Π`` the
  eigenvalue clip onto the PSD cone) is the exact block minimizer; likewise ``G_k``.

Both start from the rank-1 fit (the leading pair of ``R(C)``, PSD) and add one term at a time: rank
``k`` starts from the rank ``k − 1`` result plus a new term (projected power steps on the residual),
and a stage keeps its best iterate, so the error never increases with ``r``. Stopping rule per stage:
an iteration changes the fitted part ``‖C‖² − ‖C − Ĉ‖²`` by at most ``tol`` times the stage's gain so far
(the fitted part minus that of rank ``k − 1``: the scale of the new term, not of ``‖C‖²``), or ``max_iter``
iterations.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import summed_outer_products
from tensorcurv.linalg.rearrange import RearrangedOperator, sym_quadratic_forms, weighted_covariances

INNER_STEPS = 20  # projected gradient steps per half-step of the atom fit (more per half-step, fewer alternations)
POWER_STEPS = 3  # projected power steps that start each new term


# ---------------------------------------------------------------------------- atoms
# The atom problem is p x p (p ≤ psd_atoms + 1) and takes thousands of tiny products: NumPy float64 (no
# per-op thread synchronisation, unlike torch's intra-op pool on small matrices).
def _lambda_max(K: np.ndarray) -> float:
    """``λ_max`` of a small symmetric matrix."""
    return float(np.linalg.eigvalsh(K)[-1]) if K.size else 0.0


def _pinv_times(K: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, float]:
    """``K⁺ Z`` for a symmetric PSD ``K`` (eigenvalues below ``1e-12 λ_max`` dropped), and ``λ_max(K)``.
    The ``p x p`` eigendecomposition is torch's: NumPy's threaded LAPACK spends most of a 257 x 257 ``eigh``
    synchronising its threads when the cores are shared (seconds instead of milliseconds)."""
    evals_t, V_t = torch.linalg.eigh(torch.from_numpy(K))
    evals, V = evals_t.numpy(), V_t.numpy()
    keep = evals > 1e-12 * max(evals[-1], 1e-300)
    return (V[:, keep] / evals[keep]) @ (V[:, keep].T @ Z), float(evals[-1])


def _half_step(
    Kx: np.ndarray,
    Z: np.ndarray,
    Zs: np.ndarray,
    x: np.ndarray,
    Kx_x: np.ndarray,
    y: np.ndarray,
    Ky_y: np.ndarray,
    lam: float,
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``min_{x ≥ 0} tr(xᵀ Kx x Q) − 2 tr(xᵀ Z y)``, ``Q = yᵀ Ky y``: the clipped unconstrained minimizer
    ``Kx⁺ Z y Q⁺`` (``Zs = Kx⁺ Z``), then ``steps`` projected gradient steps with momentum; the best of
    that, the steps' end point and ``x``, with its product ``Kx x`` (``Kx_x``, ``Ky_y``: the products of
    the arguments). One product with ``Kx`` per step: the momentum point's product is the same linear
    combination of the iterates' products."""
    Q = y.T @ Ky_y
    L = lam * _lambda_max(Q)
    if not L > 0:
        return x, Kx_x
    b = Z @ y
    start = np.maximum(np.linalg.lstsq(Q, (Zs @ y).T, rcond=None)[0].T, 0)
    Kx_start = Kx @ start

    def value(v, Kv):
        return float(((v.T @ Kv) * Q).sum() - 2 * (v * b).sum())

    candidates = sorted(
        ((value(x, Kx_x), 0, x, Kx_x), (value(start, Kx_start), 1, start, Kx_start)), key=lambda c: (c[0], c[1])
    )
    z, Kz = u, Ku = candidates[0][2:]  # projected gradient from the better of the two
    t = 1.0
    for _ in range(steps):
        u_new = np.maximum(z - (Kz @ Q - b) / L, 0)
        Ku_new = Kx @ u_new
        t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        beta = (t - 1) / t_new
        z, Kz = u_new + beta * (u_new - u), Ku_new + beta * (Ku_new - Ku)
        u, Ku, t = u_new, Ku_new, t_new
    best = min(candidates + [(value(u, Ku), 2, u, Ku)], key=lambda c: (c[0], c[1]))
    return best[2], best[3]


def _fitted(Z: np.ndarray, al: np.ndarray, Ka_al: np.ndarray, ga: np.ndarray, Kg_ga: np.ndarray) -> float:
    """``‖C‖² − ‖C − Ĉ‖² = 2 tr(αᵀ Z γ) − tr((αᵀ Ka α)(γᵀ Kg γ))`` from the products ``Ka α``, ``Kg γ``."""
    return float(2 * (al * (Z @ ga)).sum() - ((al.T @ Ka_al) * (ga.T @ Kg_ga)).sum())


def _balance(
    al: np.ndarray, Ka_al: np.ndarray, ga: np.ndarray, Kg_ga: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rescale each pair ``(α_k, γ_k) → (f α_k, γ_k / f)`` to equal norms ``‖A_k‖ = ‖G_k‖`` (and the
    products ``Ka α``, ``Kg γ`` with them)."""
    na = np.sqrt(np.maximum((al * Ka_al).sum(0), 0))
    ng = np.sqrt(np.maximum((ga * Kg_ga).sum(0), 0))
    ok = (na > 0) & (ng > 0)
    f = np.where(ok, np.sqrt(ng / np.maximum(na, np.finfo(na.dtype).tiny)), 1.0)
    return al * f, Ka_al * f, ga / f, Kg_ga / f


def fit_atoms(
    Ka: Tensor,
    Kg: Tensor,
    Z: Tensor,
    rank: int,
    init: tuple[Tensor, Tensor],
    tol: float,
    max_iter: int,
    generator: torch.Generator | None = None,
    info: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Nonnegative ``α, γ`` (``p x rank``, float64) for atom Grams ``Ka, Kg`` and cross matrix ``Z``
    (module doc). ``init`` (``p x k``, ``k ≤ rank``): the first ``k`` terms; the others are added one at a
    time, each stage warm-started from the previous one."""
    device = Ka.device
    np_ = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    Ka, Kg, Z = np_(Ka), np_(Kg), np_(Z)
    da = 1 / np.sqrt(np.maximum(Ka.diagonal(), 1e-300))  # unit-norm atoms (diagonal scaling)
    dg = 1 / np.sqrt(np.maximum(Kg.diagonal(), 1e-300))
    Ka, Kg = da[:, None] * Ka * da, dg[:, None] * Kg * dg
    Z = da[:, None] * Z * dg
    p = Ka.shape[0]
    (Za, lam_a), (Zg, lam_g) = _pinv_times(Ka, Z), _pinv_times(Kg, Z.T)
    al, ga = np_(init[0]) / da[:, None], np_(init[1]) / dg[:, None]
    iters, fitted, k0 = [], _fitted(Z, al, Ka @ al, ga, Kg @ ga), al.shape[1]
    for k in range(k0, rank + 1):
        if k > al.shape[1]:  # new term: projected power steps on the residual cross matrix Z − Ka α γᵀ Kg
            Rm = Z - Ka @ al @ (ga.T @ Kg)
            u = torch.rand(p, 1, generator=generator, dtype=torch.float64).numpy()
            for _ in range(POWER_STEPS):
                v = np.maximum(Rm.T @ u, 0)
                u = np.maximum(Rm @ v, 0)
                u = u / max(u.max(), 1e-300)
            v = np.maximum(Rm.T @ u, 0)
            num, den = (u.T @ Rm @ v).item(), ((u.T @ Ka @ u) * (v.T @ Kg @ v)).item()
            c = num / den if num > 0 and den > 0 else 0.0
            al, ga = np.concatenate([al, u * c], 1), np.concatenate([ga, v], 1)
        base = fitted if k > k0 else 0.0  # the previous stage's fitted part: the stage's gain is measured from it
        Ka_al, Kg_ga = Ka @ al, Kg @ ga
        best = (_fitted(Z, al, Ka_al, ga, Kg_ga), al, ga)
        prev, it = best[0], 0
        while it < max_iter:
            it += 1
            al, Ka_al = _half_step(Ka, Z, Za, al, Ka_al, ga, Kg_ga, lam_a, INNER_STEPS)
            ga, Kg_ga = _half_step(Kg, Z.T, Zg, ga, Kg_ga, al, Ka_al, lam_g, INNER_STEPS)
            al, Ka_al, ga, Kg_ga = _balance(al, Ka_al, ga, Kg_ga)
            fitted = _fitted(Z, al, Ka_al, ga, Kg_ga)
            if fitted > best[0]:
                best = (fitted, al, ga)
            if abs(fitted - prev) <= tol * abs(fitted - base):
                break
            prev = fitted
        fitted, al, ga = best
        iters.append(it)
    if info is not None:
        info.update(psd_iterations=iters, fitted_energy=fitted)
    return torch.from_numpy(al * da[:, None]).to(device), torch.from_numpy(ga * dg[:, None]).to(device)


def _atom_index(N: int, atoms: int) -> Tensor:
    """``min(N, atoms)`` evenly spaced sample indices."""
    p = min(N, atoms)
    return (torch.arange(p) * N) // p


def _atom_gram(X: Tensor, idx: Tensor, norm0: Tensor) -> Tensor:
    """Atom Gram from the cross products ``X`` (``1 + p`` atoms x ``N`` samples; atom 0 the rank-1 factor,
    atom ``1 + j`` the sample ``idx[j]``) and ``‖atom 0‖²``."""
    top = torch.cat([norm0.reshape(1), X[0, idx]])
    return torch.cat([top[None], torch.cat([X[0, idx][:, None], X[1:, idx]], 1)])


def fit_samples(
    stats: LayerStats,
    A1: Tensor,
    G1: Tensor,
    rank: int,
    atoms: int,
    tol: float,
    max_iter: int,
    generator: torch.Generator | None = None,
    info: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """PSD fit of a ``T = 1`` block from the rank-1 fit ``A1 ⊗ G1`` and ``atoms`` of its samples (module
    doc): ``(A (r,n,n), G (r,m,m))``."""
    if stats.T != 1:
        raise ValueError("the sample-space PSD fit needs T = 1 (no weight sharing)")
    a, g = stats.a[:, 0], stats.g[:, :, 0]  # (N, n), (N, K, m)
    N, K, m = g.shape
    idx = _atom_index(N, atoms).to(a.device)
    Xa = torch.cat([sym_quadratic_forms(a, A1)[None], (a[idx] @ a.T).square_()])  # (1 + p, N): ⟨P_i, a_s a_sᵀ⟩
    gq = sym_quadratic_forms(g.reshape(-1, m), G1).reshape(N, K).sum(1)  # ⟨G1, Λ_s⟩
    if K == 1:
        Xg_s = (g[idx, 0] @ g[:, 0].T).square_()
    elif K * m * m + N * m * m < N * K * K * m:  # from the Λ_s themselves
        L = summed_outer_products(g).reshape(N, m * m)
        Xg_s = L[idx] @ L.T
    else:
        Xg_s = (g[idx].reshape(-1, m) @ g.reshape(-1, m).T).square_().reshape(len(idx), K, N, K).sum((1, 3))
    Xg = torch.cat([gq[None], Xg_s])
    Z = (Xa * stats.scale) @ Xg.T
    Ka, Kg = _atom_gram(Xa, idx, A1.pow(2).sum()), _atom_gram(Xg, idx, G1.pow(2).sum())
    e = torch.zeros(Ka.shape[0], 1, dtype=torch.float64)
    e[0] = 1.0
    al, ga = fit_atoms(Ka, Kg, Z, rank, (e, e.clone()), tol, max_iter, generator, info)
    al, ga = al.to(a.dtype), ga.to(a.dtype)
    if info is not None:  # the atoms in use by any term (nonnegative fits are sparse)
        info.update(psd_atoms_used=(int((al[1:] > 0).any(1).sum()), int((ga[1:] > 0).any(1).sum())))
    A = torch.einsum("k,ab->kab", al[0], A1) + _atom_combinations(a[idx, None], al[1:])
    G = torch.einsum("k,ab->kab", ga[0], G1) + _atom_combinations(g[idx], ga[1:])
    return A, G


def _atom_combinations(X: Tensor, w: Tensor) -> Tensor:
    """``Σ_j w[j,k] Σ_i x_ji x_jiᵀ`` for every column ``k`` of the nonnegative ``w`` (``p x r``), ``X`` of shape
    ``(p, K, d)``: ``(r, d, d)``, each term from the atoms it uses only (its column of ``w`` is sparse)."""
    K, d = X.shape[1:]
    terms = []
    for wk in w.mT:
        used = wk > 0
        terms.append(weighted_covariances(X[used].reshape(-1, d), wk[used].repeat_interleave(K)[:, None])[0])
    return torch.stack(terms)


def recompress_psd(
    A: Tensor,
    G: Tensor,
    w: Tensor,
    rank: int,
    init: tuple[Tensor, Tensor],
    tol: float,
    max_iter: int,
    info: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` PSD fit of ``Σ_i w_i A_i ⊗ G_i`` (PSD ``A_i, G_i``, ``w ≥ 0``) on the atoms ``A_i, G_i``
    (``Z = Ka diag(w) Kg``), started from the coefficients ``init``."""
    Fa, Fg = A.flatten(1).double(), G.flatten(1).double()
    Ka, Kg = Fa @ Fa.T, Fg @ Fg.T
    al, ga = fit_atoms(Ka, Kg, Ka @ (w.double()[:, None] * Kg), rank, init, tol, max_iter, info=info)
    return (al.T @ Fa).to(A.dtype).reshape(rank, *A.shape[1:]), (ga.T @ Fg).to(G.dtype).reshape(rank, *G.shape[1:])


# ---------------------------------------------------------------------------- factors (any T)
def psd_part(M: Tensor) -> Tensor:
    """Nearest PSD matrix to ``M`` in Frobenius norm: eigenvalues of ``(M + Mᵀ)/2`` clipped at 0."""
    evals, Q = torch.linalg.eigh(0.5 * (M + M.transpose(-1, -2)))
    return (Q * evals.clamp_min(0).unsqueeze(-2)) @ Q.transpose(-1, -2)


def _inner(X: Tensor, Y: Tensor) -> Tensor:
    """``⟨X_j, Y_k⟩`` for stacks ``(p, d, d)``, ``(q, d, d)``: a ``p x q`` matrix."""
    return X.flatten(1) @ Y.flatten(1).T


def _others(F: Tensor, c: Tensor, j: int) -> Tensor:
    """``Σ_{i≠j} c_i F_i``."""
    c = c.clone()
    c[j] = 0
    return torch.einsum("i,iab->ab", c, F)


def fit_factors(
    stats: LayerStats,
    A1: Tensor,
    G1: Tensor,
    rank: int,
    tol: float,
    max_iter: int,
    generator: torch.Generator | None = None,
    info: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """PSD fit of any block by projected HALS on the implicit ``R(C)``, from the rank-1 fit ``A1 ⊗ G1``:
    ``(A (r,n,n), G (r,m,m))``."""
    op = RearrangedOperator(stats)
    m, dtype = stats.m, stats.a.dtype
    A, G = psd_part(A1)[None], psd_part(G1)[None]
    iters, fitted = [], 2 * float((op.rmatvec(A) * G).sum()) - float((_inner(A, A) * _inner(G, G)).sum())
    for k in range(2, rank + 1):
        X = torch.randn(m, m, generator=generator, dtype=dtype, device="cpu").to(stats.a.device)
        g = X @ X.T
        for _ in range(POWER_STEPS):  # projected power steps on the residual R(C) − Σ vec(A_j) vec(G_j)ᵀ
            a = psd_part(op.matvec(g) - torch.einsum("j,jab->ab", _inner(G, g[None])[:, 0], A))
            g = psd_part(op.rmatvec(a) - torch.einsum("j,jab->ab", _inner(A, a[None])[:, 0], G))
            g = g / torch.linalg.vector_norm(g).clamp_min(torch.finfo(dtype).tiny)
        a = psd_part(op.matvec(g) - torch.einsum("j,jab->ab", _inner(G, g[None])[:, 0], A))
        A, G = torch.cat([A, a[None]]), torch.cat([G, g[None]])
        base = fitted  # the previous stage's fitted part: the stage's gain is measured from it
        best = (2 * float((op.rmatvec(A) * G).sum()) - float((_inner(A, A) * _inner(G, G)).sum()), A.clone(), G.clone())
        prev, it = best[0], 0
        while it < max_iter:
            it += 1
            RG, Gg = op.matvec(G), _inner(G, G)  # G fixed during the A sweep
            for j in range(k):
                if Gg[j, j] > 0:
                    A[j] = psd_part((RG[j] - _others(A, Gg[:, j], j)) / Gg[j, j])
            RA, Aa = op.rmatvec(A), _inner(A, A)
            for j in range(k):
                if Aa[j, j] > 0:
                    G[j] = psd_part((RA[j] - _others(G, Aa[:, j], j)) / Aa[j, j])
            fitted = 2 * float((RA * G).sum()) - float((Aa * _inner(G, G)).sum())
            if fitted > best[0]:
                best = (fitted, A.clone(), G.clone())
            if abs(fitted - prev) <= tol * abs(fitted - base):
                break
            prev = fitted
        fitted, A, G = best
        iters.append(it)
    if info is not None:
        info.update(psd_iterations=iters, fitted_energy=fitted, psd_products=op.products)
    return A, G
