"""The config of the ``unlearn`` command line (``conf/unlearn.yaml``, ``scripts/unlearn.py``) and its validation
(every key checked before any work starts, one-line :class:`~tensorcurv.experiments.schema.ConfigError`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tensorcurv.experiments.config import plain_config
from tensorcurv.experiments.schema import check, check_value, signature_schema, spec


def _scenarios() -> list[str]:
    from tensorcurv.unlearn.scenarios import ScenarioName

    return ScenarioName.values()


@dataclass
class UnlearnConfig:
    """``conf/unlearn.yaml``: the digits unlearning benchmark (``tensorcurv.unlearn.benchmark.run``)."""

    name: str = spec("unlearn")
    scenario: str = spec("label_flip", choices=_scenarios, what="a scenario")
    fraction: float = spec(0.05, gt=0, lt=1)
    """Fraction of the training points affected, in (0, 1)."""
    scenario_kwargs: dict[str, Any] = spec({})
    """Extra keyword arguments of the scenario (backdoor: ``target``, ``patch``, ``trigger_value``)."""
    seeds: list[int] = spec([0], ge=0, nonempty=True)
    mu: float = spec(20.0, gt=0)
    """L2 regularization μ > 0 of ``Σ_i CE_i + (μ/2)‖θ‖²`` (the curvature gets μ·I)."""
    hidden: list[int] = spec([], ge=1)
    methods: list[str] | None = spec(None)
    quick: bool = spec(False)
    lissa_depth: int | None = spec(None, ge=1)
    threads: int | None = spec(1, ge=1)
    report_dir: str | None = spec(None)


#: digits: 10 classes of 8x8 images
_SCENARIO_RULES = {"target": {"ge": 0, "le": 9}, "patch": {"ge": 1, "le": 8}}


def validate_unlearn(cfg: Any) -> UnlearnConfig:
    """Validate a composed ``conf/unlearn.yaml``. Raises :class:`ConfigError`."""
    from tensorcurv.unlearn import benchmark, scenarios

    u = check("", UnlearnConfig, plain_config(cfg))
    schema = signature_schema(
        u.scenario,
        getattr(scenarios, u.scenario),
        rules=_SCENARIO_RULES,
        skip=("X", "y", "X_test", "y_test", "num_classes", "fraction", "seed"),
    )
    check("scenario_kwargs", schema, u.scenario_kwargs)
    if u.methods is not None:
        known = [m.name for m in benchmark.default_methods(u.quick, u.lissa_depth)]
        check_value("methods", u.methods, list[str], {"choices": known, "what": "a method", "nonempty": True})
    return u
