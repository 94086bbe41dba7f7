"""``⟨C, Ĉ⟩_F`` and ``‖Ĉ‖_F²`` for a structure ``Ĉ`` against the exact block ``C`` (:class:`~tensorcurv.core.exact.ExactBlock`).

``⟨C, Ĉ⟩ = scale Σ_j ⟨G_j, Ĉ G_j⟩`` and ``‖Ĉ‖_F²`` from the structure's own factors (closed forms registered
per structure class, with a generic fallback through ``Ĉ.mv``), so that ``‖C − Ĉ‖_F² = ‖C‖² − 2⟨C, Ĉ⟩ + ‖Ĉ‖²``
is exact for any size (:func:`tensorcurv.study.frobenius.frobenius_error`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tensorcurv.core.exact import DENSE_MAX_DIM, ExactBlock
from tensorcurv.linalg import unvec, vec
from tensorcurv.structures.base import Structure


# =============================================================================== ⟨C, Ĉ⟩ and ‖Ĉ‖²
_INNER: dict[type, Callable[[Structure, ExactBlock], float]] = {}
_FROB: dict[type, Callable[[Structure], float]] = {}


def register_inner(cls: type):
    """Register a fast ``⟨C, Ĉ⟩`` formula for structures of class ``cls`` (used by :func:`inner_with_exact`)."""
    def deco(fn):
        _INNER[cls] = fn
        return fn
    return deco


def register_frobenius(cls: type):
    """Register a closed-form ``‖Ĉ‖_F²`` for structures of class ``cls`` (used by :func:`frobenius_sq`)."""
    def deco(fn):
        _FROB[cls] = fn
        return fn
    return deco


def _lookup(table: dict, structure: Structure):
    for cls in type(structure).__mro__:
        if cls in table:
            return table[cls]
    return None


def batched_mv(structure: Structure, V: Tensor) -> Tensor:
    """``Ĉ vec(V_b)`` for a stack ``V`` of shape ``(B, m, n)``: ``torch.vmap`` over ``mv``, else a loop."""
    try:
        return torch.vmap(structure.mv)(V)
    except Exception:  # a structure whose mv has data-dependent control flow
        return torch.stack([structure.mv(v) for v in V])


def inner_with_exact(structure: Structure, block: ExactBlock) -> float:
    """``⟨C, Ĉ⟩_F = scale Σ_j ⟨G_j, Ĉ G_j⟩`` (registered closed form, or batched ``mv`` over chunks)."""
    fn = _lookup(_INNER, structure)
    if fn is not None:
        return fn(structure, block)
    total = 0.0
    for G in block.grad_chunks():
        total += float((G * batched_mv(structure, G)).sum())
    return block.scale * total


def frobenius_sq(structure: Structure, dense_max_dim: int = DENSE_MAX_DIM) -> float:
    """``‖Ĉ‖_F²`` from the structure's factors (registered closed form), else from ``to_dense()`` on
    small blocks, else ``Σ_i ‖Ĉ e_i‖²`` over the unit matrices (exact, ``mn`` products)."""
    fn = _lookup(_FROB, structure)
    if fn is not None:
        return fn(structure)
    m, n = structure.shape
    if m * n <= dense_max_dim:
        return float(structure.to_dense().pow(2).sum())
    dtype = next(iter(structure.tensors().values())).dtype
    total = 0.0
    for i0 in range(0, m * n, 256):
        i1 = min(i0 + 256, m * n)
        E = torch.zeros(i1 - i0, m * n, dtype=dtype)
        E[torch.arange(i1 - i0), torch.arange(i0, i1)] = 1.0
        total += float(batched_mv(structure, unvec(E, m, n)).pow(2).sum())
    return total


def _register_builtin() -> None:
    from tensorcurv.structures.dense import Dense
    from tensorcurv.structures.diagonal import Diagonal
    from tensorcurv.structures.ekfac import EKFAC, projected_core
    from tensorcurv.structures.kfac import KFAC

    @register_inner(KFAC)
    def _kfac_inner(s, block):  # T = 1: scale Σ_sk (a_sᵀ A a_s)(g_skᵀ G g_sk)
        if block.stats.T != 1:
            return block.scale * sum(float((G * (s.G @ G @ s.A)).sum()) for G in block.grad_chunks())
        a, g = block.a[:, 0], block.g[:, :, 0]
        qa = ((a @ s.A) * a).sum(1)
        qg = ((g @ s.G) * g).sum(2)
        return block.scale * float((qa[:, None] * qg).sum())

    register_frobenius(KFAC)(lambda s: float(s.A.pow(2).sum() * s.G.pow(2).sum()))

    @register_inner(Diagonal)
    def _diag_inner(s, block):
        return float((block.diagonal() * s.D).sum())

    register_frobenius(Diagonal)(lambda s: float(s.D.pow(2).sum()))

    @register_inner(EKFAC)  # ⟨C, Q diag(S) Qᵀ⟩ = ⟨diag(Qᵀ C Q), S⟩
    def _ekfac_inner(s, block):
        return float((projected_core(block.stats, s.QA, s.QG, block.chunk) * s.S).sum())

    register_frobenius(EKFAC)(lambda s: float(s.S.pow(2).sum()))  # Q_A ⊗ Q_G orthogonal

    @register_inner(Dense)
    def _dense_inner(s, block):
        return block.scale * sum(float(((vec(G) @ s.C) * vec(G)).sum()) for G in block.grad_chunks())

    register_frobenius(Dense)(lambda s: float(s.C.pow(2).sum()))

    try:
        from tensorcurv.structures.kron_sum.structure import KronSum
    except ImportError:  # pragma: no cover  (older checkouts)
        return

    @register_inner(KronSum)  # Ĉ = Σ_r A_r ⊗ G_r; T = 1: scale Σ_r Σ_sk (a_sᵀ A_r a_s)(g_skᵀ G_r g_sk)
    def _kron_sum_inner(s, block):
        if block.stats.T != 1:
            return block.scale * sum(float((G * batched_mv(s, G)).sum()) for G in block.grad_chunks())
        a, g = block.a[:, 0], block.g[:, :, 0]
        qa = torch.einsum("sn,rnl,sl->rs", a, s.A, a)
        qg = torch.einsum("skm,rmi,ski->rsk", g, s.G, g)
        return block.scale * float((qa[:, :, None] * qg).sum())

    @register_frobenius(KronSum)  # Σ_{r,q} ⟨A_r, A_q⟩ ⟨G_r, G_q⟩
    def _kron_sum_frob(s):
        A, G = s.A.flatten(1), s.G.flatten(1)
        return float(((A @ A.T) * (G @ G.T)).sum())


_register_builtin()
