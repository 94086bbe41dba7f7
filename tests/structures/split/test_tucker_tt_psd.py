"""``tucker`` / ``tt`` with the default ``psd="shift"``: PSD on the reference layers, so that the damped
solve is a real damped inverse (no fallback), equal to the dense ``(Ĉ + λI)^{-1} v``; and the library
leaves torch's thread count alone. Dense reference: ``to_dense`` and ``eigvalsh`` (float64, trained
layers, GGN, 256 samples; blocks of 1168 and 1290 rows)."""

from functools import cache

import pytest
import torch

from tensorcurv import structures
from tensorcurv.experiments.reference_layers import reference_stats
from tensorcurv.linalg import unvec, vec

LAYERS = [("mlp", "5"), ("cnn", "features.3")]  # the autoencoder's 4128-row block: scripts/tucker_tt_psd.py
STRUCTURES = ["tucker", "tt"]


@cache
def fitted(net, name, structure, psd="shift"):
    st = reference_stats(net, True, "ggn")[name]
    block = structures.create(structure, st.shape, psd=psd).fit(st)
    M = block.to_dense()
    return block, M, torch.linalg.eigvalsh(M)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("net,name", LAYERS)
def test_default_fit_is_positive_semidefinite(net, name, structure):
    _, M, evals = fitted(net, name, structure)
    assert float(evals[0]) >= -1e-10 * float(M.norm())


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("net,name", LAYERS)
def test_default_solve_is_the_dense_damped_inverse_without_fallback(net, name, structure):
    block, M, evals = fitted(net, name, structure)
    lam = 1e-3 * float(evals[-1])
    V = torch.randn(block.shape, generator=torch.Generator().manual_seed(0), dtype=M.dtype)
    X = block.solve(V, lam)
    assert block.last_solve.get("fallback") is None
    ref = unvec(torch.linalg.solve(M + lam * torch.eye(M.shape[0], dtype=M.dtype), vec(V)), *block.shape)
    assert float((X - ref).norm() / ref.norm()) < 1e-5  # PCG to relative residual 1e-8, condition ≤ 1e3


def test_unconstrained_fit_is_indefinite_on_a_reference_layer():
    """Why the default exists: psd="none" keeps the fit, whose least eigenvalue is far below zero."""
    _, M, evals = fitted("mlp", "5", "tucker", psd="none")
    assert float(evals[0]) < -1e-2 * float(evals[-1])


def test_shift_adds_exactly_the_missing_least_eigenvalue():
    shifted, _, e_shift = fitted("mlp", "5", "tucker")
    _, _, e_none = fitted("mlp", "5", "tucker", psd="none")
    assert shifted.shift == pytest.approx(-float(e_none[0]), rel=1e-6)
    torch.testing.assert_close(e_shift, e_none + shifted.shift, rtol=0, atol=1e-12 * float(e_none.abs().max()))


def test_tt_with_unit_ranks_gets_its_exact_shift_from_the_factor_eigenvalues():
    st = reference_stats("mlp", True, "ggn")["5"]
    block = structures.create("tt", st.shape, ranks=1).fit(st)
    none = structures.create("tt", st.shape, ranks=1, psd="none").fit(st)
    assert block.last_fit["psd_method"] == "exact"
    least = float(torch.linalg.eigvalsh(none.to_dense())[0])
    assert block.shift == pytest.approx(max(0.0, -least), abs=1e-12 * float(none.to_dense().norm()))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_psd_mode_typo_is_rejected_with_the_valid_values(structure):
    with pytest.raises(ValueError, match=r"psd='shrink' is not one of \['shift', 'none'\]"):
        structures.create(structure, (10, 129), psd="shrink")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_fit_update_and_solve_leave_the_torch_thread_count_unchanged(structure):
    st = reference_stats("mlp", True, "ggn")["5"]
    before = torch.get_num_threads()
    block = structures.create(structure, st.shape).fit(st)
    block.update(st, 0.9)
    block.solve(torch.ones(st.shape, dtype=torch.float64), 1e-3)
    assert torch.get_num_threads() == before
