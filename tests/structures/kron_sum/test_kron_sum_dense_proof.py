"""The exact PSD scale of small Kronecker sums: ``A_1⊗G_1 + tΣ_{k≥2}A_k⊗G_k ⪰ 0`` for the largest ``t ≤ 1``."""

import pytest
import torch

from tensorcurv import structures
from tensorcurv.structures.kron_sum.certificates import DENSE_PROOF, dense_psd_scale
from test_kron_sum import fit


def _min_eig(A, G, t):
    C = torch.kron(A[0], G[0]) + t * sum(torch.kron(a, g) for a, g in zip(A[1:], G[1:]))
    return float(torch.linalg.eigvalsh(C)[0]), float(C.norm())


def _raw_factors(kind, rank):
    block = fit("linear", kind, "kron_sum", rank=rank, psd="none").blocks["0"]
    return block.A.clone(), block.G.clone()


@pytest.mark.parametrize("kind", ["empirical", "ggn"])
@pytest.mark.parametrize("rank", [2, 4, 8])
def test_dense_scale_is_the_largest_that_keeps_the_kronecker_sum_psd(kind, rank):
    A, G = _raw_factors(kind, rank)
    t = dense_psd_scale(A, G)
    assert t is not None and 0 < t < 1  # these Eckart–Young fits are indefinite
    lo, norm = _min_eig(A, G, t)
    assert lo >= -1e-12 * norm
    assert _min_eig(A, G, 1.001 * t)[0] < -1e-9 * norm  # 0.1 % more and it is indefinite: t is tight


def test_dense_scale_handles_leading_factors_with_a_common_null_space():
    # cross-entropy GGN: every g-side factor has the softmax null vector 1; zero input features: a null space of A
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 5, generator=g, dtype=torch.float64)
    a[:, -1] = 0.0
    z = torch.randn(200, 4, generator=g, dtype=torch.float64)
    gs = z - z.mean(1, keepdim=True)  # ⊥ 1
    w = [
        torch.ones(200, dtype=torch.float64),
        torch.randn(200, generator=g, dtype=torch.float64),
        torch.randn(200, generator=g, dtype=torch.float64),
    ]
    A = torch.stack([(a * wk[:, None]).T @ a for wk in w])
    G = torch.stack([(gs * wk.flip(0)[:, None]).T @ gs for wk in w])
    A[0] += 50 * torch.diag(torch.tensor([1.0, 1, 1, 1, 0], dtype=torch.float64))  # a dominant, PSD, singular lead
    t = dense_psd_scale(A, G)
    assert t is not None and t > 0.01
    lo, norm = _min_eig(A, G, min(t, 1.0))
    assert lo >= -1e-12 * norm
    if t < 1:
        assert _min_eig(A, G, 1.001 * t)[0] < -1e-9 * norm


def test_dense_scale_refuses_a_term_outside_the_leading_range():
    A = torch.stack([torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)), torch.eye(2, dtype=torch.float64)])
    G = torch.stack([torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)])
    assert dense_psd_scale(A, G) is None  # A_2 ⊗ G_2 reaches the null space of A_1 ⊗ G_1: no t > 0 may exist


def test_dense_scale_is_not_attempted_above_the_size_limit():
    A, G = _raw_factors("empirical", 2)
    assert dense_psd_scale(A, G, max_dim=A.shape[-1] * G.shape[-1] - 1) is None


def test_kron_sum_with_auto_proof_uses_the_dense_scale_on_small_blocks_and_is_psd():
    block = fit("linear", "ggn", "kron_sum", rank=4).blocks["0"]
    assert block.last_fit["psd_method"] == DENSE_PROOF
    A, G = _raw_factors("ggn", 4)
    assert block.last_fit["psd_scale"] == pytest.approx(dense_psd_scale(A, G), rel=1e-9)
    C = block.to_dense()
    assert float(torch.linalg.eigvalsh(C)[0]) >= -1e-12 * float(C.norm())


def test_dense_proof_on_a_block_too_large_is_a_clear_error():
    from tensorcurv.structures.kron_sum.certificates import make_psd

    A, G = _raw_factors("empirical", 2)
    with pytest.raises(ValueError, match="psd_proof='dense' needs a block with"):
        make_psd(A.repeat(1, 40, 40), G.repeat(1, 40, 40), proof="dense")  # n·m = 5·7·1600 > 4096


def test_running_average_updates_on_a_small_block_use_the_exact_scale_and_stay_psd():
    from test_kron_sum import _stats_stream

    sts = _stats_stream("ggn")
    block = structures.create("kron_sum", sts[0].shape, psd="shrink", rank=4, method="gram").fit(sts[0])
    for st in sts[1:]:
        block.update(st, 0.9)
        assert block.last_fit["psd_method"] == DENSE_PROOF
        t = block.last_fit["psd_scale"]
        lo, norm = _min_eig(block.A, block.G, 1.0)
        assert lo >= -1e-12 * norm
        if t < 1:  # tight: a 0.1 % larger tail is indefinite
            assert _min_eig(block.A, block.G, 1.001)[0] < -1e-9 * norm
