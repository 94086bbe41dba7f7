"""Facts about the near-PSD Kronecker sum (:mod:`tensorcurv.structures.kron_sum.near_psd`): the unconstrained
truncation plus the smallest identity shift; float64, dense ground truth."""

import pytest
import torch

import tensorcurv
from structure_problems import curvature
from tensorcurv.linalg.rearrange import RearrangedOperator, kronecker_svd
from tensorcurv.structures.kron_sum import near_psd as N


def dense(A, G):
    return sum(torch.kron(a, g) for a, g in zip(A, G))


def random_terms(r=3, n=4, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, n, generator=g, dtype=torch.float64)
    G = torch.randn(r, m, m, generator=g, dtype=torch.float64)
    return A + A.mT, G + G.mT


def test_kron_sum_mv_is_the_dense_product_in_column_major_vec():
    A, G = random_terms()
    v = torch.randn(12, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(N.kron_sum_mv(A, G, v), dense(A, G) @ v, atol=1e-12)


def test_shift_of_an_indefinite_sum_is_minus_its_smallest_eigenvalue():
    A, G = random_terms()
    lam = torch.linalg.eigvalsh(dense(A, G))
    assert float(lam[0]) < 0
    mu = N.shift_for(A, G)  # Lanczos on a 12-dimensional operator: exhausted, exact to rounding
    assert mu == pytest.approx(-float(lam[0]), rel=1e-9)
    assert float(torch.linalg.eigvalsh(dense(*N.with_shift(A, G, mu)))[0]) >= -1e-12 * float(lam[-1])


def test_shift_of_a_positive_definite_sum_is_zero():
    A, G = random_terms()
    A, G = A @ A.mT, G @ G.mT  # PSD factors: a PSD sum
    A[0] += torch.eye(4, dtype=torch.float64)
    G[0] += torch.eye(3, dtype=torch.float64)
    assert N.shift_for(A, G) == 0.0


def test_shifted_error_formula_equals_the_dense_error():
    curv, stats = curvature("linear", "ggn")
    st = stats["0"]
    C = curv.blocks["0"].to_dense()
    sigma, A, G = kronecker_svd(st, 2, tol=1e-14, max_iter=500)
    A = A * sigma[:, None, None]
    op = RearrangedOperator(st)
    err = float((C - dense(A, G)).norm() ** 2)
    mu = 0.3 * float(C.diagonal().mean())
    expected = float((C - dense(A, G) - mu * torch.eye(C.shape[0], dtype=C.dtype)).norm() ** 2)
    assert N.shifted_error_sq(op, A, G, mu, err) == pytest.approx(expected, rel=1e-10)
    assert op.frobenius_sq() - N.fitted_energy(op, A, G) == pytest.approx(err, rel=1e-9)


@pytest.fixture(scope="module")
def code_layer():
    from tensorcurv.experiments.reference_layers import reference_stats

    return reference_stats("autoencoder", True, "ggn")["3"]


def relative_error(st, block):
    op = RearrangedOperator(st)
    total = op.frobenius_sq()
    return (max(total - N.fitted_energy(op, block.A, block.G), 0.0) / total) ** 0.5


def test_psd_factors_on_the_autoencoder_code_layer_take_the_shifted_truncation_at_the_floor(code_layer):
    st = code_layer
    block = tensorcurv.structures.create("kron_sum", st.shape, rank=4, psd="factors").fit(st)
    assert block.last_fit["near_psd"] and block.A.shape[0] == 5
    free = tensorcurv.structures.create("kron_sum", st.shape, rank=4, psd="none").fit(st)
    assert relative_error(st, block) <= 1.01 * relative_error(st, free)  # measured 1.000 (shift ≈ 1e-5 λ_max)
    low, high = N.min_eigenvalue(block.A, block.G)
    assert low >= -1e-10 * high


def test_shifted_state_stays_shifted_and_psd_through_a_running_average(code_layer):
    st = code_layer
    block = tensorcurv.structures.create("kron_sum", st.shape, rank=4, psd="factors").fit(st)
    block.update(st, 0.9)
    assert block.last_fit["near_psd"] and block.A.shape[0] == 5
    low, high = N.min_eigenvalue(block.A, block.G)
    assert low >= -1e-10 * high
