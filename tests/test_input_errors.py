"""User mistakes and numerical edge cases of the library API: a one-line error before any work,
never a silent NaN/Inf or a wrong curvature, never a state corrupted by a failed update."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tensorcurv
from reference import full_block, layer_index
from tensorcurv import structures
from tensorcurv.core.stats import LayerStats, NonFiniteError
from tensorcurv.optim.preconditioner import NonFiniteStepWarning, Preconditioner
from tensorcurv.structures.base import NotFittedError

LAYER_STRUCTURES = ["dense", "diagonal", "kfac", "ekfac", "kron_sum", "tucker", "tt"]
ALL_STRUCTURES = LAYER_STRUCTURES + ["two_level"]
CE = nn.CrossEntropyLoss()


def mlp(dtype=torch.float32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def data(n: int = 16, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def fitted(structure: str = "kfac", kind: str = "ggn", dtype=torch.float32, **kw) -> tensorcurv.Curvature:
    curv = tensorcurv.Curvature(mlp(dtype), structure, kind, seed=0, **kw)
    curv.update(*data(dtype=dtype), CE)
    return curv


def grads_like(curv, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in curv.params]


def flat_state(state, prefix: str = "") -> dict[str, object]:
    """Every leaf of a (nested) state dict, tensors cloned, for a bit-for-bit comparison."""
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            out.update(flat_state(v, f"{prefix}{k}."))
        return out
    if isinstance(state, (list, tuple)):
        out = {}
        for i, v in enumerate(state):
            out.update(flat_state(v, f"{prefix}{i}."))
        return out
    return {prefix: state.clone() if isinstance(state, torch.Tensor) else state}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------------- 1. damping
@pytest.mark.parametrize("structure", LAYER_STRUCTURES)
def test_zero_damping_is_refused_naming_damping_and_the_valid_range(structure):
    curv = fitted(structure)
    with pytest.raises(ValueError, match=r"damping must be a finite number in \(0, inf\)"):
        curv.solve(grads_like(curv), damping=0.0)


@pytest.mark.parametrize("structure", LAYER_STRUCTURES)
def test_zero_damping_is_refused_by_the_block_solve(structure):
    curv = fitted(structure)
    with pytest.raises(ValueError, match="damping"):
        curv.blocks["2"].solve(torch.zeros(3, 5), 0.0)


@pytest.mark.parametrize("damping", [-1e-3, float("nan"), float("inf"), True, "1e-3"])
def test_negative_nonfinite_and_non_numeric_damping_are_refused(damping):
    curv = fitted()
    with pytest.raises(ValueError, match="damping"):
        curv.solve(grads_like(curv), damping=damping)


def test_cross_entropy_output_block_is_singular(float64_default):
    """Why λ = 0 is refused: Σ_c p_c = 1 makes (1, ..., 1) a null vector of the softmax Hessian, so
    the exact GGN block of the output layer (bias column included) has a zero eigenvalue."""
    curv = fitted("dense", dtype=torch.float64)
    evals = torch.linalg.eigvalsh(curv.blocks["2"].to_dense())
    assert evals.min().abs() <= 1e-12 * evals.max()


@pytest.mark.parametrize("structure", ["dense", "ekfac", "kfac"])
def test_solve_of_the_singular_output_block_is_finite_at_tiny_damping(structure):
    curv = fitted(structure)
    out = curv.solve(grads_like(curv), damping=1e-12)
    assert all(torch.isfinite(t).all() for t in out)


def test_solve_with_non_finite_gradient_raises_naming_the_layer():
    curv = fitted()
    g = grads_like(curv)
    g[2][0, 0] = float("nan")  # 2.weight
    with pytest.raises(NonFiniteError, match=r"\['2'\].*gradients are non-finite"):
        curv.solve(g, damping=1e-3)


def test_solve_of_a_non_invertible_damped_block_raises_naming_the_layer():
    curv = fitted("diagonal")
    curv.blocks["2"].D = torch.full((3, 5), -0.5)  # Ĉ + λI has zero entries at λ = 0.5
    with pytest.raises(NonFiniteError, match=r"\['2'\].*not invertible"):
        curv.solve(grads_like(curv), damping=0.5)


def test_preconditioner_skips_a_step_whose_solve_is_non_finite():
    model = mlp()
    pre = Preconditioner(model, CE, structure="diagonal", damping=0.5, decay=None)
    x, y = data()
    pre.backward(x, y)
    pre.curvature.blocks["2"].D = torch.full((3, 5), -0.5)
    with pytest.warns(NonFiniteStepWarning, match="not positive definite"):
        assert pre.precondition() is False
    assert pre.skipped == 1 and all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- 2. shared parameters
class TiedMLP(nn.Module):
    """``a`` and ``b`` share one weight matrix (one nn.Parameter); ``c`` is an ordinary layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def tied_batch(n: int = 12):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_shared_parameter_gets_no_block():
    curv = tensorcurv.Curvature(TiedMLP(), "kfac")
    assert list(curv.blocks) == ["c"]


