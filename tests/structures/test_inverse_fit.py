"""The inverse-targeted fit (``fit_target=inverse``): it minimizes the probe estimate of
``‖(Ĉ + λI)(C + λI)⁻¹ − I‖_F²``, recovers a block of its own class, and keeps the damped solve definite.

Tolerances (float64): the probe solves and the factor normal equations run CG to ``1e-10`` relative, so
quantities computed two ways agree to ``1e-8``; the recovery tests compare a converged alternating fit with
the exact block (``1e-6`` relative: ALS converges linearly, 30 sweeps from a 10 % perturbation).
"""

from __future__ import annotations

import pytest
import torch

from tensorcurv.core.exact import ExactBlock
from tensorcurv.core.stats import LayerStats
from tensorcurv.structures import create, inverse_fit, make_hparams
from tensorcurv.structures.inverse_fit import damped_solutions, draw_probes, probe_objective

M, N_IN = 3, 4  # a (3, 4) block: D = 12


def random_stats(seed: int = 0, samples: int = 40, K: int = 2) -> LayerStats:
    """A block that is not a Kronecker sum of low rank (independent random per-sample factors)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(samples, 1, N_IN, generator=gen, dtype=torch.float64)
    a[..., 0] *= 3.0  # unequal scales: a spread spectrum
    g = torch.randn(samples, K, 1, M, generator=gen, dtype=torch.float64)
    return LayerStats(a, g, 1.0 / samples)


def kronecker_stats(groups: int, seed: int = 0, per_group: int = 8) -> LayerStats:
    """``C = Σ_q (Σ_{s∈q} a_s a_sᵀ) ⊗ (Σ_k g_qk g_qkᵀ)``, a PSD Kronecker sum of rank ``groups``: every sample
    of group ``q`` carries the same ``K = M`` output columns ``g_qk``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(groups * per_group, 1, N_IN, generator=gen, dtype=torch.float64)
    cols = torch.randn(groups, M, 1, M, generator=gen, dtype=torch.float64)
    g = cols.repeat_interleave(per_group, dim=0)
    return LayerStats(a, g, 1.0)


def damping_of(stats: LayerStats, ratio: float = 1e-2) -> float:
    return ratio * ExactBlock(stats).trace() / (M * N_IN)


def held_out(stats: LayerStats, structure, lam: float, p: int = 24):
    Z = draw_probes(stats, p, "gaussian", torch.Generator().manual_seed(99))
    Y, _ = damped_solutions(stats, Z, lam, lambda V: structure.solve(V, lam))
    return Y, Z


