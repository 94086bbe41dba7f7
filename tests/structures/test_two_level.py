"""``two_level``: block-diagonal base + coarse correction, against dense formulas built in the test.

The dense whole-model curvature ``C`` (cross-layer blocks included) comes from ``torch.func``
(``tests/reference.py``: per-sample Jacobians and loss Hessians for ``ggn``, per-sample gradients
for ``empirical``; for ``mc`` the sampled output cotangents of the capture are pushed through
``torch.func`` Jacobians). ``B`` is each base block's ``to_dense()``, ``R0`` the coarse vectors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import tensorcurv
from models_tiny import cnn
from reference import full_block, layer_index
from tensorcurv import structures
from tensorcurv.linalg import vec

RTOL = 1e-10  # float64, all operators O(1)-conditioned after damping λ = 0.1·tr(C)/D


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def data(loss: str, n: int = 12, seed: int = 1, shape=(6,)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    y = (
        torch.randint(0, 3, (n,), generator=g)
        if loss == "cross_entropy"
        else torch.randn(n, 3, generator=g, dtype=torch.float64)
    )
    return x, y


def fitted(model, x, y, loss, kind, **hp):
    """Curvature fitted on one batch, plus the dense whole-model ``C`` in two_level's global order."""
    curv = tensorcurv.Curvature(model, structure="two_level", kind=kind, seed=0, **hp)
    res = curv.capture(x, y, loss)
    curv.fit_stats(res.stats)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    if kind == "mc":  # C = c Σ_{s,k} J_sᵀ v_sk v_skᵀ J_s with the capture's sampled cotangents v

        def f(p, xs):
            return functional_call(model, p, (xs.unsqueeze(0),)).flatten()

        Jd = vmap(jacrev(f), in_dims=(None, 0))(params, x)
        J = torch.cat([Jd[n].reshape(x.shape[0], -1, params[n].numel()) for n in names], -1)  # (N, C, P)
        Jv = torch.einsum("knc,ncp->knp", res.cotangents, J).reshape(-1, J.shape[-1])
        C = Jv.T @ Jv / x.shape[0]
    else:
        C, names, shapes = full_block(model, x, y, loss, kind)
    idx = torch.cat([layer_index(model, nm, names, shapes) for nm in curv.adapters])
    return curv, C[idx][:, idx]


def damping_for(C: torch.Tensor) -> float:
    return 0.1 * float(torch.trace(C)) / C.shape[0]


def dense_B(curv) -> torch.Tensor:
    return torch.block_diag(*[b.to_dense() for b in curv.blocks.values()])


def nicolaides_R0(curv) -> torch.Tensor:
    sizes = [m * n for m, n in curv.model_structure.shapes.values()]
    R0 = torch.zeros(len(sizes), sum(sizes), dtype=torch.float64)
    o = 0
    for i, s in enumerate(sizes):
        R0[i, o : o + s] = s**-0.5
        o += s
    return R0


def reference_preconditioner(C, B, R0, lam, variant):
    """Dense ``P^{-1}``: additive ``M⁻¹ + R0ᵀE⁻¹R0``; balanced ``(I−QA) M⁻¹ (I−AQ) + Q``."""
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    A, Minv = C + lam * eye, torch.linalg.inv(B + lam * eye)
    Q = R0.T @ torch.linalg.inv(R0 @ A @ R0.T) @ R0
    if variant == "additive":
        return Minv + Q
    return (eye - Q @ A) @ Minv @ (eye - A @ Q) + Q


def flat_solve(curv, v: torch.Tensor, lam: float) -> torch.Tensor:
    """``curv.solve`` on a global vector (two_level order), returned as a global vector."""
    ms = curv.model_structure
    grads = [None] * len(curv.params)
    by_id = {id(p): i for i, p in enumerate(curv.params)}
    for nm, M in ms.from_vector(v).items():
        ad = curv.adapters[nm]
        for (_, p), t in zip(ad.params(), ad.from_matrix(M)):
            grads[by_id[id(p)]] = t
    out = curv.solve(grads, lam)
    return torch.cat(
        [
            vec(curv.adapters[nm].to_matrix([out[by_id[id(p)]] for _, p in curv.adapters[nm].params()]))
            for nm in ms.shapes
        ]
    )