def test_shared_parameter_is_reported_by_coverage_as_fallback_with_the_reason():
    rows = {r["param"]: r for r in tensorcurv.Curvature(TiedMLP(), "kfac").coverage()}
    assert set(rows) == {"a.weight", "a.bias", "b.bias", "c.weight", "c.bias"}  # one row per parameter
    for name in ("a.weight", "a.bias", "b.bias"):
        assert rows[name]["handled_by"] == "fallback: identity"
        assert "shared" in rows[name]["why"] and "b.weight" in rows[name]["why"]
    assert rows["c.weight"]["handled_by"] == "kfac block"


def test_dense_block_of_the_unshared_layer_is_the_exact_ggn_block_next_to_a_shared_parameter(float64_default):
    model, (x, y) = TiedMLP(), tied_batch()
    curv = tensorcurv.Curvature(model, "dense")
    curv.update(x, y, CE)
    C, names, shapes = full_block(model, x, y, "cross_entropy", "ggn")
    idx = layer_index(model, "c", names, shapes)
    ref = C[idx][:, idx]
    assert torch.allclose(curv.blocks["c"].to_dense(), ref, rtol=1e-12, atol=1e-14)


def test_diagonal_fallback_of_a_shared_parameter_is_the_exact_ggn_diagonal(float64_default):
    model, (x, y) = TiedMLP(), tied_batch()
    curv = tensorcurv.Curvature(model, "dense", fallback="diagonal")
    curv.update(x, y, CE)
    C, names, shapes = full_block(model, x, y, "cross_entropy", "ggn")
    start = sum(torch.Size(s).numel() for s in shapes[: names.index("a.weight")])
    ref = C.diagonal()[start : start + 16].reshape(4, 4)
    assert torch.allclose(curv.fallback_diag["a.weight"], ref, rtol=1e-12, atol=1e-14)


def test_module_registered_under_two_names_is_not_covered():
    model = mlp()
    model.add_module("again", model[2])  # the same Linear reachable as "2" and "again"
    curv = tensorcurv.Curvature(model, "kfac")
    assert list(curv.blocks) == ["0"]
    assert "shared" in {r["param"]: r for r in curv.coverage()}["2.weight"]["why"]


# ---------------------------------------------------------------------- 3. non-finite fitted state
def saturated_mlp() -> nn.Sequential:
    """Layer "0" saturates its tanh (weights x 1e6), so its output gradients are exactly 0 and its
    statistics stay small whatever the targets; layer "2" sees the loss gradient directly."""
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(1e6)
    return model


@pytest.mark.parametrize("decay", [None, 0.9], ids=["fit", "running_average"])
@pytest.mark.parametrize("structure", ALL_STRUCTURES)
def test_overflowing_fit_raises_naming_the_layer_and_leaves_every_block_bit_identical(structure, decay):
    """MSE targets of 1e25 give finite output gradients g ~ 1e25 at layer "2", whose products
    (g gᵀ, per-sample gradients) overflow float32. Layer "0" is fitted first and succeeds on a new
    batch: it must be rolled back too."""
    curv = tensorcurv.Curvature(saturated_mlp(), structure, "empirical", seed=0)
    curv.update(data(seed=1)[0], torch.zeros(16, 3), nn.MSELoss())
    before = flat_state(curv.state_dict())
    with pytest.raises(NonFiniteError, match=r"layer(\(s\) \[| )'2'"):
        curv.update(data(seed=5)[0], torch.full((16, 3), 1e25), nn.MSELoss(), decay=decay)
    assert_same_state(flat_state(curv.state_dict()), before)


