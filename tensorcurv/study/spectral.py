"""Spectral errors ``‖C − Ĉ‖_2`` and spectra of structures, by Lanczos on implicit products.

``‖C − Ĉ‖_2`` is the largest ``|λ|`` of ``v ↦ C v − Ĉ v`` (never formed) for a symmetric ``Ĉ``; a
non-symmetric ``Ĉ`` needs the normal operator ``(C − Ĉ)ᵀ(C − Ĉ)``. Lanczos:
:func:`tensorcurv.linalg.lanczos.lanczos` (full re-orthogonalization).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from tensorcurv.core.exact import GRAM_MAX_TERMS, ExactBlock
from tensorcurv.linalg import unvec, vec
from tensorcurv.linalg.lanczos import LanczosResult, lanczos
from tensorcurv.structures.base import Structure
from tensorcurv.study.structure_norms import frobenius_sq


def ritz_values(
    op: Callable[[Tensor], Tensor], dim: int, *, max_iter: int = 200, tol: float = 1e-10, seed: int = 0
) -> LanczosResult:
    """:func:`tensorcurv.linalg.lanczos.lanczos` on ``op`` from a seeded float64 Gaussian start."""
    start = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lanczos(op, start, max_iter=max_iter, tol=tol)


def spectral_norm(op: Callable[[Tensor], Tensor], dim: int, **kw) -> float:
    """``‖M‖_2 = max |λ(M)|`` of a symmetric operator by Lanczos (see :func:`ritz_values`)."""
    return float(ritz_values(op, dim, **kw).ritz_values.abs().max())


def asymmetry(structure: Structure, probes: int = 3, seed: int = 0) -> float:
    """``max |uᵀĈv − vᵀĈu| / ‖Ĉ‖_F`` over random unit ``u, v`` (0 for a symmetric ``Ĉ``, up to rounding)."""
    m, n = structure.shape
    dtype = next(iter(structure.tensors().values())).dtype
    gen = torch.Generator().manual_seed(seed)
    norm = math.sqrt(max(frobenius_sq(structure), 0.0))
    worst = 0.0
    for _ in range(probes):
        U, V = (torch.randn(m, n, generator=gen, dtype=dtype) for _ in range(2))
        U, V = U / U.norm(), V / V.norm()
        worst = max(worst, abs(float((U * structure.mv(V)).sum() - (V * structure.mv(U)).sum())))
    return worst / norm if norm > 0 else 0.0


def spectral_error(
    structure: Structure, block: ExactBlock, *, asym_tol: float = 1e-8, dense_max_dim: int = 8192, **kw
) -> dict[str, float]:
    """``‖C − Ĉ‖_2`` (largest singular value) and ``‖C − Ĉ‖_2 / ‖C‖_2``.

    Symmetric ``Ĉ``: Lanczos on ``v ↦ C v − Ĉ v`` (never formed), ``max |λ|``. A non-symmetric ``Ĉ``
    (``asymmetry > asym_tol``) needs ``Ĉᵀ`` products: Lanczos on ``(C − Ĉ)ᵀ(C − Ĉ)`` with ``Ĉᵀ`` from
    ``to_dense()`` up to ``dense_max_dim``, else NaN. ``asym`` is reported either way."""
    m, n = block.m, block.n
    asym = asymmetry(structure)

    def diff(v):
        V = unvec(v, m, n)
        return vec(block.mv(V) - structure.mv(V))

    if asym <= asym_tol:
        err = spectral_norm(diff, block.dim, **kw)
    elif block.dim <= dense_max_dim:
        DT = structure.to_dense().T

        def normal(v):
            w = diff(v)
            return vec(block.mv(unvec(w, m, n))) - DT @ w

        err = math.sqrt(max(float(ritz_values(normal, block.dim, **kw).ritz_values.max()), 0.0))
    else:
        err = float("nan")
    if block.J <= GRAM_MAX_TERMS:
        c2 = float(block.eigenvalues()[0])
    else:
        c2 = spectral_norm(lambda v: vec(block.mv(unvec(v, m, n))), block.dim, **kw)
    return {"spec_abs": err, "spec_rel": err / c2 if c2 > 0 else float("nan"), "c_spec": c2, "asym": asym}


def structure_spectrum(S: Structure, k: int, dense_max_dim: int = 8192) -> Tensor:
    """Leading ``k`` eigenvalues of ``Ĉ`` (descending): dense ``eigvalsh`` up to ``dense_max_dim``, else
    Lanczos keeping only the Ritz values whose residual is below ``1e-6·max|θ|`` (converged)."""
    m, n = S.shape
    if m * n <= dense_max_dim:
        return torch.linalg.eigvalsh(S.to_dense()).flip(0)[:k]
    res = ritz_values(lambda v: vec(S.mv(unvec(v, m, n))), m * n, max_iter=3 * k + 20, tol=0.0)
    theta = res.ritz_values
    keep = res.residuals <= 1e-6 * theta.abs().max()
    return theta[keep].flip(0)[:k]
