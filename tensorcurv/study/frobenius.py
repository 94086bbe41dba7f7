"""Frobenius errors ``‖C − Ĉ‖_F`` of a structure, and the floor no rank-r Kronecker sum can beat.

* ``‖C − Ĉ‖_F² = ‖C‖² − 2⟨C, Ĉ⟩ + ‖Ĉ‖²`` from the exact block's Gram matrix and
  :mod:`tensorcurv.study.structure_norms` (exact for any size, never formed);
* the floor: the optimal rank-r Kronecker-sum error ``sqrt(‖C‖² − Σ_{i≤r} σ_i²) / ‖C‖`` from the leading
  singular values of the rearranged block ``R(C)`` (``tensorcurv.linalg.rearrange``, Eckart–Young).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tensorcurv.core.exact import ExactBlock
from tensorcurv.structures.base import Structure
from tensorcurv.study.structure_norms import frobenius_sq, inner_with_exact


def frobenius_error(structure: Structure, block: ExactBlock, c_frob_sq: float | None = None) -> dict[str, float]:
    """Exact ``‖C − Ĉ‖_F`` and ``‖C − Ĉ‖_F / ‖C‖_F`` (plus the three Frobenius terms)."""
    cc = block.frobenius_sq() if c_frob_sq is None else c_frob_sq
    ch = inner_with_exact(structure, block)
    hh = frobenius_sq(structure)
    err_sq = max(cc - 2.0 * ch + hh, 0.0)
    return {
        "c_frob_sq": cc,
        "inner": ch,
        "approx_frob_sq": hh,
        "fro_abs": math.sqrt(err_sq),
        "fro_rel": math.sqrt(err_sq / cc) if cc > 0 else float("nan"),
    }


def kronecker_floor(
    block: ExactBlock, ranks: Sequence[int], c_frob_sq: float | None = None, **svd_kw
) -> dict[int, float]:
    """``floor_r = sqrt(‖C‖² − Σ_{i≤r} σ_i²) / ‖C‖``: the smallest relative Frobenius error of any
    sum of ``r`` Kronecker products (Eckart–Young on ``R(C)``; singular values by
    ``tensorcurv.linalg.rearrange.kronecker_svd``, by default to a relative energy change of 1e-10)."""
    from tensorcurv.linalg.rearrange import kronecker_svd

    ranks = sorted({int(r) for r in ranks})
    rmax = min(ranks[-1], block.n * block.n, block.m * block.m)
    svd_kw = {"tol": 1e-10, "max_iter": 500, "generator": torch.Generator().manual_seed(0), **svd_kw}
    sigma = kronecker_svd(block.stats, rmax, **svd_kw)[0]
    cc = block.frobenius_sq() if c_frob_sq is None else c_frob_sq
    csum = torch.cumsum(sigma.double().pow(2), 0)
    out = {}
    for r in ranks:
        head = float(csum[min(r, len(csum)) - 1])
        out[r] = math.sqrt(max(cc - head, 0.0) / cc) if cc > 0 else float("nan")
    return out
