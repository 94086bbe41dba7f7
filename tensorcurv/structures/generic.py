"""Default implementations of the structure capabilities, through ``mv``/``to_dense`` only.

A structure that knows better overrides the :class:`~tensorcurv.structures.base.Structure` method;
these are what every other structure (a new one included) gets:

* ``⟨C, Ĉ⟩_F = scale Σ_j ⟨G_j, Ĉ G_j⟩`` over the per-sample gradients ``G_j = Σ_t g_jt a_stᵀ``
  (``j = (s, k)``), batched ``mv`` over chunks of samples;
* ``‖Ĉ‖_F²`` from ``to_dense()`` on small blocks, else ``Σ_i ‖Ĉ e_i‖²`` over the unit matrices;
* the ``k`` leading eigenpairs from ``eigh(to_dense())`` up to ``mn = DENSE_EIGH_MAX``, else
  subspace iteration (block power method + Rayleigh–Ritz) on ``mv``;
* ``fit_inverse``: none (a one-line error naming the structures that have one, see ``inverse_fit.py``).

Vectors are ``(m, n)`` matrices (column-major ``vec``), as everywhere in ``structures``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import unvec, vec
from tensorcurv.structures.registry import get as registry_get
from tensorcurv.structures.registry import names as registry_names

#: blocks with ``m n`` up to this size: ``‖Ĉ‖_F²`` from ``to_dense()``
DENSE_MAX_DIM = 2048
#: blocks with ``m n`` up to this size: leading eigenvectors from ``eigh(to_dense())``
DENSE_EIGH_MAX = 4096


def per_sample_grad_chunks(stats: LayerStats, chunk: int) -> Iterator[Tensor]:
    """``G_sk = Σ_t g_skt a_stᵀ`` for ``chunk`` samples at a time, each ``(chunk·K, m, n)``."""
    for s0 in range(0, stats.N, chunk):
        s1 = min(s0 + chunk, stats.N)
        G = torch.einsum("sktm,stn->skmn", stats.g[s0:s1], stats.a[s0:s1])
        yield G.reshape(-1, stats.m, stats.n)


def batched_mv(structure: Any, V: Tensor) -> Tensor:
    """``Ĉ vec(V_b)`` for a stack ``V`` of shape ``(B, m, n)``: ``torch.vmap`` over ``mv``, else a loop."""
    try:
        return torch.vmap(structure.mv)(V)
    except Exception:  # a structure whose mv has data-dependent control flow
        return torch.stack([structure.mv(v) for v in V])


def inner_with_exact(structure: Any, stats: LayerStats, chunk: int) -> float:
    """``⟨C, Ĉ⟩_F = scale Σ_j ⟨G_j, Ĉ G_j⟩`` with ``C`` the exact block of ``stats``."""
    total = 0.0
    for G in per_sample_grad_chunks(stats, chunk):
        total += float((G * batched_mv(structure, G)).sum())
    return float(stats.scale) * total


def frobenius_sq(structure: Any, dense_max_dim: int = DENSE_MAX_DIM) -> float:
    """``‖Ĉ‖_F²`` from ``to_dense()`` (``mn <= dense_max_dim``), else ``Σ_i ‖Ĉ e_i‖²`` (``mn`` products)."""
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


def top_entries(vals: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Values and (row, column) indices of the ``k`` largest entries of an ``(m, n)`` matrix."""
    top, idx = torch.topk(vals.reshape(-1), k)
    return top, idx // vals.shape[1], idx % vals.shape[1]


def subspace_iteration(
    structure: Any, k: int, ref: Tensor, max_iter: int = 200, tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Leading ``k`` eigenpairs of a PSD block through its ``mv`` (block power method + Rayleigh–Ritz)."""
    m, n = structure.shape
    d, p = m * n, min(m * n, k + 8)
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, p, generator=gen, dtype=ref.dtype).to(ref.device))
    prev = None

    def apply(X):
        return torch.stack([vec(structure.mv(unvec(x, m, n))) for x in X.T], dim=1)

    for _ in range(max_iter):
        Y = apply(Q)
        evals, W = torch.linalg.eigh(0.5 * ((Q.T @ Y) + (Q.T @ Y).T))
        top = evals.flip(0)[:k]
        if prev is not None and (top - prev).abs().max() <= tol * top.abs().max().clamp_min(1e-300):
            break
        prev = top
        Q, _ = torch.linalg.qr(Y)
    vecs = (Q @ W).flip(1)[:, :k]
    return top, unvec(vecs.T, m, n)


def leading_eigenpairs(structure: Any, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` leading eigenpairs of a fitted block: values ``(k,)``, vectors ``(k, m, n)``."""
    m, n = structure.shape
    if m * n <= DENSE_EIGH_MAX:
        evals, Q = torch.linalg.eigh(0.5 * (structure.to_dense() + structure.to_dense().T))
        return evals.flip(0)[:k], unvec(Q.flip(1)[:, :k].T, m, n)
    ref = next(iter(structure.tensors().values()))
    return subspace_iteration(structure, k, ref)


def inverse_fit_structures() -> list[str]:
    """Registered names whose ``Hparams`` take ``fit_target`` (the structures that implement ``fit_inverse``)."""
    out = []
    for name in registry_names():
        hp = getattr(registry_get(name), "Hparams", None)
        if dataclasses.is_dataclass(hp) and "fit_target" in {f.name for f in dataclasses.fields(hp)}:
            out.append(name)
    return out


def fit_inverse(structure: Any) -> dict[str, Any]:
    """The default of ``Structure.fit_inverse``: a one-line error naming the structures that have one."""
    raise NotImplementedError(
        f"{structure.name} has no inverse-targeted fit (fit_target='inverse'); structures with one: "
        f"{', '.join(inverse_fit_structures())}"
    )