@pytest.mark.parametrize("decay", [None, 0.9], ids=["fit", "running_average"])
@pytest.mark.parametrize("structure", ALL_STRUCTURES)
def test_a_failing_later_block_rolls_back_the_blocks_fitted_before_it_bit_for_bit(structure, decay):
    """Block "0" is refitted (warm starts, random generators advance) before block "2" fails."""
    curv = fitted(structure)
    before = flat_state(curv.state_dict())

    def failing_fit(*args, **kwargs):
        raise NonFiniteError("injected failure")

    curv.blocks["2"].fit = curv.blocks["2"].update = failing_fit
    with pytest.raises(NonFiniteError, match="injected failure"):
        curv.update(*data(seed=7), CE, decay=decay)
    del curv.blocks["2"].fit, curv.blocks["2"].update
    assert_same_state(flat_state(curv.state_dict()), before)


@pytest.mark.parametrize("structure", ALL_STRUCTURES)
def test_a_failing_first_update_leaves_every_block_unfitted_with_its_random_generator_untouched(structure):
    """Random starts draw from a per-block generator during the first fit (kron_sum at rank 2 here)."""
    curv = tensorcurv.Curvature(mlp(), structure, seed=0, **({"rank": 2} if structure == "kron_sum" else {}))
    before = flat_state(curv.state_dict())
    gens = {k: b.generator.get_state() for k, b in curv.blocks.items() if hasattr(b, "generator")}

    def failing_fit(*args, **kwargs):
        raise NonFiniteError("injected failure")

    curv.blocks["2"].fit = curv.blocks["2"].update = failing_fit
    with pytest.raises(NonFiniteError, match="injected failure"):
        curv.update(*data(seed=7), CE)
    del curv.blocks["2"].fit, curv.blocks["2"].update
    assert not curv.fitted and not curv.blocks["0"].fitted
    assert_same_state(flat_state(curv.state_dict()), before)
    assert all(torch.equal(curv.blocks[k].generator.get_state(), g) for k, g in gens.items())


def test_huge_finite_inputs_that_overflow_the_kfac_factor_raise_naming_the_layer():
    """The reported case: inputs of 1e20 pass the finiteness check of a and g, but A = aᵀa overflows."""
    curv = fitted("kfac")
    x, y = data(seed=5)
    with pytest.raises(NonFiniteError, match=r"fitted curvature of layer\(s\) \['0'\] is non-finite \(in \['A'\]"):
        curv.update(x * 1e20, y, CE, decay=0.9)


def test_failed_update_does_not_count_and_solve_is_unchanged():
    curv = fitted("kfac")
    g = grads_like(curv)
    ref = curv.solve(g, damping=1e-3)
    x, y = data(seed=5)
    with pytest.raises(NonFiniteError):
        curv.update(x * 1e20, y, CE, decay=0.9)
    assert curv.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(curv.solve(g, damping=1e-3), ref))


def test_failed_update_restores_the_diagonal_fallback():
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    curv = tensorcurv.Curvature(model, "kfac", fallback="diagonal")
    x, y = data()
    curv.update(x, y, CE)
    before = {k: v.clone() for k, v in curv.fallback_diag.items()}
    with pytest.raises(NonFiniteError):
        curv.update(x * 1e20, y, CE, decay=0.9)
    assert all(torch.equal(curv.fallback_diag[k], v) for k, v in before.items())


def test_failed_mc_update_restores_the_sampling_generator():
    curv = fitted("kfac", kind="mc")
    state = curv.generator.get_state()
    x, y = data(seed=5)
    with pytest.raises(NonFiniteError):
        curv.update(x * 1e20, y, CE, decay=0.9)
    assert torch.equal(curv.generator.get_state(), state)


def test_preconditioner_skips_a_step_whose_fitted_factors_overflow():
    model = mlp()
    pre = Preconditioner(model, CE, structure="kfac", damping=1e-3)
    x, y = data()
    pre.backward(x, y)
    assert pre.precondition()
    before = flat_state(pre.curvature.state_dict())
    with pytest.warns(NonFiniteStepWarning, match=r"layer\(s\) \['0'\]"):
        pre.backward(x * 1e20, y)
    assert pre.skipped == 1 and pre.precondition() is False
    assert_same_state(flat_state(pre.curvature.state_dict()), before)


# ---------------------------------------------------------------------- 4. edges
def test_mc_update_with_nan_logits_raises_a_value_error_naming_the_model_outputs():
    model = mlp()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    curv = tensorcurv.Curvature(model, "kfac", "mc", seed=0)
    with pytest.raises(ValueError, match="non-finite model outputs"):
        curv.update(*data(), CE)
    assert not curv.fitted


def test_preconditioner_skips_an_mc_step_with_nan_logits():
    model = mlp()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    pre = Preconditioner(model, CE, structure="kfac", kind="mc", damping=1e-3, seed=0)
    with pytest.warns(NonFiniteStepWarning):
        pre.backward(*data())
    assert pre.skipped == 1 and pre.precondition() is False


