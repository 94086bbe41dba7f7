"""The Van Loan rearrangement ``R(C)`` of a layer block and its truncated SVD (the Kronecker SVD).

* ``operator``: ``R(C)`` of a dense block, formed from per-sample gradients, or applied implicitly
  (:class:`RearrangedOperator`); the index convention is documented there;
* ``sample_space``: Gram / weighted-covariance kernels of the per-sample factors (``T = 1``);
* ``svd``: :func:`kronecker_svd`, the front that checks, chooses a route and finishes the factor pairs;
* ``power``, ``gram``: the two routes (block subspace iteration; block Krylov in sample space);
* ``ritz``: the per-pair stopping rule and the checks the routes share.
"""

from tensorcurv.linalg.rearrange.gram import gram_warm_side
from tensorcurv.linalg.rearrange.operator import RearrangedOperator, dense_rearranged, rearrange
from tensorcurv.linalg.rearrange.ritz import pair_change
from tensorcurv.linalg.rearrange.sample_space import (
    gram_operator,
    sample_grams,
    sym_gram,
    sym_quadratic_forms,
    weighted_covariances,
)
from tensorcurv.linalg.rearrange.svd import METHODS, antisymmetric, kronecker_svd

__all__ = [
    "METHODS",
    "RearrangedOperator",
    "antisymmetric",
    "dense_rearranged",
    "gram_operator",
    "gram_warm_side",
    "kronecker_svd",
    "pair_change",
    "rearrange",
    "sample_grams",
    "sym_gram",
    "sym_quadratic_forms",
    "weighted_covariances",
]
