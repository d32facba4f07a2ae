"""SamplingParams: defaults are valid, each bad field is named in the error."""

from __future__ import annotations

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.runtime.sampling_params import SamplingParams


def test_defaults_are_valid_and_sampled():
    params = SamplingParams().validate(max_model_len=128)
    assert not params.greedy and params.n == 1 and params.stop == [] and params.stop_token_ids == []


def test_greedy_and_logprobs_flags():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(logprobs=True).wants_logprobs
    assert SamplingParams(logprobs=3).wants_logprobs
    assert not SamplingParams(logprobs=0).wants_logprobs


def test_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", "hot"),
    ("top_k", -2),
    ("top_k", 2.5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("seed", 1.5),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("n", 0),
    ("stop", [""]),
    ("stop", [3]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["a"]),
    ("ignore_eos", "yes"),
    ("logprobs", -1),
    ("logprobs", "many"),
])
def test_bad_value_names_its_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(QuantkitError, match=f"'{field}'"):
        params.validate()


def test_max_tokens_beyond_the_context_is_refused_when_the_context_is_known():
    SamplingParams(max_tokens=100).validate()
    with pytest.raises(QuantkitError, match="max_tokens.*64"):
        SamplingParams(max_tokens=100).validate(max_model_len=64)


@pytest.mark.parametrize("top_k", [-1, 0, 1, 50])
def test_top_k_off_values_and_positive_values_are_accepted(top_k):
    SamplingParams(top_k=top_k).validate()


def test_generator_is_reproducible_and_differs_per_sample_index():
    params = SamplingParams(seed=1234)
    a = torch.rand(4, generator=params.make_generator())
    b = torch.rand(4, generator=params.make_generator())
    c = torch.rand(4, generator=params.make_generator(sample_index=1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert SamplingParams().make_generator() is None