def test_empty_batch_raises_value_error():
    x, y = data()
    with pytest.raises(ValueError, match="empty batch"):
        tensorcurv.Curvature(mlp()).update(x[:0], y[:0], CE)


def test_targets_with_another_batch_size_raise_value_error():
    x, y = data()
    with pytest.raises(ValueError, match="do not match the 16 samples"):
        tensorcurv.Curvature(mlp()).update(x, y[:5], CE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_is_refused_at_construction(dtype):
    with pytest.raises(ValueError, match=f"{dtype}.*float32 and float64"):
        tensorcurv.Curvature(mlp(dtype))


def test_model_converted_to_half_after_construction_is_refused_at_update():
    model = mlp()
    curv = tensorcurv.Curvature(model)
    model.to(torch.bfloat16)
    x, y = data()
    with pytest.raises(ValueError, match="bfloat16.*float32 and float64"):
        curv.update(x.to(torch.bfloat16), y, CE)


def test_half_precision_inputs_are_refused():
    x, y = data()
    with pytest.raises(ValueError, match="inputs are torch.float16"):
        tensorcurv.Curvature(mlp()).update(x.half(), y, CE)


def test_half_precision_statistics_are_refused():
    a, g = torch.zeros(2, 1, 3, dtype=torch.bfloat16), torch.zeros(2, 1, 1, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 and float64"):
        LayerStats(a, g, scale=0.5, name="x")


@pytest.mark.parametrize("op", ["to_dense", "mv", "solve"])
@pytest.mark.parametrize("structure", LAYER_STRUCTURES)
def test_block_operators_before_any_update_raise_no_statistics_yet(structure, op):
    block = structures.create(structure, (3, 5))
    args = {"to_dense": (), "mv": (torch.zeros(3, 5),), "solve": (torch.zeros(3, 5), 1e-3)}[op]
    with pytest.raises(RuntimeError, match=r"no statistics yet: call update\(\) first"):
        getattr(block, op)(*args)


@pytest.mark.parametrize("op", ["mv", "solve"])
@pytest.mark.parametrize("structure", ["kfac", "two_level"])
def test_curvature_operators_before_any_update_raise_no_statistics_yet(structure, op):
    curv = tensorcurv.Curvature(mlp(), structure)
    with pytest.raises(RuntimeError, match=r"no statistics yet: call update\(\) first"):
        getattr(curv, op)(grads_like(curv))


def test_not_fitted_error_keeps_hasattr_false_on_an_unfitted_block():
    block = structures.create("kfac", (3, 5))
    assert not hasattr(block, "A")
    assert issubclass(NotFittedError, RuntimeError)


def test_meta_device_model_is_refused_at_construction():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="'meta' device.*to_empty"):
        tensorcurv.Curvature(model)


def test_unknown_exclude_name_is_refused_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown: \['7'\]; valid: \['0', '2'\]"):
        tensorcurv.Curvature(mlp(), exclude=["7"])


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), "0.9", True])
def test_decay_outside_zero_one_or_not_a_number_is_refused(decay):
    curv = tensorcurv.Curvature(mlp())
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\)"):
        curv.update(*data(), CE, decay=decay)


def test_gradient_dict_with_missing_or_unknown_keys_is_refused():
    curv = fitted()
    g = dict(zip([n for n, _ in curv.named_params], grads_like(curv)))
    g["0.wieght"] = g.pop("0.weight")
    with pytest.raises(ValueError, match=r"missing \['0.weight'\], unknown \['0.wieght'\]"):
        curv.solve(g, damping=1e-3)


