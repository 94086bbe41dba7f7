"""Column-major vec and the symmetric Gram product every K-FAC factor is computed with."""
from __future__ import annotations

import pytest
import torch

from tensorcurv.linalg import block_edges, gram, unvec, vec

pytestmark = pytest.mark.usefixtures("float64_default")


def test_vec_is_column_major_so_kron_matches_the_two_sided_product():
    A, G, V = torch.randn(3, 3), torch.randn(2, 2), torch.randn(2, 3)
    assert torch.allclose(torch.kron(A, G) @ vec(V), vec(G @ V @ A.T), atol=1e-14)
    assert torch.equal(unvec(vec(V), 2, 3), V)


@pytest.mark.parametrize("d", [7, 255, 256, 700, 1025])
def test_gram_from_the_upper_block_triangle_equals_the_plain_product(d):
    X = torch.randn(300, d)
    # same sums in a different association: equal to a few ulps of ‖x‖² (d ≤ 1025 terms of size ~1)
    assert torch.allclose(gram(X), X.T @ X, rtol=0, atol=1e-11)


def test_gram_is_exactly_symmetric():
    G = gram(torch.randn(64, 600))
    assert torch.equal(G, G.T)


def test_block_edges_cover_the_axis_with_at_most_d_over_min_block_blocks():
    assert block_edges(1025, blocks=8, min_block=128) == [0, 129, 258, 387, 516, 645, 774, 903, 1025]
    assert block_edges(600, blocks=8, min_block=128) == [0, 150, 300, 450, 600]
    assert block_edges(200) == [0, 200]
