"""Algebra of Kronecker sums ``Ĉ = Σ_k A_k ⊗ G_k`` used by :mod:`tensorcurv.structures.kron_sum.structure`.

* :func:`recompress`: the exact rank-r truncation of a Kronecker sum through the ``p x p`` Gram matrices of its
  factors (``⟨A_i, A_j⟩``, ``⟨G_i, G_j⟩``), used for running averages.
* PSD proofs that scale the terms ``k ≥ 2`` by the largest proven ``t ≤ 1`` with ``A_1⊗G_1 + tΣ_{k≥2} A_k⊗G_k ⪰ 0``:
  the sample-space certificate (:func:`sample_psd_scale`: every Gram-route term is a sample-pair combination
  ``Σ_{s,u} ca_sk cg_uk (a_s⊗g_u)(a_s⊗g_u)ᵀ``, so entrywise nonnegative pair weights prove PSD), certified Lanczos
  bounds in the congruence basis of ``A_1 ⊗ G_1`` (:func:`spectral_psd`), and Loewner intervals of recompressed
  factors (:func:`sample_intervals`, :func:`mixed_intervals`, :func:`interval_scale`); for small blocks the
  exact largest ``t`` from one dense eigenvalue problem (:func:`dense_psd_scale`).
  :func:`make_psd` picks among them; docs/structures/kron_sum.md says when.
* :func:`gen_eig`: the generalized symmetric eigenproblem behind rank-2 simultaneous diagonalization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from tensorcurv.linalg.lanczos import lanczos
from tensorcurv.linalg.rearrange import antisymmetric

SAMPLE_PROOF = "sample-space certificate (nonnegative sample-pair weights)"
#: ``psd_proof="auto"``, rank ≥ 3: factors up to this size also get the spectral proof (cheap there), larger t wins
SPECTRAL_MAX_DIM = 256
#: rank ≥ 2, ``psd_proof="auto"``: blocks with ``n·m`` up to this get the exact scale (:func:`dense_psd_scale`,
#: ≈ 0.1 s); an explicit ``psd_proof="dense"`` allows up to ``DENSE_PROOF_EXPLICIT_MAX_DIM`` (≈ 2 s in float64)
DENSE_PROOF_MAX_DIM = 1024
DENSE_PROOF_EXPLICIT_MAX_DIM = 4096
DENSE_PROOF = "dense eigenvalue bound (exact t)"


def _psd_clip(M: Tensor) -> Tensor:
    evals, Q = torch.linalg.eigh(0.5 * (M + M.T))
    return (Q * evals.clamp_min(0)) @ Q.T


def regularize(M: Tensor) -> Tensor:
    """PSD-clip ``M`` and lift its eigenvalues to at least ``ε λ_max`` (``ε = max(1e-10, 1000·eps)``)."""
    evals, Q = torch.linalg.eigh(0.5 * (M + M.T))
    floor = max(1e-10, 1000 * torch.finfo(M.dtype).eps) * max(float(evals.max()), torch.finfo(M.dtype).tiny)
    return (Q * evals.clamp_min(floor)) @ Q.T


def _inv_sqrt_factor(B: Tensor) -> Tensor:
    """``W`` with ``Wᵀ B W = I`` (``W = Q Λ^{-1/2}`` from ``eigh``; robust where Cholesky is not)."""
    evals, Q = torch.linalg.eigh(0.5 * (B + B.T))
    floor = max(1e-10, 1000 * torch.finfo(B.dtype).eps) * max(float(evals.max()), torch.finfo(B.dtype).tiny)
    return Q / evals.clamp_min(floor).sqrt()


def _whiten(B: Tensor, M: Tensor) -> Tensor:
    """``Wᵀ M W`` for ``Wᵀ B W = I`` (same spectrum as ``L^{-1} M L^{-T}``, ``B = L Lᵀ``)."""
    W = _inv_sqrt_factor(B)
    X = W.T @ M @ W
    return 0.5 * (X + X.T)


def gen_eig(B: Tensor, M: Tensor) -> tuple[Tensor, Tensor]:
    """Generalized symmetric eigenproblem ``M x = d B x`` (``B`` PD): ``(d, X)`` with ``XᵀBX = I``,
    ``XᵀMX = diag(d)``."""
    W = _inv_sqrt_factor(B)
    X = W.T @ M @ W
    d, Q = torch.linalg.eigh(0.5 * (X + X.T))
    return d, W @ Q


def _psd_by_cholesky(M: Tensor) -> bool:
    """Cheap certificate: ``M + ε (tr M / d) I`` has a Cholesky factor (``ε = 100·eps``), so the
    eigenvalues of ``M`` are ``≥ −ε tr M / d`` (rounding level); a fraction of one ``eigh``."""
    d = M.shape[0]
    shift = max(100 * torch.finfo(M.dtype).eps * float(torch.trace(M)) / d, torch.finfo(M.dtype).tiny)
    S = 0.5 * (M + M.T)
    S.diagonal().add_(shift)
    return int(torch.linalg.cholesky_ex(S)[1]) == 0


#: sample certificate: point sets of dimension (rank − 1) up to this use convex hulls instead of the N x N product
HULL_MAX_DIM = 4


def _hull_vertices(X: Tensor):
    """Indices of the vertices of the convex hull of the rows of ``X`` (``N x d``, ``d ≤ HULL_MAX_DIM``), or None
    when qhull cannot build it (degenerate, e.g. flat point sets)."""
    if X.shape[1] == 1:
        return torch.stack([X[:, 0].argmin(), X[:, 0].argmax()])
    from scipy.spatial import ConvexHull, QhullError

    try:
        return torch.as_tensor(ConvexHull(X.cpu().numpy()).vertices, device=X.device)
    except (QhullError, ValueError):
        return None


def _min_pair_product_by_hulls(ah: Tensor, gh: Tensor) -> float | None:
    """``min_{s,u} ⟨â_s, ĝ_u⟩`` from the hull vertices of both point sets: the form is bilinear, so for a fixed
    ``u`` it is minimized at a vertex of hull(â), and likewise in ``u`` — O(N log N) instead of the ``N x N``
    product. qhull may drop points within rounding of the hull, so the result is lowered by
    ``1e-10·max‖â‖·max‖ĝ‖`` (a proof up to rounding, like the other routes). None: use the full product."""
    d = ah.shape[1]
    if d > HULL_MAX_DIM or ah.shape[0] <= 4 * (d + 1):
        return None
    va, vg = _hull_vertices(ah), _hull_vertices(gh)
    if va is None or vg is None:
        return None
    slack = 1e-10 * float(ah.norm(dim=1).max() * gh.norm(dim=1).max())
    return float((ah[va] @ gh[vg].T).min()) - slack


def sample_psd_scale(ca: Tensor, cg: Tensor, chunk: int = 1024) -> float | None:
    """Largest ``t ∈ [0, 1]`` with ``P_1 + t Q ≥ 0`` entrywise, ``P_1 = ca_1 cg_1ᵀ``,
    ``Q = Σ_{k≥2} ca_k cg_kᵀ`` (``N x N``, float64, ``chunk`` rows at a time); None if ``P_1`` itself has
    a negative entry. For a Gram-route fit, term ``k`` is ``(Σ_s ca[s,k] a_s a_sᵀ) ⊗ (Σ_u cg[u,k] g_u g_uᵀ)``,
    so ``Σ_k t_k A_k ⊗ G_k = Σ_{s,u} (P_1 + t Q)_{su} (a_s ⊗ g_u)(a_s ⊗ g_u)ᵀ`` (``t_1 = 1``, ``t_k = t``):
    a nonnegative combination of rank-one PSD matrices, hence PSD — a proof at ``O(N² r)`` cost, or
    ``O(N log N)`` from the convex hulls of the normalized weights (rank ≤ ``HULL_MAX_DIM + 1``)."""
    ca, cg = ca.double(), cg.double()
    a1, g1 = ca[:, 0], cg[:, 0]
    if not (((a1 >= 0).all() & (g1 >= 0).all()) | ((a1 <= 0).all() & (g1 <= 0).all())):
        return None
    if ca.shape[1] == 1:
        return 1.0
    if bool((a1 != 0).all() & (g1 != 0).all()):
        # P_1 > 0: 1/t = max_{s,u} (−Q/P_1)_{su} = −min (â ĝᵀ) with â = ca_{:,k≥2}/ca_1, ĝ = cg_{:,k≥2}/cg_1
        ah, gh = ca[:, 1:] / a1[:, None], cg[:, 1:] / g1[:, None]
        worst = _min_pair_product_by_hulls(ah, gh)
        if worst is None:
            worst = min(float((ah[i : i + chunk] @ gh.T).min()) for i in range(0, ca.shape[0], chunk))
        worst = -worst
        return 1.0 if worst <= 1.0 else 1.0 / worst
    t = 1.0
    for i in range(0, ca.shape[0], chunk):  # some P_1 entries are 0: those need Q ≥ 0 there
        P1 = torch.outer(a1[i : i + chunk], g1).abs_()
        Q = ca[i : i + chunk, 1:] @ cg[:, 1:].T
        neg = Q < 0
        if bool(neg.any()):
            t = min(t, float((P1[neg] / Q[neg].neg()).min()))
    return max(t, 0.0)


def make_psd(
    A: Tensor,
    G: Tensor,
    certified: bool = False,
    coefficients: tuple[Tensor, Tensor] | None = None,
    proof: str = "auto",
    inplace: bool = False,
    factor_coefficients: tuple[Tensor, Tensor] | None = None,
    bounds: dict | None = None,
) -> tuple[Tensor, Tensor, float, str]:
    """Clip ``A_1, G_1`` to PSD (+ε regularization for r ≥ 2) and scale terms k ≥ 2 by the
    largest ``t`` that keeps ``Σ A_k ⊗ G_k`` PSD (exact for r = 2, sufficient for r ≥ 3).

    Rank 1: the leading pair of ``R(C)`` is PSD (``R(C)`` maps the PSD cone into itself:
    Perron–Frobenius / Krein–Rutman), so ``A_1, G_1`` are kept as they are when ``certified`` (the fit
    proved them nonnegative combinations of PSD rank-one terms) or when a Cholesky factorization
    proves them PSD up to rounding; only otherwise are they clipped by ``eigh``. Returns
    ``(A, G, t, how)``.

    Rank ≥ 2, blocks with ``n·m ≤ DENSE_PROOF_MAX_DIM`` and ``proof`` ``auto`` (or ``≤ DENSE_PROOF_EXPLICIT_MAX_DIM``
    and ``proof="dense"``): the exact largest ``t`` (:func:`dense_psd_scale`; no ``bounds``). Otherwise, with the
    Gram route's sample ``coefficients`` (``ca (N, r)``, ``cg (N, r)``, see
    :func:`sample_psd_scale`) and ``proof`` ``samples`` (or ``auto`` at rank ≥ 3): ``t`` is the largest
    scale that keeps every sample-pair weight nonnegative, no factorization at all; ``auto`` also runs
    the spectral proof when both factors are at most ``SPECTRAL_MAX_DIM`` wide and keeps the larger
    ``t``; if the leading weights are not one-signed the spectral route runs instead. ``inplace``: the
    sample route may scale ``A[1:]`` in place (the caller owns ``A``); otherwise the inputs are never
    modified. ``bounds`` (a dict, rank ≥ 2): receives ``"A"``, ``"G"`` (``(r−1, 2)``) certified intervals
    ``lo_k F_1 ⪯ F_k ⪯ hi_k F_1`` of the returned factors where the proof gives them (sample weights
    ``factor_coefficients`` via :func:`sample_intervals`, or the spectral bounds): the input of the
    running average's interval certificate."""
    r = A.shape[0]
    t_s = None  # the sample-space scale, computed only where it is used
    if r > 1 and proof in ("auto", "dense"):
        limit = DENSE_PROOF_MAX_DIM if proof == "auto" else DENSE_PROOF_EXPLICIT_MAX_DIM
        t_d = dense_psd_scale(A, G, limit)  # small blocks: the exact scale, no other proof can do better
        if t_d is not None:
            return scale_tail(A, t_d, inplace), G, t_d, DENSE_PROOF
        if proof == "dense":
            raise ValueError(
                f"psd_proof='dense' needs a block with n·m ≤ {DENSE_PROOF_EXPLICIT_MAX_DIM} whose "
                "leading factors are PSD and contain the other terms' ranges; use 'auto'"
            )

    def sample_route(t):
        if bounds is not None and factor_coefficients is not None:
            ia, ig = (sample_intervals(c) for c in factor_coefficients)
            if ia is not None and ig is not None:
                bounds.update(A=ia * min(t, 1.0), G=ig)
        return scale_tail(A, t, inplace), G, t, SAMPLE_PROOF

    if r > 1 and coefficients is not None and (proof == "samples" or (proof == "auto" and r >= 3)):
        t_s = sample_psd_scale(*coefficients)
        if t_s is not None:
            if proof == "auto" and t_s < 1.0 and max(A.shape[-1], G.shape[-1]) <= SPECTRAL_MAX_DIM:
                spec_bounds: dict = {}
                spec = spectral_psd(A, G, bounds=spec_bounds)  # small factors: cheap there, keep the larger t
                if spec[2] > t_s:
                    if bounds is not None:
                        bounds.update(spec_bounds)
                    return spec
            return sample_route(t_s)
    if r == 1:
        if certified:
            return A, G, 1.0, "certificate (one-signed sample weights)"
        if _psd_by_cholesky(A[0]) and _psd_by_cholesky(G[0]):
            return A, G, 1.0, "cholesky certificate"
        A, G = A.clone(), G.clone()
        A[0], G[0] = _psd_clip(A[0]), _psd_clip(G[0])
        return A, G, 1.0, "eigh clip"
    fallback: Callable[[], Any] | None
    if proof != "spectral" and coefficients is not None and t_s is None:

        def fallback():  # the certified spectra failed: the sample-space proof before any eigh
            t = sample_psd_scale(*coefficients)
            return None if t is None else sample_route(t)
    else:
        fallback = None
    return spectral_psd(A, G, fallback, bounds)


