"""Facts about ``kron_sum`` / ``kpsvd`` (float64, tiny layers, dense reference from the ``dense`` structure)."""

import pytest
import torch
from torch import nn

import tensorcurv
from structure_problems import KINDS, rel, tiny_batch, tiny_model
from tensorcurv import structures
from tensorcurv.linalg import unvec, vec
from tensorcurv.linalg.rearrange import rearrange

TIGHT = dict(psd="none", tol=1e-15, max_iter=3000, warm_max_iter=None, oversample=4)


def fit(model_name, kind, structure, n=10, **hp):
    if structure == "kron_sum":  # these facts are about the shrink repair unless a test names another mode
        hp.setdefault("psd", "shrink")
    model = tiny_model(model_name)
    x, y = tiny_batch(model_name, n)
    curv = tensorcurv.Curvature(model, structure=structure, kind=kind, seed=0, **hp)
    curv.update(x, y, nn.CrossEntropyLoss())
    return curv


def optimum(C, shape, r):
    s = torch.linalg.svdvals(rearrange(C, shape))
    return float(s[r:].pow(2).sum().sqrt() / C.norm())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", ["linear", "conv"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_frobenius_error_equals_the_eckart_young_optimum(rank, model_name, kind):
    dense = fit(model_name, kind, "dense")
    ks = fit(model_name, kind, "kron_sum", rank=rank, **TIGHT)
    for name, block in ks.blocks.items():
        C = dense.blocks[name].to_dense()
        err, opt = rel(block.to_dense(), C), optimum(C, block.shape, rank)
        if opt < 1e-12:  # R(C) has rank <= r: the fit must be exact up to roundoff
            assert err < 1e-12, name
        else:
            assert abs(err / opt - 1) < 1e-6, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", ["linear", "conv"])
def test_rank_one_is_never_worse_than_kfac(model_name, kind):
    dense, kfac = fit(model_name, kind, "dense"), fit(model_name, kind, "kfac")
    kp = fit(model_name, kind, "kpsvd", **TIGHT)
    for name, block in kp.blocks.items():
        C = dense.blocks[name].to_dense()
        assert rel(block.to_dense(), C) <= rel(kfac.blocks[name].to_dense(), C) * (1 + 1e-12)


def test_errors_are_non_increasing_in_the_rank():
    C = fit("conv", "empirical", "dense").blocks["0"].to_dense()
    errs = [rel(fit("conv", "empirical", "kron_sum", rank=r, **TIGHT).blocks["0"].to_dense(), C) for r in range(1, 5)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:])), errs


def test_full_rank_reproduces_the_dense_block():
    C = fit("linear", "ggn", "dense").blocks["2"].to_dense()  # m = 4: R(C) has rank <= 16
    block = fit("linear", "ggn", "kron_sum", rank=16, **TIGHT).blocks["2"]
    assert rel(block.to_dense(), C) < 1e-10


def test_kpsvd_is_the_rank_one_kron_sum():
    a = fit("linear", "mc", "kpsvd", **TIGHT).blocks["0"].to_dense()
    b = fit("linear", "mc", "kron_sum", rank=1, **TIGHT).blocks["0"].to_dense()
    assert rel(a, b) < 1e-12


def test_weight_sharing_blocks_can_have_an_antisymmetric_second_pair_that_mv_applies_correctly():
    block = fit("conv", "empirical", "kron_sum", rank=2, damping_kind="pi").blocks["0"]
    A1 = block.A[1]
    assert torch.allclose(A1, -A1.T) and torch.allclose(block.G[1], -block.G[1].T)
    assert not block.exact_solve  # simultaneous diagonalization needs symmetric pairs: PCG instead
    V = torch.randn(block.shape, dtype=torch.float64)
    assert rel(block.mv(V), unvec(block.to_dense() @ vec(V), *block.shape)) < 1e-12


