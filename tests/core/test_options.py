"""String options: a member is its string, configs pass plain strings, errors list the valid values."""

import io

import pytest
import torch

from tensorcurv.core.options import Option
from tensorcurv.structures import create
from tensorcurv.structures.damping import DampingKind
from tensorcurv.structures.kfac import KFACHparams
from tensorcurv.structures.kron_sum import KronSum


class Colour(Option):
    RED = "red"
    BLUE = "blue"


def test_a_member_equals_and_prints_as_its_value():
    assert Colour.RED == "red" and str(Colour.RED) == "red" and f"{Colour.RED}" == "red" and repr(Colour.RED) == "'red'"


def test_parse_turns_the_plain_string_into_the_member():
    assert Colour.parse("blue", "colour") is Colour.BLUE


def test_parse_error_names_the_key_and_lists_the_valid_values():
    with pytest.raises(ValueError, match=r"^colour='green' is not one of \['red', 'blue'\]$"):
        Colour.parse("green", "colour")


def test_hparams_hold_the_member_of_a_plain_string():
    assert KFACHparams(damping_kind="pi").damping_kind is DampingKind.PI


def test_pi_damping_has_one_name_in_kfac_and_kron_sum():
    assert KronSum.Hparams(rank=2, damping_kind="pi").damping_kind is KFACHparams(damping_kind="pi").damping_kind


def test_kron_sum_refuses_the_old_name_of_pi_damping():
    with pytest.raises(ValueError, match=r"kron_sum.damping_kind='factored' is not one of \['tikhonov', 'pi'\]"):
        KronSum.Hparams(damping_kind="factored")


def test_state_dict_stores_plain_strings_that_a_weights_only_load_reads():
    buf = io.BytesIO()
    torch.save(create("kfac", (3, 4), damping_kind="pi", inverse="cholesky").state_dict(), buf)
    buf.seek(0)
    hparams = torch.load(buf, weights_only=True)["hparams"]
    assert type(hparams["damping_kind"]) is str and hparams["damping_kind"] == "pi"
