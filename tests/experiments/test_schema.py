"""tensorcurv.experiments.schema: types are strict, ranges and choices are enforced, typos get the closest key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tensorcurv.experiments.schema import ConfigError, check, signature_schema, spec


@dataclass
class Probe:
    flag: bool = spec(True)
    count: int = spec(1, ge=1)
    rate: float = spec(0.5, gt=0, lt=1)
    mode: str = spec("a", choices=("alpha", "beta"), what="a mode")
    sizes: list[int] = spec([2], ge=1)
    limit: int | None = spec(None, ge=0)


def error(**values) -> str:
    with pytest.raises(ConfigError) as e:
        check("probe", Probe, values)
    return str(e.value)


@pytest.mark.parametrize("value", ["no", "yes", 0, 1, "true"])
def test_booleans_are_strictly_true_or_false(value):
    assert error(flag=value) == f"probe.flag={value!r} must be true or false"


def test_a_float_field_takes_integers_but_not_booleans_or_infinity():
    assert check("probe", Probe, {"rate": 0.25}).rate == 0.25
    assert "must be a finite number > 0 and < 1" in error(rate=True)
    assert "must be a finite number > 0 and < 1" in error(rate=float("inf"))
    assert "must be a finite number > 0 and < 1" in error(rate=1)


def test_an_integer_field_refuses_floats_and_strings():
    assert error(count=2.0) == "probe.count=2.0 must be an integer >= 1"
    assert error(count="2") == "probe.count='2' must be an integer >= 1"


def test_a_choice_suggests_the_closest_valid_value():
    assert error(mode="alpa") == "probe.mode='alpa' is not a mode (did you mean 'alpha'?); valid: alpha, beta"


def test_unknown_key_suggests_the_closest_key_and_lists_all():
    assert error(sises=[3]) == (
        "unknown key 'probe.sises'; did you mean 'probe.sizes'? valid keys: flag, count, rate, mode, sizes, limit"
    )


def test_optional_field_takes_null_and_checks_a_value():
    assert check("probe", Probe, {"limit": None}).limit is None
    assert error(limit=-1) == "probe.limit=-1 must be an integer >= 0 or null"


def test_list_entries_are_checked_one_by_one():
    assert error(sizes=[3, 0]) == "probe.sizes=[3, 0]: 0 is out of range; expected a list of integers >= 1"
    assert error(sizes=3) == "probe.sizes=3 must be a list of integers >= 1"


def test_signature_schema_takes_types_and_defaults_from_the_function():
    def build(input_shape, width: int = 4, act: str = "tanh", sizes: tuple = (1, 2)) -> None:
        pass

    schema = signature_schema("build", build, skip=("input_shape",), rules={"act": {"choices": ("tanh", "relu")}})
    v = check("model", schema, {"width": 8})
    assert (v.width, v.act, v.sizes) == (8, "tanh", [1, 2])
    with pytest.raises(ConfigError, match=r"^model.act='gelu' is not a valid choice"):
        check("model", schema, {"act": "gelu"})