def test_mv_matches_to_dense():
    block = fit("conv", "ggn", "kron_sum", rank=3).blocks["0"]
    V = torch.randn(block.shape, dtype=torch.float64)
    assert rel(block.mv(V), unvec(block.to_dense() @ vec(V), *block.shape)) < 1e-12


@pytest.mark.parametrize("rank,psd", [(1, "shrink"), (1, "none")])
def test_rank_one_solve_is_exact(rank, psd):
    block = fit("conv", "empirical", "kron_sum", rank=rank, psd=psd).blocks["0"]
    assert block.exact_solve
    V, lam = torch.randn(block.shape, dtype=torch.float64), 1e-3
    X = block.solve(V, lam)
    M = block.to_dense() + lam * torch.eye(V.numel(), dtype=V.dtype)
    assert rel(vec(X), torch.linalg.solve(M, vec(V))) < 1e-10


def test_rank_two_pi_damped_solve_is_exact_simultaneous_diagonalization():
    block = fit("linear", "ggn", "kron_sum", rank=2, damping_kind="pi").blocks["0"]
    assert block.exact_solve
    V, lam = torch.randn(block.shape, dtype=torch.float64), 1e-3
    X = block.solve(V, lam)
    Ba, Bg = block._factored_terms(lam)
    M = torch.kron(Ba, Bg) + torch.kron(block.A[1], block.G[1])
    assert block.last_solve["method"] == "simultaneous-diagonalization"
    assert rel(vec(X), torch.linalg.solve(M, vec(V))) < 1e-10


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_tikhonov_solve_by_pcg_reaches_the_requested_tolerance(rank):
    block = fit("conv", "ggn", "kron_sum", rank=rank, pcg_tol=1e-9).blocks["0"]
    assert not block.exact_solve
    V, lam = torch.randn(block.shape, dtype=torch.float64), 1e-3
    X = block.solve(V, lam)
    M = block.to_dense() + lam * torch.eye(V.numel(), dtype=V.dtype)
    assert block.last_solve["method"] == "pcg" and block.last_solve["converged"]
    assert float((M @ vec(X) - vec(V)).norm() / V.norm()) <= 1e-9
    assert block.last_solve["iterations"] < 60


@pytest.mark.parametrize("rank", [2, 3])
def test_shrink_makes_an_indefinite_fit_positive_semidefinite(rank):
    raw = fit("conv", "empirical", "kron_sum", rank=rank, psd="none").blocks["0"].to_dense()
    block = fit("conv", "empirical", "kron_sum", rank=rank, psd="shrink").blocks["0"]
    assert float(torch.linalg.eigvalsh(raw)[0]) < -1e-6 * float(raw.norm())  # the raw fit is indefinite
    assert block.last_fit["psd_scale"] < 1
    assert float(torch.linalg.eigvalsh(block.to_dense())[0]) >= -1e-12 * float(raw.norm())


def test_shrink_for_rank_two_is_the_largest_psd_scaling():
    block = fit("conv", "empirical", "kron_sum", rank=2, psd="shrink").blocks["0"]
    t = block.last_fit["psd_scale"]
    A, G = block.A.clone(), block.G.clone()
    A[1] = A[1] / t * (t * 1.01)  # a 1% larger scale of the second term
    worse = torch.kron(A[0], G[0]) + torch.kron(A[1], G[1])
    assert float(torch.linalg.eigvalsh(worse)[0]) < 0


def test_update_is_the_truncated_svd_of_the_averaged_approximations():
    model = tiny_model("linear")
    (x1, y1), (x2, y2) = tiny_batch("linear", 10, seed=1), tiny_batch("linear", 10, seed=2)
    curv = tensorcurv.Curvature(model, "kron_sum", "empirical", rank=2, **TIGHT)
    curv.update(x1, y1, nn.CrossEntropyLoss())
    old = curv.blocks["0"].to_dense()
    batch = tensorcurv.Curvature(model, "kron_sum", "empirical", rank=2, **TIGHT)
    batch.update(x2, y2, nn.CrossEntropyLoss())
    curv.update(x2, y2, nn.CrossEntropyLoss(), decay=0.7)
    target = 0.7 * old + 0.3 * batch.blocks["0"].to_dense()
    U, S, Vh = torch.linalg.svd(rearrange(target, curv.blocks["0"].shape))
    best = (U[:, :2] * S[:2]) @ Vh[:2]
    assert rel(rearrange(curv.blocks["0"].to_dense(), curv.blocks["0"].shape), best) < 1e-8


