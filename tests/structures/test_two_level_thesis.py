"""The thesis's two-level coarse spaces (Koroko et al. 2023) against dense formulas built here.

For a right-hand side ``g``: ``x_f = M⁻¹g`` (``M = B + λI``, ``B`` the dense block-diagonal base), ``A = C + λI``
with the dense whole-model ``C`` (torch.func, ``test_two_level.fitted``), ``Q = Z (ZᵀAZ)⁻¹ Zᵀ``:

* ``residual``: ``Z`` per layer spans ``(M⁻¹ r)_l``, ``r = g − A x_f``;
* ``krylov_nicolaides`` / ``krylov_residual``: per layer ``span{z_l, (M⁻¹ z)_l}`` with ``z`` nicolaides / residual;
* ``multiplicative``: ``x = x_f + Q (g − A x_f)``;
* Tselepidis et al.: nicolaides, additive, ``C0_ij = 1ᵀ(A_ij ⊗ G_ij)1 / sqrt(d_i d_j)`` from the cross-layer
  K-FAC factors.

``Q`` depends only on the span of each layer's vectors, so the reference orthonormalizes freely. Tolerance as in
``test_two_level`` (1e-10, float64, λ = 0.1·tr(C)/D).
"""

from __future__ import annotations

import pytest
import torch

from test_two_level import RTOL, damping_for, data, dense_B, fitted, flat_solve, net, nicolaides_R0, rel


def _blocks(v, sizes):
    out, o = [], 0
    for s in sizes:
        out.append(v[o : o + s])
        o += s
    return out


def _layer_basis(vectors_per_layer, sizes):
    """``Z`` (``D x q``): an orthonormal basis of each layer's vectors (list of ``(d_l,)`` tensors; a vector
    parallel to the first to 1e-8 is left out: the output layer's ``M⁻¹1 ∥ 1`` under cross-entropy, where the
    K-FAC factor ``G`` has ``1`` in its kernel), placed on the layer's rows."""
    cols, o = [], 0
    for vecs, s in zip(vectors_per_layer, sizes):
        U, S, _ = torch.linalg.svd(torch.stack([v / v.norm() for v in vecs], 1), full_matrices=False)
        Q = U[:, S > 1e-8 * S[0]]
        Z = torch.zeros(sum(sizes), Q.shape[1], dtype=Q.dtype)
        Z[o : o + s] = Q
        cols.append(Z)
        o += s
    return torch.cat(cols, 1)


def _reference(C, B, g, lam, space, sizes):
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    A, Minv = C + lam * eye, torch.linalg.inv(B + lam * eye)
    x_f = Minv @ g
    if space.endswith("residual"):
        z = Minv @ (g - A @ x_f)
    else:
        z = torch.cat([torch.full((s,), s**-0.5, dtype=C.dtype) for s in sizes])
    parts = [[zl] for zl in _blocks(z, sizes)]
    if space.startswith("krylov"):
        for p, wl in zip(parts, _blocks(Minv @ z, sizes)):
            p.append(wl)
    Z = _layer_basis(parts, sizes)
    Q = Z @ torch.linalg.solve(Z.T @ A @ Z, Z.T)
    return x_f + Q @ (g - A @ x_f)


@pytest.mark.parametrize("space", ["residual", "krylov_nicolaides", "krylov_residual", "nicolaides"])
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_multiplicative_coarse_correction_equals_the_dense_formula(space, kind):
    x, y = data("cross_entropy")
    curv, C = fitted(net(), x, y, "cross_entropy", kind, coarse_space=space, variant="multiplicative")
    lam = damping_for(C)
    sizes = [m * n for m, n in curv.model_structure.shapes.values()]
    g = torch.randn(C.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = _reference(C, dense_B(curv), g, lam, space, sizes)
    assert rel(flat_solve(curv, g, lam), ref) < RTOL


def test_solve_time_coarse_space_survives_a_state_dict_round_trip():
    x, y = data("cross_entropy")
    curv, C = fitted(net(), x, y, "cross_entropy", "ggn", coarse_space="residual", variant="multiplicative")
    copy, _ = fitted(
        net(seed=3),
        *data("cross_entropy", seed=4),
        "cross_entropy",
        "ggn",
        coarse_space="residual",
        variant="multiplicative",
    )
    copy.model_structure.load_state_dict(curv.model_structure.state_dict())
    g = torch.randn(C.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    lam = damping_for(C)
    assert rel(flat_solve(copy, g, lam), flat_solve(curv, g, lam)) < 1e-12


def _cross_kfac_coarse(stats, names):
    """``C0_ij = 1ᵀ(A_ij ⊗ G_ij)1 / sqrt(d_i d_j)`` with dense cross-layer K-FAC factors (linear layers, T = 1)."""
    L = len(names)
    C0 = torch.zeros(L, L, dtype=torch.float64)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            si, sj = stats[a], stats[b]
            Aij = si.a[:, 0].T @ sj.a[:, 0] / si.N
            Gij = si.scale * torch.einsum("skm,skp->mp", si.g[:, :, 0], sj.g[:, :, 0])
            C0[i, j] = torch.kron(Aij, Gij).sum() / (si.m * si.n * sj.m * sj.n) ** 0.5
    return C0


def test_tselepidis_coarse_matrix_is_the_cross_layer_kfac_projection_and_solve_is_additive():
    x, y = data("cross_entropy")
    curv, C = fitted(net(), x, y, "cross_entropy", "ggn", coarse_matrix="kronecker")
    stats = curv.capture(x, y, "cross_entropy").stats
    names = list(curv.model_structure.shapes)
    C0 = _cross_kfac_coarse(stats, names)
    assert rel(curv.model_structure.coarse_matrix(), C0) < RTOL
    lam = damping_for(C)
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    R0 = nicolaides_R0(curv)
    g = torch.randn(C.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fine = torch.linalg.solve(dense_B(curv) + lam * eye, g)
    coarse = R0.T @ torch.linalg.solve(C0 + lam * torch.eye(len(names), dtype=C.dtype), R0 @ g)
    assert rel(flat_solve(curv, g, lam), fine + coarse) < RTOL