def _range_basis(F: Tensor, rel: float) -> tuple[Tensor, Tensor] | None:
    """``(W, P)``: ``Wᵀ F W = I`` on the range of PSD ``F`` (eigenvalues ``> rel·λ_max``) and ``P`` the orthogonal
    projector off that range; ``None`` if ``F`` has an eigenvalue below ``−rel·λ_max`` (not PSD)."""
    ev, U = torch.linalg.eigh(0.5 * (F + F.T))
    top = float(ev.abs().max())
    if top == 0.0 or float(ev.min()) < -rel * top:
        return None
    keep = ev > rel * top
    return U[:, keep] / ev[keep].sqrt(), U[:, ~keep] @ U[:, ~keep].T


def dense_psd_scale(A: Tensor, G: Tensor, max_dim: int = DENSE_PROOF_MAX_DIM) -> float | None:
    """The largest ``t ≤ 1`` with ``A_1⊗G_1 + t Σ_{k≥2} A_k⊗G_k ⪰ 0``, exactly, for blocks with ``n·m ≤ max_dim``.

    In the congruence basis ``W_a, W_g`` of the ranges of ``A_1``, ``G_1`` (PSD, possibly singular: cross-entropy
    GGN factors share the null vector ``1`` of the softmax Hessian, constant input features a null space of ``A``)
    the condition reads ``I + t Q ⪰ 0`` with ``Q = Σ_{k≥2} (W_aᵀA_kW_a) ⊗ (W_gᵀG_kW_g)``, so
    ``t = min(1, −1/λ_min(Q))``; ``λ_min`` is lowered by the ``eigvalsh`` error bound ``d·ε·‖Q‖₂`` (a proof up to
    rounding, like the other routes). ``None`` (use another proof) when the block is larger than ``max_dim``,
    ``A_1`` or ``G_1`` is not PSD, or some term ``k ≥ 2`` has a part outside the ranges of ``A_1``, ``G_1`` above
    rounding (then no ``t > 0`` may exist)."""
    n, m = A.shape[-1], G.shape[-1]
    if A.shape[0] < 2 or n * m > max_dim:
        return None
    Ad, Gd = A.double(), G.double()
    rel = 1e3 * max(n, m) * torch.finfo(A.dtype).eps
    ba, bg = _range_basis(Ad[0], rel), _range_basis(Gd[0], rel)
    if ba is None or bg is None:
        return None
    (Wa, Pa), (Wg, Pg) = ba, bg
    lead = float(torch.linalg.matrix_norm(Ad[0]) * torch.linalg.matrix_norm(Gd[0]))
    outside = sum(
        float(
            torch.linalg.matrix_norm(Pa @ Ak) * torch.linalg.matrix_norm(Gk)
            + torch.linalg.matrix_norm(Ak) * torch.linalg.matrix_norm(Pg @ Gk)
        )
        for Ak, Gk in zip(Ad[1:], Gd[1:])
    )
    if outside > rel * lead:
        return None
    Q = cast(Tensor, sum(torch.kron(Wa.T @ Ak @ Wa, Wg.T @ Gk @ Wg) for Ak, Gk in zip(Ad[1:], Gd[1:])))
    ev = torch.linalg.eigvalsh(0.5 * (Q + Q.T))
    lo = float(ev.min()) - Q.shape[0] * torch.finfo(torch.float64).eps * float(ev.abs().max())
    return 1.0 if lo >= -1.0 else -1.0 / lo