def test_warm_started_refit_reports_fewer_products_than_the_cold_fit():
    model = tiny_model("linear")
    x, y = tiny_batch("linear", 10)
    curv = tensorcurv.Curvature(model, "kpsvd", "ggn", method="power", tol=1e-10, max_iter=500)
    curv.update(x, y, nn.CrossEntropyLoss())
    cold = curv.blocks["0"].last_fit
    curv.update(x, y, nn.CrossEntropyLoss())
    warm = curv.blocks["0"].last_fit
    assert not cold["warm_start"] and warm["warm_start"]
    assert warm["products"] < cold["products"] and warm["iterations"] == 1


def test_invalid_rank_and_options_raise_clear_errors():
    with pytest.raises(ValueError, match="kron_sum.rank=30 exceeds"):
        structures.create("kron_sum", (5, 7), psd="shrink", rank=30)
    with pytest.raises(ValueError, match="kron_sum.rank must be an integer"):
        structures.create("kron_sum", (5, 7), psd="shrink", rank=0)
    with pytest.raises(ValueError, match="kron_sum.psd='clip' is not one of"):
        structures.create("kron_sum", (5, 7), psd="clip")


def test_nbytes_counts_the_two_factor_stacks():
    block = fit("linear", "ggn", "kron_sum", rank=3).blocks["0"]
    m, n = block.shape
    assert block.nbytes == 3 * (m * m + n * n) * 8


@pytest.mark.parametrize("method", ["power", "gram"])
def test_resume_from_state_dict_refits_bitwise_like_the_uninterrupted_run(method):
    curv = tensorcurv.Curvature(tiny_model("linear"), "dense", "ggn")
    s1, s2 = (curv.capture(*tiny_batch("linear", 10, seed=seed), nn.CrossEntropyLoss()).stats["0"] for seed in (1, 2))
    hp = dict(psd="shrink", rank=2, method=method, oversample=2, tol=1e-6)
    run = structures.create("kron_sum", s1.shape, **hp).fit(s1)
    run.update(s1, decay=0.9)
    resumed = structures.create("kron_sum", s1.shape, **hp)
    resumed.load_state_dict(run.state_dict())
    before = run.generator.get_state().clone()
    for block in (run, resumed):
        block.update(s2, decay=0.9)
        block.update(s1, decay=0.9)
    assert not torch.equal(run.generator.get_state(), before)  # the refits drew random start columns
    assert all(torch.equal(run.tensors()[k], resumed.tensors()[k]) for k in ("A", "G"))


@pytest.mark.parametrize(
    "model_name, how", [("linear", "certificate (one-signed sample weights)"), ("conv", "cholesky certificate")]
)
def test_rank_one_fit_is_positive_semidefinite_without_clipping(model_name, how):
    shrink = fit(model_name, "ggn", "kron_sum", rank=1).blocks["0"]
    raw = fit(model_name, "ggn", "kron_sum", rank=1, psd="none").blocks["0"]
    assert shrink.last_fit["psd_method"] == how
    assert torch.equal(shrink.A, raw.A) and torch.equal(shrink.G, raw.G)  # the Eckart–Young pair itself
    C = shrink.to_dense()
    assert float(torch.linalg.eigvalsh(C)[0]) >= -1e-12 * float(C.norm())


