"""QuantScheme: parsing scheme names, validation messages, ignore matching, group-size checks."""

import dataclasses

import pytest

from quantkit.errors import QuantkitError
from quantkit.quant.scheme import QuantScheme, check_group_size, parse_scheme


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("w4a16", 4),
        ("W8A16", 8),
        ("w3a16", 3),
        ("w2a16", 2),
        (" int4 ", 4),
        ("INT8", 8),
    ],
)
def test_parse_scheme_names_and_aliases(text, bits):
    scheme = parse_scheme(text)
    assert scheme == QuantScheme(
        bits=bits, group_size=128, symmetric=True, ignore=("lm_head",)
    )


def test_parse_scheme_overrides():
    scheme = parse_scheme(
        "w4a16", group_size=-1, symmetric=False, ignore=["lm_head", "re:.*gate"]
    )
    assert (scheme.bits, scheme.group_size, scheme.symmetric) == (4, -1, False)
    assert scheme.ignore == ("lm_head", "re:.*gate")


@pytest.mark.parametrize("text", ["w5a7", "w4a8", "int3", "", "fp8"])
def test_parse_scheme_rejects_unknown_names(text):
    with pytest.raises(QuantkitError) as err:
        parse_scheme(text)
    assert (
        str(err.value)
        == f"unknown scheme '{text}': expected one of w8a16, w4a16, w3a16, w2a16"
    )


@pytest.mark.parametrize("bits", [1, 5, 16, 0, True])
def test_bad_bits_named_in_message(bits):
    with pytest.raises(QuantkitError, match=f"unsupported weight bits {bits!r}"):
        QuantScheme(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, 12.5, None])
def test_bad_group_size_named_in_message(group_size):
    with pytest.raises(QuantkitError) as err:
        QuantScheme(group_size=group_size)
    assert f"invalid group size {group_size!r}" in str(err.value)
    assert "-1 for per-channel" in str(err.value)


def test_parse_scheme_validates_overrides():
    with pytest.raises(QuantkitError, match="invalid group size 0"):
        parse_scheme("w4a16", group_size=0)


def test_is_ignored_exact_suffix_and_regex():
    scheme = QuantScheme(
        ignore=("lm_head", "re:model\\.layers\\.0\\.", "mlp.down_proj")
    )
    assert scheme.is_ignored("lm_head")
    assert scheme.is_ignored("model.lm_head")
    assert not scheme.is_ignored("model.lm_head_extra")
    assert not scheme.is_ignored("xlm_head")
    assert scheme.is_ignored("model.layers.0.self_attn.q_proj")
    assert not scheme.is_ignored("model.layers.10.self_attn.q_proj")
    assert scheme.is_ignored("model.layers.3.mlp.down_proj")
    assert not scheme.is_ignored("model.layers.3.mlp.up_proj")


def test_regex_is_matched_from_the_start_of_the_name():
    scheme = QuantScheme(ignore=("re:layers",))
    assert not scheme.is_ignored("model.layers.1.mlp.up_proj")
    assert QuantScheme(ignore=("re:.*layers",)).is_ignored("model.layers.1.mlp.up_proj")


def test_bad_regex_is_reported():
    with pytest.raises(
        QuantkitError, match=r"ignore pattern 're:\(' is not a valid regular expression"
    ):
        QuantScheme(ignore=("re:(",))


def test_ignore_accepts_a_single_string_and_lists():
    assert QuantScheme(ignore="lm_head").ignore == ("lm_head",)
    assert QuantScheme(ignore=["a", "b"]).ignore == ("a", "b")
    assert QuantScheme(ignore=()).is_ignored("lm_head") is False


def test_scheme_name():
    assert QuantScheme().name == "w4a16-g128-sym"
    assert (
        QuantScheme(bits=8, group_size=-1, symmetric=False).name == "w8a16-channel-asym"
    )
    assert parse_scheme("w2a16", group_size=32).name == "w2a16-g32-sym"


def test_scheme_is_frozen_and_hashable():
    scheme = QuantScheme()
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.bits = 8
    assert len({scheme, QuantScheme()}) == 1


def test_check_group_size_message():
    with pytest.raises(QuantkitError) as err:
        check_group_size(200, 128, "model.layers.0.mlp.down_proj")
    assert str(err.value) == (
        "group size 128 does not divide the input size 200 of layer 'model.layers.0.mlp.down_proj'; "
        "choose a group size that divides it or -1 for per-channel"
    )


@pytest.mark.parametrize(
    ("in_features", "group_size"), [(256, 128), (200, -1), (96, 32), (100, 25)]
)
def test_check_group_size_accepts_divisors(in_features, group_size):
    check_group_size(in_features, group_size, "layer")