def rel(a, b):
    return float((a - b).norm() / b.norm())


KINDS = ["ggn", "empirical", "mc"]
LOSSES = ["cross_entropy", "mse"]


# ---------------------------------------------------------------------- coarse matrix
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", KINDS)
def test_coarse_matrix_from_projections_equals_R0_C_R0T(kind, loss):
    model = net()
    x, y = data(loss)
    curv, C = fitted(model, x, y, loss, kind)
    R0 = nicolaides_R0(curv)
    ref = R0 @ C @ R0.T
    assert rel(curv.model_structure.coarse_matrix(), ref) < RTOL


def test_coarse_matrix_of_a_conv_net_sums_over_positions():
    model = cnn()
    x, y = data("cross_entropy", n=5, shape=(2, 5, 5))
    curv, C = fitted(model, x, y, "cross_entropy", "ggn", coarse_space="spectral", coarse_vectors_per_layer=2)
    R0 = curv.model_structure.restriction()
    assert rel(curv.model_structure.coarse_matrix(), R0 @ C @ R0.T) < RTOL


def test_coarse_matrix_couples_layers():
    model = net()
    x, y = data("cross_entropy")
    curv, _ = fitted(model, x, y, "cross_entropy", "ggn")
    C0 = curv.model_structure.coarse_matrix()
    off = C0 - torch.diag(torch.diag(C0))
    assert off.abs().max() > 1e-3 * C0.abs().max()