def test_rank_one_update_keeps_the_psd_certificate():
    model = tiny_model("linear")
    curv = tensorcurv.Curvature(model, "kpsvd", "ggn")
    for seed in (1, 2):
        curv.update(*tiny_batch("linear", 10, seed=seed), nn.CrossEntropyLoss(), decay=0.8)
    block = curv.blocks["0"]
    assert block.last_fit["recompressed"] and block.last_fit["psd_method"].startswith("certificate")
    C = block.to_dense()
    assert float(torch.linalg.eigvalsh(C)[0]) >= -1e-12 * float(C.norm())


@pytest.mark.parametrize("rank", [2, 3])
def test_certified_shrink_without_eigendecompositions_is_positive_semidefinite(rank):
    block = fit("linear", "empirical", "kron_sum", rank=rank, psd_proof="spectral").blocks["0"]
    assert block.last_fit["psd_method"] == "cholesky + certified Lanczos bounds"
    C = block.to_dense()
    assert float(torch.linalg.eigvalsh(C)[0]) >= -1e-12 * float(C.norm())


def test_certified_rank_two_shrink_is_within_one_percent_of_the_largest_psd_scaling():
    block = fit("linear", "ggn", "kron_sum", rank=2, psd_proof="spectral").blocks["0"]
    t = block.last_fit["psd_scale"]
    assert block.last_fit["psd_method"] == "cholesky + certified Lanczos bounds" and t < 1
    A = block.A.clone()
    A[1] = A[1] * 1.01  # a 1% larger scale of the second term
    worse = torch.kron(A[0], block.G[0]) + torch.kron(A[1], block.G[1])
    assert float(torch.linalg.eigvalsh(worse)[0]) < 0


@pytest.mark.parametrize("kind", ["empirical", "ggn"])
def test_gram_fit_terms_are_sample_pair_combinations_of_rank_one_kronecker_products(kind):
    from structure_problems import curvature
    from tensorcurv.linalg.rearrange import kronecker_svd

    st = curvature("linear", kind)[1]["0"]
    info = {}
    sigma, A, G = kronecker_svd(st, 3, method="gram", tol=1e-12, info=info)
    ca, cg = info["sample_coefficients"]
    a, g = st.a[:, 0], st.g[:, :, 0]
    Aterm = torch.einsum("si,sj->sij", a, a)
    Gterm = torch.einsum("ski,skj->sij", g, g)  # Σ_k' g_uk' g_uk'ᵀ
    C_pairs = torch.einsum("su,sij,ukl->ikjl", ca @ cg.T, Aterm, Gterm).reshape(st.n * st.m, -1)
    C_hat = sum(s * torch.kron(x, y) for s, x, y in zip(sigma, A, G))
    assert rel(C_pairs, C_hat) < 1e-12


@pytest.mark.parametrize("rank", [3, 4])
def test_sample_space_certificate_makes_rank_three_and_four_fits_positive_semidefinite(rank):
    from tensorcurv.structures.kron_sum.certificates import SAMPLE_PROOF

    raw = fit("linear", "empirical", "kron_sum", rank=rank, psd="none", method="gram").blocks["0"].to_dense()
    block = fit("linear", "empirical", "kron_sum", rank=rank, method="gram", psd_proof="samples").blocks["0"]
    assert block.last_fit["psd_method"] == SAMPLE_PROOF
    assert float(torch.linalg.eigvalsh(raw)[0]) < -1e-6 * float(raw.norm())  # the raw fit is indefinite
    assert float(torch.linalg.eigvalsh(block.to_dense())[0]) >= -1e-12 * float(raw.norm())