def perturb(structure, scale: float = 0.1, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    A, G = structure.kronecker_terms()
    noise = [scale * X.norm() * torch.randn(X.shape, generator=gen, dtype=X.dtype) / X.numel() ** 0.5 for X in (A, G)]
    A, G = (X + 0.5 * (E + E.transpose(1, 2)) for X, E in zip((A, G), noise))
    structure.set_kronecker_terms(A, G)


VARIANTS = [("kfac", {}), ("kron_sum", {"rank": 2}), ("kron_sum", {"rank": 2, "psd": "factors"})]


def test_damped_solutions_solve_the_exact_damped_system():
    stats = random_stats()
    lam = damping_of(stats)
    Z = draw_probes(stats, 5, "gaussian", torch.Generator().manual_seed(0))
    Y, info = damped_solutions(stats, Z, lam, lambda V: V / lam)
    C = ExactBlock(stats).to_dense() + lam * torch.eye(M * N_IN, dtype=torch.float64)
    exact = torch.linalg.solve(C, Z.transpose(1, 2).reshape(5, -1).T).T.reshape(5, N_IN, M).transpose(1, 2)
    assert info["method"] == "woodbury"
    assert torch.allclose(Y, exact, rtol=0, atol=1e-8 * float(exact.abs().max()))


def test_damped_solutions_by_preconditioned_cg_match_woodbury(monkeypatch):
    stats = random_stats()
    lam = damping_of(stats)
    Z = draw_probes(stats, 3, "gaussian", torch.Generator().manual_seed(0))
    woodbury, _ = damped_solutions(stats, Z, lam, lambda V: V / lam)
    monkeypatch.setattr(inverse_fit, "GRAM_MAX_TERMS", 0)  # the route of layers with many per-sample gradients
    kfac = create("kfac", (M, N_IN)).fit(stats)
    Y, info = damped_solutions(stats, Z, lam, lambda V: kfac.solve(V, lam))
    assert info["method"] == "pcg" and info["converged"]
    assert torch.allclose(Y, woodbury, rtol=0, atol=1e-8 * float(woodbury.abs().max()))


@pytest.mark.parametrize("name,hp", VARIANTS)
def test_inverse_fit_lowers_the_probe_objective_below_the_frobenius_fit(name, hp):
    stats = random_stats()
    lam = damping_of(stats)
    block = create(name, (M, N_IN), **hp).fit(stats)
    info = block.fit_inverse(stats, lam, probes=8, sweeps=6)
    assert info["kept"] == "inverse"
    assert info["objective"] < 0.9 * info["objective_start"]
    Z = draw_probes(stats, 8, "gaussian", torch.Generator().manual_seed(0))  # the fit's probes (seed 0)
    Y, _ = damped_solutions(stats, Z, lam, lambda V: block.solve(V, lam))
    assert probe_objective(block, Y, Z, lam) == pytest.approx(info["objective"], rel=1e-6)


@pytest.mark.parametrize("name,hp", VARIANTS)
def test_inverse_fit_lowers_the_objective_on_held_out_probes(name, hp):
    stats = random_stats()
    lam = damping_of(stats)
    frob = create(name, (M, N_IN), **hp).fit(stats)
    Y, Z = held_out(stats, frob, lam)
    before = probe_objective(frob, Y, Z, lam)
    inv = create(name, (M, N_IN), **hp).fit(stats)
    inv.fit_inverse(stats, lam, probes=24, sweeps=6)
    assert probe_objective(inv, Y, Z, lam) < before


@pytest.mark.parametrize("name,hp", VARIANTS)
def test_inverse_fit_keeps_the_damped_solve_definite(name, hp):
    stats = random_stats(seed=1)
    lam = damping_of(stats, 1e-3)
    block = create(name, (M, N_IN), **hp).fit(stats)
    block.fit_inverse(stats, lam, probes=8, sweeps=6)
    C_hat = block.to_dense()
    assert torch.allclose(C_hat, C_hat.T, rtol=0, atol=1e-12 * float(C_hat.abs().max()))
    assert float(torch.linalg.eigvalsh(C_hat).min()) >= -1e-10 * float(C_hat.abs().max())
    V = torch.randn(M, N_IN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = block.solve(V, lam)
    dense = torch.linalg.solve(C_hat + lam * torch.eye(M * N_IN, dtype=torch.float64), V.T.reshape(-1))
    assert torch.allclose(X.T.reshape(-1), dense, rtol=0, atol=1e-6 * float(dense.abs().max()))


def test_kfac_inverse_fit_recovers_a_kronecker_block_from_a_perturbed_start():
    stats = kronecker_stats(groups=1)
    lam = damping_of(stats)
    block = create("kfac", (M, N_IN)).fit(stats)
    C = ExactBlock(stats).to_dense()
    assert torch.allclose(block.to_dense(), C, rtol=0, atol=1e-10 * float(C.abs().max()))  # K-FAC is exact here
    perturb(block)
    block.fit_inverse(stats, lam, probes=M * N_IN, sweeps=30)
    assert torch.allclose(block.to_dense(), C, rtol=0, atol=1e-6 * float(C.abs().max()))


def test_kron_sum_inverse_fit_recovers_a_rank_two_block_from_a_perturbed_start():
    stats = kronecker_stats(groups=2)
    lam = damping_of(stats)
    block = create("kron_sum", (M, N_IN), rank=2, psd="none").fit(stats)
    C = ExactBlock(stats).to_dense()
    perturb(block)
    block.fit_inverse(stats, lam, probes=M * N_IN, sweeps=30)
    assert torch.allclose(block.to_dense(), C, rtol=0, atol=1e-6 * float(C.abs().max()))


@pytest.mark.parametrize("name,hp", VARIANTS)
def test_fit_target_inverse_adapts_the_block_inside_fit_and_update(name, hp):
    stats, other = random_stats(0), random_stats(1)
    lam = damping_of(stats)
    opts = {"fit_target": "inverse", "fit_damping": lam, "inverse_probes": 8, "inverse_sweeps": 3}
    adapted = create(name, (M, N_IN), **hp, **opts).fit(stats)
    plain = create(name, (M, N_IN), **hp).fit(stats)
    assert adapted.last_inverse_fit["kept"] == "inverse"
    assert not torch.allclose(adapted.to_dense(), plain.to_dense())
    adapted.update(other, 0.9)
    assert adapted.last_inverse_fit["objective"] <= adapted.last_inverse_fit["objective_start"]


def test_gradient_probes_have_the_curvature_as_covariance():
    stats = random_stats(samples=6, K=1)
    Z = draw_probes(stats, 4000, "gradients", torch.Generator().manual_seed(0))
    cov = torch.einsum("pi,pj->ij", Z.transpose(1, 2).reshape(4000, -1), Z.transpose(1, 2).reshape(4000, -1)) / 4000
    C = ExactBlock(stats).to_dense()
    # Rademacher signs: E[zzᵀ] = C exactly; 4000 draws leave a Monte-Carlo error of a few % of ‖C‖
    assert float((cov - C).norm() / C.norm()) < 0.1


@pytest.mark.parametrize(
    "hp,message",
    [
        ({"fit_target": "inv"}, "kfac.fit_target='inv' is not one of ['frobenius', 'inverse']"),
        ({"fit_target": "inverse"}, "kfac.fit_target='inverse' needs kfac.fit_damping"),
        ({"fit_target": "inverse", "fit_damping": 1e-3, "damping_kind": "pi"}, "needs kfac.damping_kind='tikhonov'"),
        ({"fit_damping": -1.0}, "kfac.fit_damping must be None or a finite number > 0"),
        ({"inverse_probes": 0}, "kfac.inverse_probes must be an integer >= 1"),
        ({"inverse_probe_kind": "normal"}, "kfac.inverse_probe_kind='normal' is not one of"),
    ],
)
def test_bad_fit_target_keys_are_one_line_errors(hp, message):
    with pytest.raises(ValueError) as err:
        make_hparams("kfac", **hp)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_structures_without_an_inverse_fit_say_which_have_one():
    stats = random_stats()
    block = create("diagonal", (M, N_IN)).fit(stats)
    with pytest.raises(NotImplementedError, match=r"^diagonal has no inverse-targeted fit .*: kfac, kpsvd, kron_sum$"):
        block.fit_inverse(stats, 1e-3)
    with pytest.raises(ValueError, match="does not take \\['fit_target'\\]"):
        make_hparams("diagonal", fit_target="inverse")