def scale_tail(A: Tensor, t: float, inplace: bool) -> Tensor:
    """``A`` with the terms ``k ≥ 2`` scaled by ``t`` (in place when ``inplace``)."""
    if t >= 1.0:
        return A
    out = A if inplace else A.clone()
    out[1:].mul_(t)
    return out


def spectral_psd(A: Tensor, G: Tensor, fallback=None, bounds: dict | None = None) -> tuple[Tensor, Tensor, float, str]:
    """Rank ≥ 2 shrink by spectral bounds (module docstring): PD ``A_1, G_1`` and the largest
    certified ``t``; ``fallback()`` (if given) replaces the ``eigh`` route when the certificate fails.
    ``bounds`` receives the pencil intervals of the returned factors (symmetric pairs only).
    The inputs are never modified."""
    A, G = A.clone(), G.clone()
    skew = antisymmetric(A[1:]).tolist()
    fast = None if any(skew) else _certified_spectra(A, G)
    if fast is None and fallback is not None:
        done = fallback()
        if done is not None:
            return done
    if fast is not None:
        ea, eg, how = fast
    else:
        how = "eigh (regularize, whiten)"
        A[0], G[0] = regularize(A[0]), regularize(G[0])
        ea = [_spectrum(A[0], Ak, s) for Ak, s in zip(A[1:], skew)]
        eg = [_spectrum(G[0], Gk, s) for Gk, s in zip(G[1:], skew)]
    if len(ea) == 1 and not skew[0]:
        a, g = ea[0], eg[0]
        prods = torch.stack([a.min() * g.max(), a.max() * g.min(), a.min() * g.min(), a.max() * g.max()])
        worst = float(-prods.min())
    else:
        worst = sum(float(a.abs().max() * g.abs().max()) for a, g in zip(ea, eg))
    t = 1.0 if worst <= 1.0 else 1.0 / worst
    if t < 1.0:
        A[1:] = A[1:] * t
    if bounds is not None and not any(skew):
        bounds.update(
            A=torch.stack([torch.stack([e.min(), e.max()]) for e in ea]).double() * t,
            G=torch.stack([torch.stack([e.min(), e.max()]) for e in eg]).double(),
        )
    return A, G, t, how


