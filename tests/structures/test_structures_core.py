"""Facts about the exact-solve structures dense, diagonal, kfac, ekfac."""

import math

import pytest
import torch
from torch import nn

import tensorcurv
from models_tiny import MODELS, batch
from reference import layer_block
from tensorcurv.linalg import vec

CORE = ["dense", "diagonal", "kfac", "ekfac"]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def fitted(structure, model_name="mlp", loss="cross_entropy", kind="ggn", **hp):
    model = MODELS[model_name]()
    data = {"mlp_nobias": "mlp"}.get(model_name, model_name)
    x, y = batch(data, loss, n=7)
    lf = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()
    curv = tensorcurv.Curvature(model, structure, kind, seed=0, **hp)
    curv.update(x, y, lf)
    return model, x, y, curv


def test_kfac_is_exact_for_a_single_linear_layer_with_mse():
    # GGN of mean-MSE over C outputs: J_sᵀ (2/C) I J_s with J_s = a_sᵀ ⊗ I  =>  C = E[aaᵀ] ⊗ (2/C) I.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    curv = tensorcurv.Curvature(model, "kfac", "ggn")
    curv.update(x, y, nn.MSELoss())
    ref = layer_block(model, x, y, "mse", "ggn", "0")
    assert rel(curv.blocks["0"].to_dense(), ref) < 1e-12
    a = torch.cat([x, torch.ones(9, 1, dtype=torch.float64)], 1)
    assert torch.allclose(curv.blocks["0"].G, (2 / 3) * torch.eye(3, dtype=torch.float64))
    assert torch.allclose(curv.blocks["0"].A, a.T @ a / 9)


