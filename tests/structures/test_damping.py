"""K-FAC's factored (π) damping: the one implementation shared by kfac and kron_sum."""

import math

import pytest
import torch

from tensorcurv.structures.damping import factored_shifts, pi_ratio

pytestmark = pytest.mark.usefixtures("float64_default")


def _spd(d, seed):
    X = torch.randn(d, d + 2, generator=torch.Generator().manual_seed(seed))
    return X @ X.T


def test_pi_balances_the_mean_eigenvalues_of_the_two_factors():
    # shape (m, n) = (2, 3): A is n x n, G is m x m
    assert pi_ratio(trace_A=12.0, trace_G=1.0, shape=(2, 3)) == pytest.approx(math.sqrt((12.0 / 3) / (1.0 / 2)))


@pytest.mark.parametrize("traces", [(0.0, 1.0), (1.0, 0.0), (-1.0, 2.0)])
def test_pi_is_one_when_a_trace_is_not_positive(traces):
    assert pi_ratio(*traces, shape=(2, 3)) == 1.0


def test_shifts_multiply_to_the_damping():
    shift_A, shift_G = factored_shifts(pi=2.5, damping=0.04)
    assert shift_A * shift_G == pytest.approx(0.04, rel=1e-15) and shift_A / shift_G == pytest.approx(2.5**2)


def test_factored_damping_is_invariant_to_rescaling_the_factors():
    # (cA, G/c) is the same Kronecker product; π scales by c, so the damped product is the same too
    A, G, lam, c = _spd(3, 0), _spd(2, 1), 1e-2, 7.0

    def damped(A, G):
        sa, sg = factored_shifts(pi_ratio(float(A.trace()), float(G.trace()), (2, 3)), lam)
        return torch.kron(A + sa * torch.eye(3), G + sg * torch.eye(2))

    torch.testing.assert_close(damped(c * A, G / c), damped(A, G), rtol=1e-13, atol=0.0)