def test_sample_space_scale_is_the_largest_that_keeps_every_sample_pair_weight_nonnegative():
    from tensorcurv.structures.kron_sum.certificates import sample_psd_scale

    g = torch.Generator().manual_seed(0)
    ca = torch.randn(30, 4, generator=g, dtype=torch.float64)
    cg = torch.randn(30, 4, generator=g, dtype=torch.float64)
    ca[:, 0], cg[:, 0] = ca[:, 0].abs() + 0.1, cg[:, 0].abs() + 0.1
    t = sample_psd_scale(ca, cg, chunk=7)
    P1, Q = torch.outer(ca[:, 0], cg[:, 0]), ca[:, 1:] @ cg[:, 1:].T
    assert 0 < t < 1
    assert float((P1 + t * Q).min()) >= -1e-12 and float((P1 + 1.001 * t * Q).min()) < 0
    cg[3] = 0.0  # a sample with a zero leading weight (and no other weight): the general path, same rule
    t0 = sample_psd_scale(ca, cg, chunk=7)
    P1, Q = torch.outer(ca[:, 0], cg[:, 0]), ca[:, 1:] @ cg[:, 1:].T
    assert t0 > 0 and float((P1 + t0 * Q).min()) >= -1e-12 and float((P1 + 1.001 * t0 * Q).min()) < 0
    cg[5, 0] = -1.0  # leading weights of both signs: no certificate
    assert sample_psd_scale(ca, cg) is None


def test_invalid_psd_proof_raises_a_clear_error():
    with pytest.raises(ValueError, match="kron_sum.psd_proof='exact' is not one of"):
        structures.create("kron_sum", (5, 7), psd_proof="exact")


@pytest.mark.parametrize("kind", ["empirical", "ggn"])
def test_auto_psd_proof_on_small_blocks_is_the_exact_scale_and_beats_the_sample_and_spectral_proofs(kind):
    scales = {
        proof: fit("linear", kind, "kron_sum", rank=3, method="gram", psd_proof=proof).blocks["0"].last_fit["psd_scale"]
        for proof in ("samples", "spectral", "dense", "auto")
    }
    assert scales["auto"] == scales["dense"] >= max(scales["samples"], scales["spectral"])


def _stats_stream(kind, n=40, seeds=range(1, 5)):
    curv = tensorcurv.Curvature(tiny_model("linear"), "dense", kind)
    return [curv.capture(*tiny_batch("linear", n, seed=s), nn.CrossEntropyLoss()).stats["0"] for s in seeds]


@pytest.mark.parametrize("proof", ["auto", "samples", "spectral"])
@pytest.mark.parametrize("kind", ["empirical", "ggn"])
def test_running_average_updates_at_rank_four_stay_positive_semidefinite(kind, proof):
    sts = _stats_stream(kind)
    block = structures.create("kron_sum", sts[0].shape, psd="shrink", rank=4, method="gram", psd_proof=proof).fit(
        sts[0]
    )
    for st in sts[1:]:
        block.update(st, 0.9)
        C = block.to_dense()
        assert float(torch.linalg.eigvalsh(C)[0]) >= -1e-10 * float(C.norm())


@pytest.mark.parametrize("n", [40, 80])  # ggn: one-signed leading sample weights (the batch certificate exists)
def test_interval_certified_update_is_the_recompressed_mix_of_psd_fits_with_its_tail_scaled_and_is_psd(n, monkeypatch):
    from tensorcurv.structures.kron_sum import structure as ks

    monkeypatch.setattr(ks, "INTERVAL_ACCEPT", 0.0)  # take the interval certificate whatever its t
    sts = _stats_stream("ggn", n=n)
    block = structures.create("kron_sum", sts[0].shape, psd="shrink", rank=3, method="gram", psd_proof="samples").fit(
        sts[0]
    )
    batch = structures.create(
        "kron_sum", sts[0].shape, psd="shrink", rank=3, method="gram", psd_proof="samples"
    )  # PSD batch fit
    for st in sts[1:]:
        batch.load_state_dict(block.state_dict())  # the update's batch fit: same warm start and random columns
        old_A, old_G = block.A.clone(), block.G.clone()
        block.update(st, 0.9)
        batch.fit(st)
        assert block.last_fit["psd_method"] == ks.INTERVAL_PROOF
        t = block.last_fit["psd_scale"]
        A, G = ks.recompress(torch.cat([0.9 * old_A, 0.1 * batch.A]), torch.cat([old_G, batch.G]), 3)
        A[1:] *= t
        assert rel(block.A, A) < 1e-12 and rel(block.G, G) < 1e-12
        C = block.to_dense()
        assert float(torch.linalg.eigvalsh(C)[0]) >= -1e-10 * float(C.norm())


