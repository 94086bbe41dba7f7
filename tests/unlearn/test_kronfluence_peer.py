"""kronfluence's EK-FAC peer (:mod:`tensorcurv.unlearn.peers_kronfluence`) computes tensorcurv's ``ekfac`` solve.

The agreement tests need kronfluence (the ``bench`` extra): they are skipped, through ``pytest.importorskip``,
only when it is not installed. With the same rows (the exact GGN: every class weighted ``√(K p_k)``; or the
labels drawn at ``θ*``: the empirical Fisher of those labels) and the same damping, both fit the same
eigenbases and eigenvalue corrections and apply ``Q_G [(Q_Gᵀ V Q_A) / (S + δ)] Q_Aᵀ``, so they agree to
float64 rounding: the tolerance ``1e-10`` leaves room for the conditioning of the eigendecompositions of
these tiny factors (observed ~1e-14). kronfluence works on the mean loss, tensorcurv on the sum; the peer
converts (``Δ = P(Δg)/N`` with kronfluence's damping ``d = μ/N``).
"""

import pytest
import torch

from models_tiny import cnn
from tensorcurv.unlearn import AffectedSet, Objective, StructureSolver
from tensorcurv.unlearn.peers_kronfluence import KronfluenceEKFAC, fisher_rows, kronfluence_update
from tensorcurv.unlearn.updates import gradient_difference
from unlearn_problems import data, logreg, mlp, trained

MU = 0.5
RTOL = 1e-10


def _problem(model_fn=mlp, mu=MU):
    X, y = data(n=40)
    obj = trained(model_fn(), X, y, mu)
    affected = AffectedSet.relabel(torch.tensor([1, 4, 7]), (y[[1, 4, 7]] + 1) % 3)
    return obj, X, y, affected


def _kronfluence_ihvp(obj, X, y, affected, **kwargs):
    kf = KronfluenceEKFAC(obj.model, X, y, mu=obj.mu, **kwargs)
    return kf.precondition(kf.delta_rows(affected)) / kf.N


def _tensorcurv_ekfac(obj, X, y, v, kind="ggn", damping=0.0):
    return StructureSolver("ekfac", kind=kind, damping=damping).prepare(obj, obj.theta(), X, y).solve(v).x


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_exact_ggn_rows_give_tensorcurv_ekfac_solve_at_the_objective_damping():
    pytest.importorskip("kronfluence")
    obj, X, y, affected = _problem()
    dg = gradient_difference(obj, obj.theta(), X, y, affected)
    x = _kronfluence_ihvp(obj, X, y, affected, damping="objective", labels="all")
    assert _rel(x, _tensorcurv_ekfac(obj, X, y, dg)) <= RTOL


def test_exact_ggn_rows_agree_on_a_cnn_with_strides_dilation_and_a_bias_free_conv():
    """The module matrices ``(out, c_in·k·k [+ 1])`` map back to ``θ``'s conv and linear layouts."""
    pytest.importorskip("kronfluence")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    obj = Objective(cnn(), "cross_entropy", MU)
    affected = AffectedSet.removal(torch.tensor([0, 5]))
    dg = gradient_difference(obj, obj.theta(), X, y, affected)
    x = _kronfluence_ihvp(obj, X, y, affected, damping="objective", labels="all")
    assert _rel(x, _tensorcurv_ekfac(obj, X, y, dg)) <= RTOL


def test_sampled_labels_give_the_ekfac_of_the_empirical_fisher_of_the_drawn_labels():
    """kronfluence's true Fisher: one label per point drawn from the model at ``θ*``, seeded."""
    pytest.importorskip("kronfluence")
    obj, X, y, affected = _problem()
    drawn = fisher_rows(obj.model, X, y, "sampled", seed=3).tensors[1]
    assert not torch.equal(drawn, y)
    dg = gradient_difference(obj, obj.theta(), X, y, affected)
    x = _kronfluence_ihvp(obj, X, y, affected, damping="objective", labels="sampled", seed=3)
    assert _rel(x, _tensorcurv_ekfac(obj, X, drawn, dg, kind="empirical")) <= RTOL


def test_heuristic_damping_is_a_tenth_of_the_mean_eigenvalue_correction():
    """One module (logistic regression): kronfluence's ``d = 0.1 · mean(Λ)`` on the mean scale is
    ``δ = 0.1 · mean(S)`` on tensorcurv's sum scale (``S = N Λ``); the objective's ``μ`` is not used."""
    pytest.importorskip("kronfluence")
    obj, X, y, affected = _problem(logreg)
    dg = gradient_difference(obj, obj.theta(), X, y, affected)
    plain = Objective(obj.model, "cross_entropy", 0.0)
    solver = StructureSolver("ekfac").prepare(plain, plain.theta(), X, y)
    (block,) = solver.curv.blocks.values()
    delta = 0.1 * float(block.S.mean())
    x = _kronfluence_ihvp(obj, X, y, affected, damping="heuristic", labels="all")
    assert _rel(x, _tensorcurv_ekfac(plain, X, y, dg, damping=delta)) <= RTOL


def test_update_leaves_the_model_untouched_and_reports_the_one_off_time():
    pytest.importorskip("kronfluence")
    obj, X, y, affected = _problem()
    theta_star = obj.theta()
    res = kronfluence_update(obj.model, X, y, affected, mu=MU, damping="objective", labels="all")
    assert res.ok and not res.applied and res.info["oneoff_time"] > 0 and res.info["oneoff_cpu_time"] > 0
    assert torch.equal(obj.theta(), theta_star)
    assert all(p.requires_grad for p in obj.model.parameters())
    dg = gradient_difference(obj, theta_star, X, y, affected)
    assert _rel(theta_star - res.theta, _tensorcurv_ekfac(obj, X, y, dg)) <= RTOL


def test_missing_kronfluence_is_reported_as_unavailable(monkeypatch):
    """Runs without kronfluence too: the import is simulated to fail."""
    from tensorcurv.unlearn import peers_kronfluence

    def missing():
        raise ImportError("No module named 'kronfluence'")

    monkeypatch.setattr(peers_kronfluence, "kronfluence_api", missing)
    obj, X, y, affected = _problem()
    res = kronfluence_update(obj.model, X, y, affected, mu=MU)
    assert res.status.startswith("unavailable: kronfluence is not importable") and "\n" not in res.status
    assert torch.equal(res.theta, obj.theta())


def test_untracked_parameters_are_refused():
    pytest.importorskip("kronfluence")
    X, y = data(n=20)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).double()
    with pytest.raises(ValueError, match="untracked parameters"):
        KronfluenceEKFAC(model, X, y)