@pytest.mark.parametrize("kind", ["empirical", "mc", "ggn"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "sequence"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ekfac_frobenius_error_is_at_most_kfacs(kind, model_name, seed):
    _, _, _, kf = fitted("kfac", model_name, kind=kind)
    torch.manual_seed(seed)
    _, _, _, ek = fitted("ekfac", model_name, kind=kind)
    _, _, _, de = fitted("dense", model_name, kind=kind)
    for name in de.blocks:
        C = de.blocks[name].to_dense()
        e_k = (kf.blocks[name].to_dense() - C).norm()
        e_e = (ek.blocks[name].to_dense() - C).norm()
        assert e_e <= e_k * (1 + 1e-12)


@pytest.mark.parametrize("kind", ["empirical", "ggn"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "deconv"])
def test_diagonal_equals_the_diagonal_of_the_reference(kind, model_name):
    model, x, y, curv = fitted("diagonal", model_name, kind=kind)
    for name, block in curv.blocks.items():
        ref = layer_block(model, x, y, "cross_entropy", kind, name)
        assert rel(torch.diagonal(block.to_dense()), torch.diagonal(ref)) < 1e-10


@pytest.mark.parametrize("structure", CORE)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_solve_inverts_block_plus_damping(structure, model_name):
    # solve(mv(V), λ) + λ solve(V, λ) = (C+λI)^{-1}(C+λI) V = V
    _, _, _, curv = fitted(structure, model_name)
    lam = 1e-2
    for block in curv.blocks.values():
        V = torch.randn(block.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        back = block.solve(block.mv(V), lam) + lam * block.solve(V, lam)
        assert rel(back, V) < 1e-10


@pytest.mark.parametrize("structure", CORE)
def test_mv_matches_to_dense(structure):
    _, _, _, curv = fitted(structure, "cnn")
    for block in curv.blocks.values():
        V = torch.randn(block.shape, dtype=torch.float64)
        assert rel(vec(block.mv(V)), block.to_dense() @ vec(V)) < 1e-12


def test_kfac_pi_damping_is_the_factored_inverse():
    _, _, _, curv = fitted("kfac", damping_kind="pi")
    block = curv.blocks["0"]
    lam = 1e-1
    m, n = block.shape
    pi = math.sqrt((torch.trace(block.A) / n) / (torch.trace(block.G) / m))
    eye = lambda k: torch.eye(k, dtype=torch.float64)
    dense = torch.kron(
        torch.linalg.inv(block.A + pi * math.sqrt(lam) * eye(n)),
        torch.linalg.inv(block.G + math.sqrt(lam) / pi * eye(m)),
    )
    V = torch.randn(m, n, dtype=torch.float64)
    assert rel(vec(block.solve(V, lam)), dense @ vec(V)) < 1e-10
    assert block.last_solve["damping"] == "pi"


def test_kfac_reduce_weight_sharing_uses_summed_positions():
    model, x, y, curv = fitted("kfac", "cnn", weight_sharing="reduce")
    block = curv.blocks["0"]
    stats = curv.capture(x, y, nn.CrossEntropyLoss()).stats["0"]
    a_hat = stats.a.mean(1)
    g_hat = stats.g.sum(2).reshape(-1, stats.m)
    assert torch.allclose(block.A, a_hat.T @ a_hat / stats.N)
    assert torch.allclose(block.G, g_hat.T @ g_hat / stats.N)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "kfac"])
def test_update_running_average_is_an_exponential_moving_average_of_the_block(structure):
    # dense, diagonal and kfac average quantities linear in the batch statistics (ekfac: below).
    model = MODELS["mlp"]()
    x1, y1 = batch("mlp", "cross_entropy", seed=1)
    x2, y2 = batch("mlp", "cross_entropy", seed=2)
    lf = nn.CrossEntropyLoss()
    run = tensorcurv.Curvature(model, structure, "ggn")
    run.update(x1, y1, lf, decay=0.7)
    run.update(x2, y2, lf, decay=0.7)
    first = tensorcurv.Curvature(model, structure, "ggn")
    first.update(x1, y1, lf)
    second = tensorcurv.Curvature(model, structure, "ggn")
    second.update(x2, y2, lf)
    for name in run.blocks:
        if structure == "kfac":
            b, f, s = run.blocks[name], first.blocks[name], second.blocks[name]
            assert torch.allclose(b.A, 0.7 * f.A + 0.3 * s.A) and torch.allclose(b.G, 0.7 * f.G + 0.3 * s.G)
        else:
            expect = 0.7 * first.blocks[name].to_dense() + 0.3 * second.blocks[name].to_dense()
            assert rel(run.blocks[name].to_dense(), expect) < 1e-12


def test_ekfac_update_keeps_core_consistent_with_new_basis():
    model = MODELS["mlp"]()
    lf = nn.CrossEntropyLoss()
    curv = tensorcurv.Curvature(model, "ekfac", "ggn")
    for seed in (1, 2, 3):
        x, y = batch("mlp", "cross_entropy", seed=seed)
        curv.update(x, y, lf, decay=0.5)
    for block in curv.blocks.values():
        assert torch.all(block.S >= 0)
        V = torch.randn(block.shape, dtype=torch.float64)
        assert rel(block.solve(block.mv(V), 1e-3) + 1e-3 * block.solve(V, 1e-3), V) < 1e-9


@pytest.mark.parametrize("structure", CORE)
def test_state_dict_round_trip_reproduces_solve(structure):
    model, x, y, curv = fitted(structure)
    other = tensorcurv.Curvature(model, structure, "ggn")
    other.load_state_dict(curv.state_dict())
    grads = [torch.randn_like(p) for p in model.parameters()]
    for a, b in zip(curv.solve(grads, 1e-3), other.solve(grads, 1e-3)):
        assert torch.equal(a, b)


def test_nbytes_reflects_the_stored_factors():
    _, _, _, kf = fitted("kfac")
    _, _, _, de = fitted("dense")
    assert kf.blocks["0"].nbytes == 8 * (6 * 6 + 4 * 4)
    assert de.blocks["0"].nbytes == 8 * (24 * 24)
