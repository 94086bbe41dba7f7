"""Kronecker sums (KPSVD): the structure, its PSD fits and certificates."""

from tensorcurv.structures.kron_sum.structure import KronSum

__all__ = ["KronSum"]