def _psd_atoms(q, d, g):
    X = torch.randn(q, d, 2, generator=g, dtype=torch.float64)
    return X @ X.transpose(-1, -2)  # rank-2 PSD atoms


def _loewner_ok(M, tol=1e-10):
    return float(torch.linalg.eigvalsh(M)[0]) >= -tol * float(M.norm())


def test_sample_intervals_bound_every_factor_between_multiples_of_the_leading_one():
    from tensorcurv.structures.kron_sum.certificates import sample_intervals

    g = torch.Generator().manual_seed(0)
    S = _psd_atoms(12, 5, g)
    c = torch.randn(12, 3, generator=g, dtype=torch.float64)
    c[:, 0] = c[:, 0].abs() + 0.1
    F = torch.einsum("sk,sij->kij", c, S)
    iv = sample_intervals(c)
    for k in (1, 2):
        lo, hi = iv[k - 1]
        assert _loewner_ok(F[k] - lo * F[0]) and _loewner_ok(hi * F[0] - F[k])
    c[2, 0] = -0.1
    assert sample_intervals(c) is None  # leading weights of both signs: no interval


def test_mixed_intervals_bound_recompressed_factors_against_a_psd_reference_below_the_leading_one():
    from tensorcurv.structures.kron_sum.certificates import interval_part, mixed_intervals

    g = torch.Generator().manual_seed(1)
    iv = torch.tensor([[1.0, 1.0], [-0.4, 0.3], [-0.2, 0.5]], dtype=torch.float64)
    inputs, refs = [], []
    for _ in range(2):  # two groups (old state, batch): X_j and two factors inside their intervals
        M = torch.randn(6, 6, generator=g, dtype=torch.float64)
        X = M @ M.T
        F = [X]
        for lo, hi in iv[1:]:
            Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
            D = (Q * torch.rand(6, generator=g, dtype=torch.float64)) @ Q.T  # 0 ⪯ D ⪯ I
            F.append(lo * X + (hi - lo) * (M @ D @ M.T))  # lo X ⪯ F ⪯ hi X
        inputs.append(torch.stack(F)), refs.append(X)
    c = torch.randn(6, 3, generator=g, dtype=torch.float64)
    c[:, 0] = torch.tensor([0.9, 0.05, -0.05, 0.1, 0.01, 0.02], dtype=torch.float64)
    Fn = torch.einsum("ik,inm->knm", c, torch.cat(inputs))
    out = mixed_intervals([interval_part(c[:3], iv), interval_part(c[3:], iv)])
    L1 = [float(torch.minimum(c[o : o + 3, :1] * iv[:, :1], c[o : o + 3, :1] * iv[:, 1:]).sum()) for o in (0, 3)]
    B = L1[0] * refs[0] + L1[1] * refs[1]
    assert min(L1) > 0 and _loewner_ok(Fn[0] - B)
    for k in (1, 2):
        lo, hi = out[k - 1]
        assert _loewner_ok(Fn[k] - lo * B) and _loewner_ok(hi * B - Fn[k])
    c[0, 0] = -0.9  # the old group's leading weight is negative: no PSD reference, no intervals
    assert mixed_intervals([interval_part(c[:3], iv), interval_part(c[3:], iv)]) is None


