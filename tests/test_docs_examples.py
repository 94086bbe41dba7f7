"""The tutorials under docs/examples/ run end to end (tiny settings), each in a fresh process.

A fresh process per script keeps the tutorial's own registrations (the custom structure) out of the
test session's structure registry.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))


def test_every_tutorial_script_is_found():
    assert {p.stem for p in EXAMPLES} >= {"custom_structure", "study", "unlearning"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_tutorial_script_runs_on_tiny_settings(script):
    pytest.importorskip("sklearn")  # the study and unlearning tutorials load scikit-learn's digits
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "a tutorial prints what it shows"
