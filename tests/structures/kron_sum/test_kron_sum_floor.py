"""With default settings (``psd="none"``), a rank-r ``kron_sum`` fit reaches the Eckart–Young floor
``sqrt(Σ_{i>r} σ_i(R(C))²)`` on the reference layers: relative gap ``(error − floor)/floor ≤ 1e-3``.

Dense reference (float64, 256 samples): for ``T = 1`` ``R(C) = scale Uᵀ W`` with the rows
``U_s = vec(a_s a_sᵀ)``, ``W_s = vec(Σ_k g_sk g_skᵀ)`` formed explicitly (σ from the two QR factors,
the error from ``‖X Yᵀ‖² = tr(XᵀX YᵀY)``); ``T > 1``: ``dense_rearranged`` and ``svdvals``. The
first test checks this reference against ``to_dense`` and ``dense_rearranged`` on a small layer.
"""

from functools import cache

import pytest
import torch

from tensorcurv import structures
from tensorcurv.experiments.reference_layers import reference_stats
from tensorcurv.linalg.rearrange import dense_rearranged, rearrange

GAP = 1e-3
LAYERS = [("mlp", "1"), ("mlp", "5"), ("autoencoder", "3")]
RANKS = [2, 3, 5, 8]  # a sample of 2..8 (scripts/kron_sum_floor.py tabulates all of them)
CNN_RANKS = [2, 8]  # the T > 1 power route costs ~1 s per fit


def sample_rows(st):
    a, g = st.a[:, 0], st.g[:, :, 0]
    return torch.einsum("si,sj->sij", a, a).flatten(1), torch.einsum("ski,skj->sij", g, g).flatten(1)


@cache
def layer(net, name, trained, kind):
    """(stats, singular values of R(C), error function of a fitted block)."""
    st = reference_stats(net, trained, kind)[name]
    if st.T == 1:
        U, W = sample_rows(st)
        s = torch.linalg.svdvals(torch.linalg.qr(U.T)[1] @ torch.linalg.qr(W.T)[1].T) * st.scale

        def error(block):
            P, Q = block.A.flatten(1).T, block.G.flatten(1).T  # R(Ĉ) = P Qᵀ
            X, Y = torch.cat([U.T, -P], 1), torch.cat([st.scale * W.T, Q], 1)
            return float(((X.T @ X) * (Y.T @ Y)).sum().clamp_min(0).sqrt())
    else:
        R = dense_rearranged(st)
        s = torch.linalg.svdvals(R)

        def error(block):
            return float((R - block.A.flatten(1).T @ block.G.flatten(1)).norm())

    return st, s, error


def gap(net, name, trained, kind, r, block=None):
    st, s, error = layer(net, name, trained, kind)
    if block is None:
        block = structures.create("kron_sum", st.shape, rank=r, psd="none").fit(st)
    floor = float(s[r:].pow(2).sum().sqrt())
    return (error(block) - floor) / floor


def test_reference_error_and_floor_equal_the_dense_ones():
    st, s, error = layer("mlp", "5", True, "ggn")
    C = st.scale * torch.einsum("qi,qj->ij", *(2 * [st.per_sample_grads().transpose(1, 2).flatten(1)]))
    block = structures.create("kron_sum", st.shape, rank=3, psd="none").fit(st)
    torch.testing.assert_close(s, torch.linalg.svdvals(rearrange(C, st.shape))[: s.numel()], rtol=1e-10, atol=1e-14)
    assert error(block) == pytest.approx(float((block.to_dense() - C).norm()), rel=1e-9)
    assert torch.allclose(dense_rearranged(st), rearrange(C, st.shape), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
@pytest.mark.parametrize("net,name", LAYERS)
def test_default_fit_reaches_the_eckart_young_floor(net, name, trained, kind, r):
    assert gap(net, name, trained, kind, r) <= GAP


@pytest.mark.parametrize("r", CNN_RANKS)
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
def test_default_fit_reaches_the_eckart_young_floor_on_a_conv_layer(trained, kind, r):
    assert gap("cnn", "features.3", trained, kind, r) <= GAP


def test_refit_of_a_fitted_block_is_not_capped_by_warm_max_iter():
    st_init = layer("autoencoder", "3", False, "ggn")[0]
    block = structures.create("kron_sum", st_init.shape, rank=3, psd="none").fit(st_init)
    block.fit(layer("autoencoder", "3", True, "ggn")[0])  # warm-started from other factors, one-shot
    assert block.last_fit["warm_start"] and block.last_fit["iterations"] > 1
    assert gap("autoencoder", "3", True, "ggn", 3, block) <= GAP


def test_running_average_update_stays_within_warm_max_iter():
    st = layer("autoencoder", "3", True, "ggn")[0]
    block = structures.create("kron_sum", st.shape, rank=3, psd="none", method="power").fit(st)
    block.update(st, 0.5)
    assert block.last_fit["warm_start"] and block.last_fit["iterations"] == 1
