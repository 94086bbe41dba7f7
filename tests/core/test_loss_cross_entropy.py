"""Cross-entropy's loss-Hessian factor: ``S`` with ``S Sᵀ = ∇²_z ℓ = diag(p) − p pᵀ`` and ``C − 1`` columns.

The reference is the float64 autodiff Hessian of torch's own per-sample cross-entropy in the logits. Both sides
are float64 and differ by round-off of a few 1e-16 on entries of at most 1/4, so 1e-13 (relative, Frobenius)
has several orders of margin; a dropped or unreflected column is off by O(1)."""

import subprocess
import sys

import torch
from torch.func import hessian

from tensorcurv.core.losses import CrossEntropy


def logits(n=6, c=5, scale=3.0):
    return scale * torch.randn(n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_hessian_factor_squares_to_the_autodiff_hessian_of_the_per_sample_loss():
    z = logits()
    S = CrossEntropy("sum").hessian_factor(z)
    labels = torch.arange(z.shape[0]) % z.shape[1]
    for s in range(z.shape[0]):
        H = hessian(torch.nn.functional.cross_entropy)(z[s], labels[s])
        assert rel(S[s] @ S[s].T, H) < 1e-13


def test_hessian_factor_has_one_column_per_rank_of_the_hessian():
    assert CrossEntropy().hessian_factor(logits(c=5)).shape == (6, 5, 4)


def test_hessian_factor_stays_finite_and_exact_for_saturated_logits():
    z = torch.tensor([[800.0, 0.0, -800.0], [0.0, 0.0, 900.0]], dtype=torch.float64)
    S = CrossEntropy().hessian_factor(z)
    p = z.softmax(-1)
    assert torch.isfinite(S).all()
    torch.testing.assert_close(S @ S.mT, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], rtol=0, atol=1e-300)


def test_hessian_factor_of_a_single_class_is_zero():
    assert CrossEntropy().hessian_factor(logits(c=1)).abs().max() == 0


def test_the_first_ggn_update_of_a_process_does_not_import_sympy():
    # a tensor grad_outputs makes autograd's Python shape check import sympy (0.4-1.3 s) on its first call
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "import tensorcurv\n"
        "m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))\n"
        "tensorcurv.Curvature(m, 'kfac', 'ggn').update(torch.randn(5, 4), torch.arange(5) % 3, nn.CrossEntropyLoss())\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
