"""Column-major vec and the symmetric Gram product every K-FAC factor is computed with."""
from __future__ import annotations

import pytest
import torch

from tensorcurv.linalg import gram, symmetric_part, unvec, vec

pytestmark = pytest.mark.usefixtures("float64_default")


def test_vec_is_column_major_so_kron_matches_the_two_sided_product():
    A, G, V = torch.randn(3, 3), torch.randn(2, 2), torch.randn(2, 3)
    assert torch.allclose(torch.kron(A, G) @ vec(V), vec(G @ V @ A.T), atol=1e-14)
    assert torch.equal(unvec(vec(V), 2, 3), V)


@pytest.mark.parametrize("d", [7, 256, 1025])
def test_gram_equals_the_plain_product_to_rounding(d):
    X = torch.randn(300, d)
    # the same gemm (float64): within a few ulps of ‖x‖² (300 terms of size ~1)
    assert torch.allclose(gram(X), X.T @ X, rtol=0, atol=1e-12)


def test_gram_is_symmetric_to_rounding():
    G = gram(torch.randn(2048, 300, dtype=torch.float32))
    assert torch.allclose(G, G.T, rtol=0, atol=1e-6 * float(G.abs().max()))


def test_gram_scale_multiplies_the_product():
    X = torch.randn(50, 9)
    assert torch.allclose(gram(X, 0.25), 0.25 * (X.T @ X), rtol=0, atol=1e-13)


def test_symmetric_part_of_a_stack_is_exactly_symmetric_and_keeps_symmetric_input():
    M = torch.randn(3, 20, 20)
    S = symmetric_part(M)
    assert torch.equal(S, S.mT)
    assert torch.allclose(S, 0.5 * (M + M.mT), rtol=0, atol=0)
    assert torch.equal(symmetric_part(S), S)
