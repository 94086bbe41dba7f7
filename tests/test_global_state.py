"""The library leaves process-wide state to the user: a representative set of library calls (Curvature
update/solve for every structure but tucker/tt, a small study, an unlearning request) neither sets any of
it while running nor leaves it changed afterwards.

Watched while running (each setter is wrapped and recorded; ``torch.einsum`` records the opt_einsum
backend settings it runs under, so a value changed and restored around the call is caught too):
thread counts, default dtype, deterministic mode, float32 matmul precision, the tensorly backend,
numpy/python global seeding. Compared before/after: the same, plus the global torch/numpy/python
RNG states, warnings filters, environment variables and grad mode.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets  # noqa: F401 - third-party import side effects, imported here (not while watched):
import sympy  # noqa: F401 - sklearn sets KMP_* environment variables, sympy adds a warnings filter,
import tensorly
import torch
import torch._dynamo  # noqa: F401 - and torch._dynamo sets TORCHINDUCTOR_CACHE_DIR; torch imports both lazily
from torch import nn

from tensorcurv import structures
from tensorcurv.curvature import Curvature
from tensorcurv.study.runner import run_study
from tensorcurv.unlearn import AffectedSet, build_solver, second_order_update
from unlearn_problems import data, logreg, trained

HPARAMS = {"kron_sum": {"rank": 2}, "two_level": {}}
SETTERS = [
    (torch, "set_num_threads"),
    (torch, "set_num_interop_threads"),
    (torch, "set_default_dtype"),
    (torch, "set_default_tensor_type"),
    (torch, "use_deterministic_algorithms"),
    (torch, "set_float32_matmul_precision"),
    (tensorly, "set_backend"),
    (np.random, "seed"),
    (random, "seed"),
]


def _snapshot() -> dict:
    return {
        "threads": torch.get_num_threads(),
        "interop threads": torch.get_num_interop_threads(),
        "opt_einsum": (torch.backends.opt_einsum.enabled, torch.backends.opt_einsum.strategy),
        "default dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul precision": torch.get_float32_matmul_precision(),
        "tensorly backend": tensorly.get_backend(),
        "torch rng": torch.get_rng_state().tolist(),
        "numpy rng": str(np.random.get_state()),
        "python rng": random.getstate(),
        "warnings filters": list(warnings.filters),
        "environment": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
        "grad enabled": torch.is_grad_enabled(),
    }


@pytest.fixture
def watched(monkeypatch):
    """Records every global setter called and every opt_einsum setting torch.einsum ran under."""
    calls: list[str] = []
    einsum_backend: set = set()
    for owner, name in SETTERS:
        original = getattr(owner, name)

        def record(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, record)
    einsum = torch.einsum

    def recording_einsum(*args, **kwargs):
        einsum_backend.add((torch.backends.opt_einsum.enabled, torch.backends.opt_einsum.strategy))
        return einsum(*args, **kwargs)

    monkeypatch.setattr(torch, "einsum", recording_einsum)
    user_backend = (torch.backends.opt_einsum.enabled, torch.backends.opt_einsum.strategy)
    before = _snapshot()
    yield calls
    after = _snapshot()
    assert calls == [], f"library code called the global setters {calls}"
    assert einsum_backend <= {user_backend}, f"torch.einsum ran under {einsum_backend}, the user set {user_backend}"
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [], f"global state changed: {changed}"


def _mlp() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    linear = nn.utils.skip_init  # no draw from the global generator: the test watches it
    model = nn.Sequential(linear(nn.Linear, 5, 7), nn.Tanh(), linear(nn.Linear, 7, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(20, 5, generator=gen), torch.randint(0, 3, (20,), generator=gen)


@pytest.mark.parametrize("name", structures.names())
def test_curvature_update_and_solve_leave_global_state_alone(watched, name):
    x, y = _batch()
    for kind, seed in (("ggn", None), ("mc", 3)):  # mc with its own seeded generator
        curv = Curvature(_mlp(), name, kind, seed=seed, **HPARAMS.get(name, {}))
        curv.update(x, y, "cross_entropy")
        curv.update(x, y, "cross_entropy", decay=0.9)
        grads = [torch.ones_like(p) for p in curv.params]
        assert all(torch.isfinite(g).all() for g in curv.solve(grads, damping=1e-2))


def test_a_study_run_leaves_global_state_alone(watched):
    cfg = {
        "seed": 0,
        "dtype": "float64",
        "data": {"name": "digits", "limit": 120},
        "model": {"name": "mlp", "hidden_sizes": [5]},
        "train": {"steps": 2, "batch_size": 16, "lr": 1e-2},
        "study": {
            "kinds": ["ggn"],
            "batch_size": 12,
            "checkpoints": [0, 1.0],
            "structures": ["kfac", "kron_sum"],
            "damping_rel": [1e-2],
            "floor_ranks": [1, 2],
            "spectral_max_iter": 20,
            "spectrum_k": 4,
        },
    }
    result = run_study(cfg, log=lambda msg: None)
    assert result["metrics"]


@pytest.fixture
def unlearning_problem():
    """θ* of a tiny logistic regression (built before the state is watched: its init seeds torch)."""
    X, y = data()
    return trained(logreg(), X, y, 0.5), X, y


def test_an_unlearning_request_leaves_global_state_alone(unlearning_problem, watched):
    obj, X, y = unlearning_problem
    idx = torch.tensor([2, 5, 11])
    for method, kw in (("kfac", {}), ("lissa", {"seed": 0})):  # a structure solver, a stochastic one
        res = second_order_update(
            obj.model,
            X,
            y,
            AffectedSet.relabel(idx, (y[idx] + 1) % 3),
            build_solver(method, depth=50, **kw) if method == "lissa" else build_solver(method),
            mu=0.5,
            inplace=False,
        )
        assert res.status


def test_seeded_model_builders_leave_the_global_generator_alone(watched):
    from tensorcurv.experiments.reference_layers import reference_model
    from tensorcurv.unlearn.benchmark import build_model

    twice = [build_model((4,), 3, (5,), seed=3) for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in twice)))  # still seeded
    assert sum(p.numel() for p in reference_model("mlp", trained=False).parameters()) > 0


def test_a_training_run_applies_threads_and_seed_for_the_run_only(tmp_path):
    """``threads`` and ``seed`` are the harness's explicit settings: they hold inside run_training only."""
    from hydra import compose, initialize_config_dir

    from tensorcurv.experiments.runner import run_training

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["data.limit=120", "batch_size=40", "epochs=1", "progress=false", "threads=1"])
    user_threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seen = []
        before = _snapshot()
        run_training(cfg, run_dir=tmp_path, callbacks=[lambda step, m: seen.append(torch.get_num_threads())])
        after = _snapshot()
    finally:
        torch.set_num_threads(user_threads)
    assert seen and set(seen) == {1}
    assert [k for k in before if before[k] != after[k]] == []


def test_importing_the_library_leaves_global_state_alone():
    """In a fresh interpreter (imports run once per process). Environment variables and warnings filters
    are left out: numpy/scipy/sklearn set some on import, which the library cannot prevent."""
    import subprocess
    import sys

    probe = (
        "import numpy, random, tensorly, torch\n"
        "def state():\n"
        "    return (torch.get_num_threads(), torch.backends.opt_einsum.enabled, torch.backends.opt_einsum.strategy,\n"
        "            torch.get_default_dtype(), torch.get_rng_state().tolist(), str(numpy.random.get_state()),\n"
        "            random.getstate(), tensorly.get_backend(), torch.are_deterministic_algorithms_enabled())\n"
        "before = state()\n"
        "import tensorcurv, tensorcurv.curvature, tensorcurv.structures, tensorcurv.study.runner, tensorcurv.unlearn\n"
        "import tensorcurv.optim, tensorcurv.distributed, tensorcurv.experiments.runner\n"
        "import tensorcurv.experiments.reference_layers\n"
        "print(before == state())\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=120,
    )
    assert out.stdout.strip() == "True", out.stderr[-2000:]
