"""Linear algebra: vec convention and Gram products, Krylov solvers, the Van Loan rearrangement."""

from tensorcurv.linalg.matrices import gram, summed_outer_products, symmetric_eigh, symmetric_part, unvec, vec

__all__ = ["gram", "summed_outer_products", "symmetric_eigh", "symmetric_part", "unvec", "vec"]