def _chol(M: Tensor) -> Tensor | None:
    L, info = torch.linalg.cholesky_ex(0.5 * (M + M.T))
    return L if int(info) == 0 else None


def _pd_factor(M: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(M', L)`` with ``M' = L Lᵀ`` PD: ``M`` itself when it has a Cholesky factor, else ``M`` lifted
    by ``ε tr(M)/d`` (``ε = max(1e-10, 1000·eps)``, as :func:`regularize`); None if neither works."""
    L = _chol(M)
    if L is not None:
        return M, L
    d = M.shape[0]
    lift = max(1e-10, 1000 * torch.finfo(M.dtype).eps) * float(torch.trace(M)) / d
    if not lift > 0:
        return None
    M = M + lift * torch.eye(d, dtype=M.dtype, device=M.device)
    L = _chol(M)
    return None if L is None else (M, L)


def _lanczos_extremes(apply, d: int, like: Tensor, steps: int = 40) -> tuple[float, float]:
    """Smallest and largest Ritz values of a symmetric operator on ``(d, 1)`` columns
    (:func:`tensorcurv.linalg.lanczos.lanczos`, ``steps`` steps from a fixed start); they lie inside the
    spectrum, so they are estimates to be certified, not bounds."""
    start = torch.ones(d, 1, dtype=like.dtype, device=like.device) / math.sqrt(d)
    start = start + 1e-3 * torch.arange(d, dtype=like.dtype, device=like.device).reshape(d, 1).cos()
    theta = lanczos(apply, start, max_iter=steps, breakdown_tol=1e-12).ritz_values
    return float(theta[0]), float(theta[-1])


def _pencil_interval(B: Tensor, L: Tensor, M: Tensor) -> tuple[float, float] | None:
    """Certified ``[lo, hi] ⊇`` spectrum of ``L⁻¹ M L⁻ᵀ`` (``B = L Lᵀ``): Lanczos estimates, widened
    until ``hi B − M`` and ``M − lo B`` have Cholesky factors (a proof of the bounds), at most about
    1% wider than the true extremes; None if that fails (caller falls back to ``eigvalsh``)."""

    def apply(v):
        u = torch.linalg.solve_triangular(L.T, v, upper=True)
        return torch.linalg.solve_triangular(L, M @ u, upper=False)

    lo, hi = _lanczos_extremes(apply, B.shape[0], M)
    span = max(hi - lo, abs(hi), abs(lo), torch.finfo(M.dtype).tiny)
    out = []
    for theta, side in ((hi, 1.0), (lo, -1.0)):
        for delta in (1e-4, 1e-3, 1e-2):
            bound = theta + side * (delta * abs(theta) + 1e-6 * span)
            if _chol(side * (bound * B - M)) is not None:
                out.append(bound)
                break
        else:
            return None
    return out[1], out[0]


def _certified_spectra(A: Tensor, G: Tensor):
    """Eigenvalue intervals of the whitened terms ``Ã_k, G̃_k`` (k ≥ 2) from Cholesky factors and
    Lanczos estimates certified by Cholesky (no eigendecomposition); sets the PD ``A_1, G_1``
    (unchanged where already PD). Returns ``(ea, eg, how)`` with 2-vectors ``[lo, hi]``, or None."""
    pa, pg = _pd_factor(A[0]), _pd_factor(G[0])
    if pa is None or pg is None:
        return None
    ea: list[Tensor] = []
    eg: list[Tensor] = []
    for F, (B, L), out in ((A, pa, ea), (G, pg, eg)):
        for M in F[1:]:
            iv = _pencil_interval(B, L, M)
            if iv is None:
                return None
            out.append(torch.tensor(iv, dtype=torch.float64))
    A[0], G[0] = pa[0], pg[0]
    return ea, eg, "cholesky + certified Lanczos bounds"


def _spectrum(B: Tensor, M: Tensor, skew: bool) -> Tensor:
    """Eigenvalues of the whitened ``Wᵀ M W``; for antisymmetric ``M`` its singular values
    (the eigenvalues are ``±i σ``, so the pair's spectrum is ``±σ_i(Ã) σ_j(G̃)``)."""
    if not skew:
        return torch.linalg.eigvalsh(_whiten(B, M))
    W = _inv_sqrt_factor(B)
    return torch.linalg.svdvals(W.T @ M @ W)


def recompress(A: Tensor, G: Tensor, rank: int, info: dict | None = None) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` Kronecker sum of ``Σ_i A_i ⊗ G_i`` (exact truncated SVD via factor Grams).
    ``info["one_signed"]``: rank 1 and each new factor is a one-signed combination of the inputs;
    ``info["coefficients"] = (ca, cg)``: ``A_new_k = Σ_i ca[i,k] A_i``, ``G_new_k = Σ_i cg[i,k] G_i`` for
    the kept terms (zero columns for padding) followed by the discarded ones (their sum is the input sum)."""
    Fa, Fg = A.flatten(1), G.flatten(1)  # Grams and combinations as plain matrix products
    la, Va = torch.linalg.eigh(Fa @ Fa.T)
    lg, Vg = torch.linalg.eigh(Fg @ Fg.T)
    ka = la > la.max() * 1e-14
    kg = lg > lg.max() * 1e-14
    Ca = Va[:, ka] / la[ka].sqrt()  # orthonormal basis: Σ_i Ca[i,p] A_i
    Cg = Vg[:, kg] / lg[kg].sqrt()
    core = (la[ka].sqrt()[:, None] * (Va[:, ka].T @ Vg[:, kg])) * lg[kg].sqrt()[None, :]
    P, S, Qh = torch.linalg.svd(core, full_matrices=False)
    r = min(rank, S.numel())
    ca_all, cg_all = Ca @ P * S, Cg @ Qh.T
    ca, cg = ca_all[:, :r], cg_all[:, :r]
    if info is not None:
        info["one_signed"] = (
            rank == 1 and r == 1 and bool(((ca >= 0).all() | (ca <= 0).all()) & ((cg >= 0).all() | (cg <= 0).all()))
        )
    A_new = (ca.T @ Fa).reshape(r, *A.shape[1:])
    G_new = (cg.T @ Fg).reshape(r, *G.shape[1:])
    sign = torch.where(torch.diagonal(A_new, dim1=-2, dim2=-1).sum(-1) < 0, -1.0, 1.0).to(A.dtype)
    A_new, G_new = A_new.mul_(sign[:, None, None]), G_new.mul_(sign[:, None, None])
    if info is not None:
        z = ca.new_zeros(ca.shape[0], rank - r)
        info["coefficients"] = (
            torch.cat([ca * sign, z, ca_all[:, r:]], 1),
            torch.cat([cg * sign, z, cg_all[:, r:]], 1),
        )
    if r < rank:
        A_new = torch.cat([A_new, A_new.new_zeros(rank - r, *A_new.shape[1:])])
        G_new = torch.cat([G_new, G_new.new_zeros(rank - r, *G_new.shape[1:])])
    return A_new, G_new


def sample_intervals(c: Tensor) -> Tensor | None:
    """``(r−1, 2)`` intervals ``[lo_k, hi_k]`` with ``lo_k F_1 ⪯ F_k ⪯ hi_k F_1`` for factors
    ``F_k = Σ_s c[s,k] S_s`` of PSD ``S_s`` (a Gram-route fit): ``lo_k, hi_k`` = min / max over ``s`` of
    ``c[s,k]/c[s,1]``, since ``F_k − lo_k F_1 = Σ_s (c[s,k] − lo_k c[s,1]) S_s`` has nonnegative weights.
    None unless ``c[:,1] ≥ 0`` with ``c[s,k] = 0`` wherever ``c[s,1] = 0``."""
    c = c.double()
    c1, rest = c[:, 0], c[:, 1:]
    pos = c1 > 0
    if bool((c1 < 0).any()) or not bool(pos.any()) or bool((rest[~pos] != 0).any()):
        return None
    ratio = rest[pos] / c1[pos, None]
    return torch.stack([ratio.min(0).values, ratio.max(0).values], 1)


def interval_part(c: Tensor, iv: Tensor) -> tuple[Tensor, Tensor]:
    """One group's part ``Σ_i c[i,k] F_i`` of the recompressed factors, for inputs with intervals
    ``lo_i X ⪯ F_i ⪯ hi_i X`` (``iv`` rows ``[lo_i, hi_i]``, row 0 ``[1, 1]``: ``F_1 = X``): interval
    arithmetic gives ``L_k X ⪯ part_k ⪯ H_k X``. Returns ``(L, H)`` (``r`` each)."""
    c = c.double()
    lo, hi = c * iv[:, :1], c * iv[:, 1:]
    return torch.minimum(lo, hi).sum(0), torch.maximum(lo, hi).sum(0)


def sample_part(c: Tensor, weights: Tensor) -> tuple[Tensor, Tensor] | None:
    """One group's part for inputs that are sample combinations, ``F_i = Σ_s weights[s,i] S_s``: the part
    is ``Σ_s β[s,k] S_s`` with ``β = weights·c``, so relative to ``X = Σ_s β[s,1] S_s`` it lies in
    ``[min_s β_k/β_1, max_s β_k/β_1]`` exactly (:func:`sample_intervals`; no interval arithmetic).
    Returns ``(L, H)`` with ``L_1 = H_1 = 1``, or None unless ``β[:,1] ≥ 0``."""
    iv = sample_intervals(weights.double() @ c.double())
    if iv is None:
        return None
    one = iv.new_ones(1)
    return torch.cat([one, iv[:, 0]]), torch.cat([one, iv[:, 1]])


def mixed_intervals(parts: list[tuple[Tensor, Tensor]]) -> Tensor | None:
    """Intervals of recompressed factors ``F'_k = Σ_j part_jk`` relative to a PSD reference below ``F'_1``.

    Each group ``j`` bounds its part by multiples of its own PSD ``X_j``: ``L_jk X_j ⪯ part_jk ⪯ H_jk X_j``
    (:func:`interval_part`, :func:`sample_part`). With ``L_j1 > 0`` the reference ``B = Σ_j L_j1 X_j`` is
    PSD and ``B ⪯ F'_1`` (so ``F'_1`` is PSD), and ``l_k B ⪯ F'_k ⪯ h_k B`` with ``l_k = min_j L_jk/L_j1``,
    ``h_k = max_j H_jk/L_j1``. Returns ``(r−1, 2)`` rows ``[l_k, h_k]``, or None when some ``L_j1 ≤ 0``."""
    L = torch.stack([p[0] for p in parts])  # (groups, r)
    H = torch.stack([p[1] for p in parts])
    if not bool((L[:, 0] > 0).all()):
        return None
    return torch.stack([(L[:, 1:] / L[:, :1]).min(0).values, (H[:, 1:] / L[:, :1]).max(0).values], 1)


def negative_mass(ia: Tensor, ig: Tensor) -> float:
    """``Σ_k ν_k``, ``ν_k = max(0, −min`` of the four endpoint products of the pair's intervals``)``."""
    prods = ia[:, :, None] * ig[:, None, :]  # (k, 2, 2)
    return float(prods.flatten(1).min(1).values.neg().clamp_min(0).sum()) if prods.numel() else 0.0


def interval_scale(ia: Tensor, ig: Tensor) -> float:
    """Largest ``t ≤ 1`` that the intervals prove: with ``B_A ⪯ A_1``, ``B_G ⪯ G_1`` and
    ``l_k B ⪯ F_k ⪯ h_k B`` on both sides, ``A_1⊗G_1 + t Σ_k A_k⊗G_k ⪰ (1 − t Σ_k ν_k) B_A⊗B_G`` with
    ``ν_k = max(0, −min`` of the four endpoint products``)`` (the whitened pair's eigenvalues are products
    of eigenvalues in the two intervals), so ``t = min(1, 1/Σ_k ν_k)``."""
    worst = negative_mass(ia, ig)
    return 1.0 if worst <= 1.0 else 1.0 / worst


def relative_to_leading(iv: Tensor) -> Tensor:
    """``[l, h]`` relative to ``B ⪯ F_1`` turned into bounds relative to ``F_1`` itself:
    ``[min(l, 0), max(h, 0)]`` (``h B ⪯ h F_1`` needs ``h ≥ 0``)."""
    return torch.stack([iv[:, 0].clamp_max(0), iv[:, 1].clamp_min(0)], 1)
