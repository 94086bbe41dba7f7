"""``⟨C, Ĉ⟩_F`` and ``‖Ĉ‖_F²`` for a structure ``Ĉ`` against the exact block ``C``
(:class:`~tensorcurv.core.exact.ExactBlock`).

Both are capabilities of the structure (``Structure.inner_with_exact`` / ``Structure.frobenius_sq``: closed forms
from its factors where it has them, else batched ``Ĉ.mv``), so ``‖C − Ĉ‖_F² = ‖C‖² − 2⟨C, Ĉ⟩ + ‖Ĉ‖²`` is exact for
any size (:func:`tensorcurv.study.frobenius.frobenius_error`).
"""

from __future__ import annotations

from tensorcurv.core.exact import DENSE_MAX_DIM, ExactBlock
from tensorcurv.structures.base import Structure


def inner_with_exact(structure: Structure, block: ExactBlock) -> float:
    """``⟨C, Ĉ⟩_F = scale Σ_j ⟨G_j, Ĉ G_j⟩`` on the block's per-sample factors."""
    return structure.inner_with_exact(block.stats, block.chunk)


def frobenius_sq(structure: Structure, dense_max_dim: int = DENSE_MAX_DIM) -> float:
    """``‖Ĉ‖_F²`` (closed form from the factors, else ``to_dense()`` up to ``dense_max_dim``, else ``mn`` products)."""
    return structure.frobenius_sq(dense_max_dim)
