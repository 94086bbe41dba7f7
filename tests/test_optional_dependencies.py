"""The library runs without the harness's dependencies (the ``experiments`` extra of pyproject.toml).

Each check runs in a fresh interpreter where the harness packages look uninstalled, so a top-level
``import matplotlib`` (or hydra, omegaconf, wandb, sklearn, tqdm) in a library module fails the test even
where the package is installed.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS_PACKAGES = ("hydra", "omegaconf", "wandb", "matplotlib", "sklearn", "tqdm")
# Modules that belong to the harness and may import its packages at the top.
HARNESS_MODULES = ("tensorcurv.experiments",)

BLOCKER = f"""
import sys
BLOCKED = {HARNESS_PACKAGES!r}
for name in BLOCKED:
    sys.modules[name] = None  # as if not installed: `import name` raises ImportError, find_spec gives None
"""


def run_without_harness_packages(code: str) -> str:
    """Run ``code`` after the blocker in a fresh interpreter; return its stdout (the test fails on a nonzero exit)."""
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_library_module_imports_without_the_harness_packages():
    out = run_without_harness_packages(f"""
        import importlib, pkgutil
        import tensorcurv
        failed = []
        for info in pkgutil.walk_packages(tensorcurv.__path__, "tensorcurv."):
            if info.name.startswith({HARNESS_MODULES!r}):
                continue
            try:
                importlib.import_module(info.name)
            except ImportError as e:
                failed.append(f"{{info.name}}: {{e}}")
        assert not failed, failed
        print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None))
    """)
    assert out.strip() == "[]"


def test_curvature_optimizer_and_unlearning_run_without_the_harness_packages():
    out = run_without_harness_packages("""
        import torch
        from torch import nn
        import tensorcurv
        import tensorcurv.optim
        from tensorcurv.unlearn import AffectedSet, StructureSolver, second_order_update

        torch.manual_seed(0)
        X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

        curv = tensorcurv.Curvature(model, "kfac", "ggn")
        curv.update(X, y, nn.CrossEntropyLoss())
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        solved = curv.solve(grads, 1e-2)
        assert all(torch.isfinite(v).all() for v in solved.values())

        before = [p.detach().clone() for p in model.parameters()]
        opt = tensorcurv.optim.NaturalGradient(model, nn.CrossEntropyLoss(), structure="kfac", lr=0.1, damping=1e-2)
        opt.step(X, y)
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))

        res = second_order_update(model, X, y, AffectedSet.removal([0]), StructureSolver("kfac"), mu=0.1,
                                  inplace=False)
        assert res.ok and torch.isfinite(res.theta).all()
        print("ran")
    """)
    assert out.strip() == "ran"
