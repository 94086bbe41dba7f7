"""Coarse spaces of ``two_level``: the layer-supported vectors ``Z`` and their products with the exact ``C``.

Every coarse vector lives on one layer (stored per layer as ``(q_l, m, n)``, orthonormal within the layer,
hence ``ZᵀZ = I``). ``M_l^{-1} = (B_l + λI)^{-1}`` is the base block's solve, ``A = C + λI``:

* ``nicolaides``: ``1_{m x n} / sqrt(mn)`` per layer (Nicolaides 1987; Tselepidis et al. 2020);
* ``spectral``: the leading eigenvectors of each base block ``B_l`` (Koroko et al. 2023);
* ``residual``: ``M_l^{-1} r_l`` with ``r = g − A M^{-1} g`` the residual of the fine solve of the
  right-hand side ``g`` (Koroko et al. 2023);
* ``krylov_nicolaides`` / ``krylov_residual`` (the thesis's KRY-NICO / KRY-RESIDU): the per-layer Krylov
  enrichment ``span{z_l, M_l^{-1} z_l}`` of the nicolaides / residual vector ``z_l`` (2 vectors per layer).

The last three depend on ``λ`` or on the right-hand side: they are built at solve time
(:data:`SOLVE_TIME_SPACES`) from the per-sample statistics of the last capture.

Coarse matrix (``coarse_matrix``): ``exact`` ``C0 = Zᵀ C Z = scale Σ_{s,k} p_sk p_skᵀ`` from per-sample
projections ``p_sk[j] = <V_j, G_sk>`` (:func:`coarse_level`, never forming ``C``), or ``kronecker``
(Tselepidis et al. 2020, nicolaides only): the cross-layer K-FAC blocks ``C_ij ≈ A_ij ⊗ G_ij`` with
``A_ij = E[a_i a_jᵀ]``, ``G_ij = scale Σ g_i g_jᵀ``, so ``C0_ij = (1ᵀA_ij1)(1ᵀG_ij1) / sqrt(m_i n_i m_j n_j)``
(:func:`kronecker_coarse_matrix`; positions ``t`` are averaged in ``a`` and summed in ``g``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from tensorcurv.core.options import Option
from tensorcurv.core.stats import LayerStats


class CoarseSpace(Option):
    """The coarse vectors ``Z`` (see the module docstring)."""

    NICOLAIDES = "nicolaides"
    SPECTRAL = "spectral"
    RESIDUAL = "residual"
    KRYLOV_NICOLAIDES = "krylov_nicolaides"
    KRYLOV_RESIDUAL = "krylov_residual"


class CoarseMatrix(Option):
    """``exact`` (``Zᵀ C Z`` from per-sample projections) or ``kronecker`` (cross-layer K-FAC, Tselepidis et al.)."""

    EXACT = "exact"
    KRONECKER = "kronecker"


#: coarse spaces built at solve time (they depend on λ or on the right-hand side)
SOLVE_TIME_SPACES = ("residual", "krylov_nicolaides", "krylov_residual")

Mats = Mapping[str, Tensor]


def check_coarse_options(space: str, k: int, matrix: str, variant: str) -> tuple[str, str]:
    """``(space, matrix)`` parsed; one-line errors for a vector count or combination that does not apply."""
    space = CoarseSpace.parse(space, "two_level.coarse_space")
    matrix = CoarseMatrix.parse(matrix, "two_level.coarse_matrix")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"two_level.coarse_vectors_per_layer must be an integer >= 1, got {k!r}")
    if space != "spectral" and k != 1:
        raise ValueError(
            f"two_level.coarse_vectors_per_layer={k} needs coarse_space='spectral'; "
            f"the {space} coarse space has a fixed number of vectors per layer"
        )
    if matrix == "kronecker" and (space, variant) != ("nicolaides", "additive"):
        raise ValueError(
            "two_level.coarse_matrix='kronecker' (Tselepidis et al.) needs coarse_space='nicolaides' and "
            f"variant='additive', got {space!r}, {variant!r}"
        )
    return space, matrix


def vectors_per_layer(space: str, k: int) -> int:
    """Coarse vectors per layer: ``k`` for ``spectral``, 2 for the Krylov spaces, else 1."""
    return k if space == "spectral" else 2 if space.startswith("krylov") else 1


def nicolaides(shapes: Mapping[str, tuple[int, int]], like: Tensor) -> dict[str, Tensor]:
    """``1_{m x n} / sqrt(mn)`` per layer, as ``(1, m, n)``."""
    return {name: like.new_full((1, m, n), 1.0 / math.sqrt(m * n)) for name, (m, n) in shapes.items()}


#: a vector whose component orthogonal to the previous ones is below this fraction of its norm adds nothing
DEPENDENT_TOL = 1e-8


def orthonormal(vectors: Mats) -> dict[str, Tensor]:
    """Per layer, an orthonormal basis (QR) of the span of the ``(q, m, n)`` vectors. A vector (after the first)
    with less than ``DEPENDENT_TOL`` of its norm outside the span of the earlier ones is dropped (e.g. a Krylov
    vector ``M_l^{-1} z_l`` parallel to ``z_l``), so a layer may keep fewer than ``q`` vectors."""
    out = {}
    for name, V in vectors.items():
        flat = V.reshape(V.shape[0], -1).T  # (mn, q)
        Q, R = torch.linalg.qr(flat)
        keep = R.diagonal().abs() > DEPENDENT_TOL * flat.norm(dim=0)
        keep[0] = True
        out[name] = Q[:, keep].T.reshape(-1, *V.shape[1:])
    return out


def projections(stats: Mapping[str, LayerStats], Z: Mats, chunk: int = 256) -> Tensor:
    """``P`` of shape ``(N K, q)``: ``P[(s,k), j] = <V_j, G_sk> = Σ_t g_sktᵀ V_j a_st``."""
    cols = []
    for name, V in Z.items():
        st = stats[name]
        parts = []
        for i in range(0, st.N, chunk):
            Va = torch.einsum("jmn,stn->stjm", V, st.a[i : i + chunk])
            parts.append(torch.einsum("sktm,stjm->skj", st.g[i : i + chunk], Va))
        cols.append(torch.cat(parts).reshape(-1, V.shape[0]))
    return torch.cat(cols, dim=1)


def times_samples(stats: LayerStats, P: Tensor, chunk: int = 256) -> Tensor:
    """``scale Σ_{s,k} G_sk ⊗ P[(s,k)]`` as ``(q, m, n)``: one layer's rows of ``C Z``."""
    W = P.reshape(stats.N, stats.K, -1)
    out = P.new_zeros(P.shape[1], stats.m, stats.n)
    for i in range(0, stats.N, chunk):
        h = torch.einsum("skj,sktm->jstm", W[i : i + chunk], stats.g[i : i + chunk])
        out += torch.einsum("jstm,stn->jmn", h, stats.a[i : i + chunk])
    return out * stats.scale