# ---------------------------------------------------------------------- solve vs dense formula
@pytest.mark.parametrize("variant", ["additive", "balanced"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", KINDS)
def test_nicolaides_solve_equals_dense_formula(kind, loss, variant):
    model = net()
    x, y = data(loss)
    curv, C = fitted(model, x, y, loss, kind, base="kfac", coarse_space="nicolaides", variant=variant)
    lam = damping_for(C)
    v = torch.randn(C.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = reference_preconditioner(C, dense_B(curv), nicolaides_R0(curv), lam, variant) @ v
    assert rel(flat_solve(curv, v, lam), ref) < RTOL


@pytest.mark.parametrize("variant", ["additive", "balanced"])
@pytest.mark.parametrize("base", ["kfac", "ekfac", "dense", "diagonal"])
def test_spectral_solve_equals_dense_formula(base, variant):
    model = net()
    x, y = data("cross_entropy")
    curv, C = fitted(
        model,
        x,
        y,
        "cross_entropy",
        "ggn",
        base=base,
        coarse_space="spectral",
        coarse_vectors_per_layer=3,
        variant=variant,
    )
    lam = damping_for(C)
    v = torch.randn(C.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = reference_preconditioner(C, dense_B(curv), curv.model_structure.restriction(), lam, variant) @ v
    assert rel(flat_solve(curv, v, lam), ref) < RTOL


def test_balanced_solve_of_a_conv_net_equals_dense_formula():
    model = cnn()
    x, y = data("mse", n=5, shape=(2, 5, 5))
    curv, C = fitted(model, x, y, "mse", "ggn", variant="balanced")
    lam = damping_for(C)
    v = torch.randn(C.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = reference_preconditioner(C, dense_B(curv), nicolaides_R0(curv), lam, "balanced") @ v
    assert rel(flat_solve(curv, v, lam), ref) < RTOL


def test_solve_accepts_a_dict_of_named_gradients():
    model = net()
    x, y = data("cross_entropy")
    curv, C = fitted(model, x, y, "cross_entropy", "ggn", variant="balanced")
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    out = curv.solve(g, 0.01)
    assert set(out) == set(g) and all(out[n].shape == g[n].shape for n in g)
    assert (
        rel(
            torch.cat([t.flatten() for t in curv.solve(list(g.values()), 0.01)]),
            torch.cat([out[n].flatten() for n in g]),
        )
        < 1e-14
    )


# ---------------------------------------------------------------------- facts of the preconditioners
@pytest.mark.parametrize("variant", ["additive", "balanced"])
def test_preconditioner_is_symmetric_positive_definite(variant):
    model = net()
    x, y = data("cross_entropy")
    curv, C = fitted(
        model, x, y, "cross_entropy", "empirical", coarse_space="spectral", coarse_vectors_per_layer=2, variant=variant
    )
    P = curv.model_structure.dense_preconditioner(damping_for(C))
    assert rel(P, P.T) < 1e-12
    assert torch.linalg.eigvalsh(0.5 * (P + P.T)).min() > 0


def test_balanced_preconditioner_is_exact_on_the_coarse_space():
    model = net()
    x, y = data("mse")
    curv, C = fitted(model, x, y, "mse", "ggn", coarse_space="spectral", coarse_vectors_per_layer=2, variant="balanced")
    lam = damping_for(C)
    R0 = curv.model_structure.restriction()
    A = C + lam * torch.eye(C.shape[0], dtype=C.dtype)
    for z in R0:  # P⁻¹ A z = z for every coarse vector z
        assert rel(flat_solve(curv, A @ z, lam), z) < RTOL


def test_balanced_residual_has_no_coarse_component():
    model = net()
    x, y = data("cross_entropy")
    curv, C = fitted(model, x, y, "cross_entropy", "ggn", variant="balanced")
    lam = damping_for(C)
    g = torch.randn(C.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = g - (C + lam * torch.eye(C.shape[0], dtype=C.dtype)) @ flat_solve(curv, g, lam)
    R0 = nicolaides_R0(curv)
    assert float((R0 @ r).norm()) < 1e-10 * float(g.norm())


def condition_ratio(base, coarse_space, k, variant, seed=0):
    """κ(P^{1/2} A P^{1/2}) with the two-level ``P`` over the same with ``(B+λI)^{-1}`` alone; A = C+λI."""
    model = net(seed)
    x, y = data("cross_entropy", n=32)
    curv, C = fitted(
        model,
        x,
        y,
        "cross_entropy",
        "ggn",
        base=base,
        coarse_space=coarse_space,
        coarse_vectors_per_layer=k,
        variant=variant,
    )
    lam = damping_for(C)
    eye = torch.eye(C.shape[0], dtype=C.dtype)

    def kappa(P):
        L = torch.linalg.cholesky(0.5 * (P + P.T))
        ev = torch.linalg.eigvalsh(L.T @ (C + lam * eye) @ L)
        return float(ev.max() / ev.min())

    return kappa(curv.model_structure.dense_preconditioner(lam)) / kappa(torch.linalg.inv(dense_B(curv) + lam * eye))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("coarse_space,k", [("nicolaides", 1), ("spectral", 1)])
def test_balanced_correction_never_raises_condition_number_of_exact_block_jacobi(coarse_space, k, seed):
    """Deflation theorem: with exact diagonal blocks the spectrum of (B+λI)⁻¹A contains 1 and the
    balanced correction maps the coarse part to 1, leaving the rest of the spectrum inside."""
    assert condition_ratio("dense", coarse_space, k, "balanced", seed) <= 1 + 1e-9


@pytest.mark.parametrize("variant", ["additive", "balanced"])
@pytest.mark.parametrize("base", ["dense", "kfac"])
def test_spectral_coarse_correction_lowers_condition_number_of_coupled_layers(base, variant):
    """Measured (3-layer tanh net, GGN, λ = 0.1·tr(C)/D, seeds 0–2): ratio 0.05–0.23 with three
    spectral vectors per layer. Nicolaides helps only the balanced variant (0.74–0.98; additive
    0.98–1.20), in line with Koroko et al.'s finding that two-level corrections add little to K-FAC."""
    assert condition_ratio(base, "spectral", 3, variant) < 0.5


# ---------------------------------------------------------------------- coarse spaces
def test_nicolaides_restriction_is_one_normalized_indicator_per_layer():
    model = net()
    x, y = data("cross_entropy")
    curv, _ = fitted(model, x, y, "cross_entropy", "ggn")
    assert torch.allclose(curv.model_structure.restriction(), nicolaides_R0(curv), rtol=1e-15, atol=0)


@pytest.mark.parametrize("base", ["kfac", "ekfac", "dense", "diagonal"])
def test_spectral_coarse_vectors_are_leading_eigenvectors_of_base_blocks(base):
    model = net()
    x, y = data("mse")
    k = 3
    curv, _ = fitted(model, x, y, "mse", "ggn", base=base, coarse_space="spectral", coarse_vectors_per_layer=k)
    ms = curv.model_structure
    for nm, block in curv.blocks.items():
        Bl = block.to_dense()
        Z = vec(ms.Z[nm]).T  # (mn, k)
        top = torch.linalg.eigvalsh(Bl).flip(0)[:k]
        assert torch.allclose(Z.T @ Z, torch.eye(k, dtype=Z.dtype), atol=1e-12)
        assert torch.allclose(Bl @ Z, Z * top, atol=1e-10 * float(top[0]))


def test_generic_base_spectral_vectors_by_subspace_iteration_match_eigh():
    from tensorcurv.structures.generic import subspace_iteration

    model = net()
    x, y = data("cross_entropy")
    curv, _ = fitted(model, x, y, "cross_entropy", "ggn", base="dense")
    block = curv.blocks["0"]
    vals, V = subspace_iteration(block, 2, block.C)
    ref_vals, _ = block.leading_eigenpairs(2)
    assert torch.allclose(vals, ref_vals, rtol=1e-8)
    Z = vec(V).T
    assert torch.allclose(block.C @ Z, Z * vals, atol=1e-6 * float(vals[0]))


# ---------------------------------------------------------------------- running average, state
def test_ema_update_with_fixed_coarse_space_is_the_average_of_restricted_curvature():
    model = net()
    loss = "cross_entropy"
    (x1, y1), (x2, y2) = data(loss, seed=1), data(loss, seed=2)
    curv = tensorcurv.Curvature(model, structure="two_level", kind="ggn", variant="balanced")
    curv.update(x1, y1, loss)
    curv.update(x2, y2, loss, decay=0.7)
    idx = None
    Cs = []
    for x, y in ((x1, y1), (x2, y2)):
        C, names, shapes = full_block(model, x, y, loss, "ggn")
        idx = torch.cat([layer_index(model, nm, names, shapes) for nm in curv.adapters])
        Cs.append(C[idx][:, idx])
    C = 0.7 * Cs[0] + 0.3 * Cs[1]
    lam = damping_for(C)
    v = torch.randn(C.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref = reference_preconditioner(C, dense_B(curv), nicolaides_R0(curv), lam, "balanced") @ v
    assert rel(flat_solve(curv, v, lam), ref) < RTOL


def test_spectral_running_average_of_a_repeated_batch_equals_its_fit():
    """Same batch again: the averaged base blocks and hence the coarse span are unchanged, so the
    carried ``C Z_old (Z_oldᵀ Z)`` is exact (eigenvector signs/order may differ between calls)."""
    model = net()
    x, y = data("mse")
    hp = dict(
        structure="two_level", kind="ggn", coarse_space="spectral", coarse_vectors_per_layer=2, variant="balanced"
    )
    once, twice = tensorcurv.Curvature(model, **hp), tensorcurv.Curvature(model, **hp)
    once.update(x, y, "mse")
    twice.update(x, y, "mse")
    twice.update(x, y, "mse", decay=0.6)
    g = [torch.randn_like(p) for p in model.parameters()]
    a, b = once.solve(g, 0.05), twice.solve(g, 0.05)
    assert rel(torch.cat([t.flatten() for t in b]), torch.cat([t.flatten() for t in a])) < 1e-10


def test_state_dict_round_trip_reproduces_the_solve():
    model = net()
    x, y = data("mse")
    curv, C = fitted(model, x, y, "mse", "ggn", coarse_space="spectral", coarse_vectors_per_layer=2, variant="balanced")
    other = tensorcurv.Curvature(
        model,
        structure="two_level",
        kind="ggn",
        coarse_space="spectral",
        coarse_vectors_per_layer=2,
        variant="balanced",
    )
    other.load_state_dict(curv.state_dict())
    g = [torch.randn_like(p) for p in model.parameters()]
    for a, b in zip(curv.solve(g, 0.05), other.solve(g, 0.05)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- operator views & cost
def test_mv_and_to_dense_are_the_block_diagonal_base():
    model = net()
    x, y = data("cross_entropy")
    curv, C = fitted(model, x, y, "cross_entropy", "ggn")
    ms = curv.model_structure
    v = torch.randn(C.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    Bv = ms.to_vector(ms.mv(ms.from_vector(v)))
    assert rel(Bv, dense_B(curv) @ v) < 1e-13
    assert torch.equal(ms.to_dense(), dense_B(curv))


def test_nbytes_counts_base_blocks_and_coarse_level():
    model = net()
    x, y = data("cross_entropy")
    curv, C = fitted(model, x, y, "cross_entropy", "ggn", coarse_space="spectral", coarse_vectors_per_layer=2)
    ms = curv.model_structure
    D, q = C.shape[0], ms.coarse_dim
    base = sum(b.nbytes for b in curv.blocks.values())
    assert curv.nbytes == base + 8 * (2 * D + q * D + q * q)  # Z (k=2 per layer), U = C Z, C0
    assert ms.solve_flops() > sum(b.solve_flops() for b in curv.blocks.values())
    assert ms.coarse_fit_time > 0 and ms.fit_time >= ms.coarse_fit_time
    assert all(b.fit_time > 0 for b in curv.blocks.values())


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "hp,key",
    [
        ({"base": "nope"}, "two_level.base"),
        ({"base": "two_level"}, "two_level.base"),
        ({"base_hparams": {"rank": 2}}, "two_level.base_hparams"),
        ({"coarse_space": "krylov"}, "two_level.coarse_space"),
        ({"variant": "hybrid"}, "two_level.variant"),
        ({"coarse_matrix": "kronecker", "variant": "balanced"}, "two_level.coarse_matrix"),
        ({"coarse_space": "residual", "coarse_vectors_per_layer": 2}, "two_level.coarse_vectors_per_layer"),
        ({"coarse_space": "spectral", "coarse_vectors_per_layer": 0}, "two_level.coarse_vectors_per_layer"),
        ({"coarse_vectors_per_layer": 2}, "two_level.coarse_vectors_per_layer"),
    ],
)
def test_invalid_hyperparameters_name_the_key(hp, key):
    with pytest.raises(ValueError, match=key):
        tensorcurv.Curvature(net(), structure="two_level", **hp)


def test_unknown_base_lists_the_valid_ones():
    with pytest.raises(ValueError, match="kfac"):
        structures.make_hparams("two_level", base="nope")


def test_more_coarse_vectors_than_a_layer_has_parameters_is_an_error():
    with pytest.raises(ValueError, match="exceeds the 15 parameters of layer '4'"):
        tensorcurv.Curvature(net(), structure="two_level", coarse_space="spectral", coarse_vectors_per_layer=16)


def test_empty_coarse_space_is_impossible():
    with pytest.raises(ValueError, match="dimension 0"):
        tensorcurv.Curvature(nn.Sequential(nn.Tanh()), structure="two_level")


def test_solve_before_fit_is_an_error():
    curv = tensorcurv.Curvature(net(), structure="two_level")
    with pytest.raises(RuntimeError, match="no statistics yet"):
        curv.solve([torch.zeros_like(p) for p in curv.params], 0.1)