def test_gradient_dict_with_a_wrong_shape_is_refused():
    curv = fitted()
    g = dict(zip([n for n, _ in curv.named_params], grads_like(curv)))
    g["2.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="2.bias has shape"):
        curv.solve(g, damping=1e-3)


def test_layer_with_frozen_bias_and_trained_weight_goes_to_the_fallback():
    model = mlp()
    model[0].bias.requires_grad_(False)
    curv = tensorcurv.Curvature(model, "kfac")
    curv.update(*data(), CE)
    assert list(curv.blocks) == ["2"]
    assert "bias is frozen" in {r["param"]: r for r in curv.coverage()}["0.weight"]["why"]
    g = grads_like(curv)
    assert torch.equal(curv.solve(g, damping=1e-3)[0], g[0])  # identity fallback


def test_mse_targets_that_would_broadcast_are_refused():
    x, _ = data()
    with pytest.raises(ValueError, match=r"MSE targets of shape \(16, 1\) do not match the model outputs"):
        tensorcurv.Curvature(mlp()).update(x, torch.zeros(16, 1), nn.MSELoss())


def test_mse_targets_with_the_per_sample_size_of_the_outputs_are_accepted_and_equal_flat_ones(float64_default):
    model = nn.Sequential(nn.Linear(5, 6), nn.Unflatten(1, (2, 3)))  # outputs (N, 2, 3)
    x, _ = data(dtype=torch.float64)
    t = torch.randn(16, 2, 3)
    a, b = tensorcurv.Curvature(model, "dense"), tensorcurv.Curvature(model, "dense")
    a.update(x, t, nn.MSELoss())
    b.update(x, t.flatten(1), nn.MSELoss())
    assert torch.equal(a.blocks["0"].to_dense(), b.blocks["0"].to_dense())


def test_soft_label_cross_entropy_targets_are_refused():
    x, _ = data()
    with pytest.raises(ValueError, match="integer class indices of shape"):
        tensorcurv.Curvature(mlp()).update(x, torch.full((16, 3), 1 / 3), CE)


@pytest.mark.parametrize("kw", [{"mc_samples": True}, {"seed": "abc"}, {"seed": -1}])
def test_non_integer_mc_samples_or_seed_are_refused(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        tensorcurv.Curvature(mlp(), "kfac", "mc", **kw)


def test_gradient_of_another_dtype_is_refused():
    curv = fitted()
    g = grads_like(curv)
    g[1] = g[1].double()
    with pytest.raises(ValueError, match="gradient for 0.bias is torch.float64, parameter is torch.float32"):
        curv.solve(g, damping=1e-3)


def bn_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))


def test_batchnorm_in_training_mode_warns_that_samples_are_coupled():
    from tensorcurv.curvature import CoupledSamplesWarning

    with pytest.warns(CoupledSamplesWarning, match="BatchNorm in training mode"):
        tensorcurv.Curvature(bn_mlp().train()).update(*data(), CE)


def test_batchnorm_in_eval_mode_captures_without_warning():
    from tensorcurv.curvature import CoupledSamplesWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", CoupledSamplesWarning)
        tensorcurv.Curvature(bn_mlp().eval()).update(*data(), CE)


def test_load_state_dict_of_something_else_is_refused():
    with pytest.raises(ValueError, match=r"not a Curvature.state_dict\(\): missing"):
        tensorcurv.Curvature(mlp()).load_state_dict({"structure": "kfac"})


def test_load_state_dict_of_another_model_is_refused_naming_the_layers():
    other = tensorcurv.Curvature(nn.Sequential(nn.Linear(5, 3)))
    other.update(*data(), CE)
    with pytest.raises(ValueError, match=r"state is for the layers \['0'\]; this curvature covers \['0', '2'\]"):
        tensorcurv.Curvature(mlp()).load_state_dict(other.state_dict())


def test_numpy_scalar_damping_is_accepted_and_equals_the_python_float():
    np = pytest.importorskip("numpy")
    curv = fitted()
    g = grads_like(curv)
    ref = curv.solve(g, damping=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(curv.solve(g, damping=np.float64(1e-3)), ref))


def _failing_fit(*args, **kwargs):
    raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")


def test_a_failed_decomposition_in_a_fit_is_a_non_finite_error_and_changes_no_block(monkeypatch):
    curv = fitted("kfac")
    before = flat_state(curv.state_dict())
    monkeypatch.setattr(type(curv.model_structure), "update", _failing_fit)
    x, y = data(seed=5)
    with pytest.raises(NonFiniteError, match=r"^a decomposition of the fit failed \(linalg.eigh: The algorithm"):
        curv.update(x, y, CE, decay=0.9)
    assert curv.num_updates == 1
    assert_same_state(flat_state(curv.state_dict()), before)


def test_preconditioner_skips_a_step_whose_fit_fails_to_decompose(monkeypatch):
    pre = Preconditioner(mlp(), CE, structure="kfac", damping=1e-3)
    x, y = data()
    pre.backward(x, y)
    assert pre.precondition()
    for method in ("fit", "update"):
        monkeypatch.setattr(type(pre.curvature.model_structure), method, _failing_fit)
    with pytest.warns(NonFiniteStepWarning, match="a decomposition of the fit failed"):
        pre.backward(x, y)
    assert pre.last_skipped and pre.skipped == 1