def test_resume_keeps_the_certified_intervals_of_the_running_average():
    sts = _stats_stream("ggn")
    hp = dict(psd="shrink", rank=4, method="gram", psd_proof="samples")
    run = structures.create("kron_sum", sts[0].shape, **hp).fit(sts[0])
    run.update(sts[1], 0.9)
    resumed = structures.create("kron_sum", sts[0].shape, **hp)
    resumed.load_state_dict(run.state_dict())
    for block in (run, resumed):
        block.update(sts[2], 0.9)
        block.update(sts[3], 0.9)
    assert run.last_fit["psd_method"] == resumed.last_fit["psd_method"]
    assert all(torch.equal(run.tensors()[k], resumed.tensors()[k]) for k in ("A", "G"))


def test_sample_part_bounds_a_recombined_group_exactly_by_its_combined_sample_weights():
    from tensorcurv.structures.kron_sum.certificates import sample_part

    g = torch.Generator().manual_seed(2)
    S = _psd_atoms(15, 5, g)
    w = torch.randn(15, 3, generator=g, dtype=torch.float64)
    w[:, 0] = w[:, 0].abs() + 0.5
    c = torch.tensor([[1.0, 0.1, -0.2], [0.05, 1.0, 0.3], [-0.05, 0.2, 1.0]], dtype=torch.float64)
    F = torch.einsum("sk,sij->kij", w, S)  # the group's inputs
    part = torch.einsum("ik,inm->knm", c, F)
    L, H = sample_part(c, w)
    assert L[0] == 1 and H[0] == 1
    for k in (1, 2):
        assert _loewner_ok(part[k] - L[k] * part[0]) and _loewner_ok(H[k] * part[0] - part[k])


@pytest.mark.parametrize("r", [2, 3, 4, 5, 6])
def test_sample_space_scale_from_convex_hulls_equals_the_full_pair_product(r, monkeypatch):
    from tensorcurv.structures.kron_sum import certificates as K

    g = torch.Generator().manual_seed(r)
    ca = torch.randn(400, r, generator=g, dtype=torch.float64)
    cg = torch.randn(400, r, generator=g, dtype=torch.float64) * 0.3
    ca[:, 0], cg[:, 0] = ca[:, 0].abs() + 0.5, cg[:, 0].abs() + 0.5
    fast = K.sample_psd_scale(ca, cg)
    monkeypatch.setattr(K, "HULL_MAX_DIM", 0)  # the N x N product only
    full = K.sample_psd_scale(ca, cg)
    assert 0 < full < 1 and abs(fast - full) <= 1e-9 * full and fast <= full


def test_sample_space_scale_falls_back_to_the_full_product_on_flat_point_sets():
    from tensorcurv.structures.kron_sum.certificates import sample_psd_scale

    g = torch.Generator().manual_seed(0)
    ca = torch.randn(300, 4, generator=g, dtype=torch.float64)
    cg = torch.randn(300, 4, generator=g, dtype=torch.float64)
    ca[:, 0], cg[:, 0] = ca[:, 0].abs() + 0.5, cg[:, 0].abs() + 0.5
    cg[:, 3] = cg[:, 2] * cg[:, 0]  # ĝ lies in a plane of R³: no 3-d hull
    t = sample_psd_scale(ca, cg)
    W = torch.outer(ca[:, 0], cg[:, 0]) + t * ca[:, 1:] @ cg[:, 1:].T
    W_past = torch.outer(ca[:, 0], cg[:, 0]) + 1.001 * t * ca[:, 1:] @ cg[:, 1:].T
    assert float(W.min()) >= -1e-12 and float(W_past.min()) < 0


def test_antisymmetric_flags_the_factors_whose_skew_part_dominates():
    from tensorcurv.linalg.rearrange import antisymmetric

    g = torch.Generator().manual_seed(0)
    S = torch.randn(5, 6, 6, generator=g, dtype=torch.float64)
    sym, skew = S + S.mT, S - S.mT
    mix = torch.stack([sym[0] + 0.5 * skew[0], 0.5 * sym[1] + skew[1], sym[2], skew[3]])
    expected = [bool((m - m.T).norm() > (m + m.T).norm()) for m in mix]
    assert antisymmetric(mix).tolist() == expected == [False, True, False, True]