def coarse_level(stats: Mapping[str, LayerStats], Z: Mats) -> tuple[Tensor, dict[str, Tensor]]:
    """``(C0 = Zᵀ C Z, U = C Z per layer)`` from per-sample projections."""
    P = projections(stats, Z)
    scale = next(iter(stats.values())).scale
    return (P.T @ P) * scale, {name: times_samples(stats[name], P) for name in Z}


def carried(Z_old: Mats, U_old: Mats, Z: Mats) -> tuple[dict[str, Tensor], Tensor]:
    """The old coarse level on the new vectors (running average): ``U_old = C_old Z_old`` (per layer
    ``(q, m, n)``) mapped through the overlap ``Z_oldᵀ Z`` (block-diagonal: the vectors are layer-supported),
    and ``Zᵀ U`` (symmetrized)."""
    overlap = torch.block_diag(*[torch.einsum("imn,jmn->ij", Z_old[nm], Z[nm]) for nm in Z])  # (q, q)
    U = {nm: torch.einsum("imn,ij->jmn", U_old[nm], overlap) for nm in Z}
    C0 = torch.cat([torch.einsum("jmn,rmn->jr", Z[nm], U[nm]) for nm in Z])
    return U, 0.5 * (C0 + C0.T)


def exact_mv(stats: Mapping[str, LayerStats], X: Mats) -> dict[str, Tensor]:
    """``C x`` per layer for the whole-model vector ``x`` (cross-layer blocks included)."""
    P = projections(stats, {name: M[None] for name, M in X.items()}).sum(1, keepdim=True)
    return {name: times_samples(stats[name], P)[0] for name in X}


def kronecker_coarse_matrix(stats: Mapping[str, LayerStats], names: list[str]) -> Tensor:
    """Tselepidis et al.'s coarse matrix for the nicolaides vectors (module docstring), ``(L, L)``."""
    alpha = torch.stack([stats[nm].a.mean(1).sum(-1) for nm in names], 1)  # (N, L): 1ᵀ â_s
    gamma = torch.stack([stats[nm].g.sum((2, 3)).reshape(-1) for nm in names], 1)  # (N K, L): 1ᵀ ĝ_sk
    ref = stats[names[0]]
    dims = torch.tensor([stats[nm].m * stats[nm].n for nm in names], dtype=alpha.dtype, device=alpha.device)
    A = alpha.T @ alpha / ref.N
    G = gamma.T @ gamma * ref.scale
    return A * G / torch.sqrt(dims[:, None] * dims[None, :])


def solve_time_vectors(
    space: str,
    stats: Mapping[str, LayerStats],
    rhs: Mats,
    fine: Mats,
    base_solve: Callable[[Mats], dict[str, Tensor]],
    damping: float,
) -> dict[str, Tensor]:
    """The coarse vectors of a :data:`SOLVE_TIME_SPACES` space for the right-hand side ``rhs`` whose fine
    solve is ``fine = M^{-1} rhs`` (``base_solve`` applies ``M^{-1}`` per layer), orthonormal per layer."""
    if space in ("residual", "krylov_residual"):
        Cx = exact_mv(stats, fine)
        z = base_solve({nm: rhs[nm] - Cx[nm] - damping * fine[nm] for nm in rhs})  # M^{-1}(g − A M^{-1} g)
    else:
        like = next(iter(fine.values()))
        z = {nm: V[0] for nm, V in nicolaides({nm: (M.shape[0], M.shape[1]) for nm, M in rhs.items()}, like).items()}
    if space.startswith("krylov"):
        z2 = base_solve(z)
        return orthonormal({nm: torch.stack([z[nm], z2[nm]]) for nm in rhs})
    return orthonormal({nm: z[nm][None] for nm in rhs})
