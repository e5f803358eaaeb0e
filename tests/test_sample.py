"""Samplers and logits processors on hand-built distributions."""

import math

import pytest
import torch

from jamba_cli.errors import ConfigError, SamplingError, UsageError
from jamba_cli.sample import (SamplingParams, apply_min_p, apply_top_k, apply_top_p, make_sampler,
                              repetition_penalty)

PROBS = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
LOGITS = PROBS.log()


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def test_top_k_keeps_the_k_largest():
    assert kept(apply_top_k(LOGITS, 2)) == [True, True, False, False, False]
    assert kept(apply_top_k(LOGITS, 0)) == [True] * 5


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept(apply_top_p(LOGITS, 0.5)) == [True, False, False, False, False]
    assert kept(apply_top_p(LOGITS, 0.6)) == [True, True, False, False, False]
    assert kept(apply_top_p(LOGITS, 0.9)) == [True, True, True, False, False]
    shuffled = LOGITS[:, [3, 0, 4, 2, 1]]  # order in the vocabulary must not matter
    assert kept(apply_top_p(shuffled, 0.6)) == [False, True, False, False, True]


def test_min_p_is_relative_to_the_top_token():
    assert kept(apply_min_p(LOGITS, 0.3)) == [True, True, True, False, False]  # 0.15 >= 0.3 * 0.5
    assert kept(apply_min_p(LOGITS, 0.0)) == [True] * 5


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert make_sampler(0.0)(logits).tolist() == [1, 0]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.zeros(1, 50)
    sampler_a = make_sampler(1.0, generator=torch.Generator().manual_seed(7))
    sampler_b = make_sampler(1.0, generator=torch.Generator().manual_seed(7))
    sampler_c = make_sampler(1.0, generator=torch.Generator().manual_seed(8))
    a = [int(sampler_a(logits)) for _ in range(20)]
    assert a == [int(sampler_b(logits)) for _ in range(20)]
    assert a != [int(sampler_c(logits)) for _ in range(20)]


def test_sample_frequencies_follow_the_tempered_distribution():
    n = 20000
    for temperature in (1.0, 0.5):
        sampler = make_sampler(temperature, generator=torch.Generator().manual_seed(0))
        tokens = sampler(LOGITS.expand(n, -1))
        freq = torch.bincount(tokens, minlength=5).float() / n
        want = (LOGITS[0] / temperature).softmax(-1)
        assert (freq - want).abs().max() < 4 * math.sqrt(0.25 / n)


def test_combined_filters_never_sample_a_dropped_token():
    sampler = make_sampler(1.5, top_k=3, top_p=0.8, generator=torch.Generator().manual_seed(0))
    tokens = sampler(LOGITS.expand(5000, -1))
    assert set(tokens.tolist()) == {0, 1, 2}  # top-p 0.8 needs three tokens; top-k 3 caps it there


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.0)])
def test_invalid_knobs_raise(bad):
    with pytest.raises(SamplingError):  # the same check as SamplingParams'
        make_sampler(**bad)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = repetition_penalty(2.0)(torch.tensor([[0, 1, 1]]), logits)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert repetition_penalty(1.0)(torch.tensor([[0]]), logits) is logits


def test_params_from_generation_config_follow_transformers():
    greedy = SamplingParams(max_tokens=512, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    assert SamplingParams.from_generation_config({}) == greedy
    assert SamplingParams.from_generation_config({"temperature": 0.6, "top_p": 0.9}) == greedy
    got = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                 "repetition_penalty": 1.1, "top_k": None, "max_new_tokens": 7})
    assert got == SamplingParams(max_tokens=7, temperature=0.6, top_k=50, top_p=0.9, min_p=0.0,
                                 repetition_penalty=1.1)
    assert got.override(temperature=0.0, top_k=None).temperature == 0.0
    assert got.override(temperature=0.0, top_k=None).top_k == 50
    assert SamplingParams(repetition_penalty=1.3).logits_processors()
    assert SamplingParams().logits_processors() == []


def test_resolve_keeps_what_was_given_and_fills_the_rest():
    config = {"do_sample": True, "temperature": 0.6, "max_new_tokens": 9}
    got = SamplingParams(temperature=0.0, seed=3, stop=["\n"]).resolve(config)
    assert got == SamplingParams(max_tokens=9, temperature=0.0, top_k=50, top_p=1.0, min_p=0.0,
                                 repetition_penalty=1.0, seed=3, stop=("\n",))
    assert SamplingParams().resolve({}) == SamplingParams.from_generation_config({})


def test_stop_is_a_tuple_of_strings():
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)  # one string is one stop string, not its characters
    assert hash(SamplingParams(stop=["a"])) == hash(SamplingParams(stop=("a",)))


@pytest.mark.parametrize("field, bad, good, message", [
    ("max_tokens", -1, 0, "max_tokens: -1 is out of range (max_tokens >= 0)"),
    ("temperature", -0.5, 0.0, "temperature: -0.5 is out of range (temperature = 0 or 0.01 <= temperature < inf)"),
    ("top_k", -1, 0, "top_k: -1 is out of range (0 <= top_k < 2^31)"),
    ("top_p", 0.0, 1.0, "top_p: 0.0 is out of range (0 < top_p <= 1)"),
    ("top_p", 1.5, 1e-6, "top_p: 1.5 is out of range (0 < top_p <= 1)"),
    ("min_p", 1.0, 0.0, "min_p: 1.0 is out of range (0 <= min_p < 1)"),
    ("repetition_penalty", 0.0, 0.1, "repetition_penalty: 0.0 is out of range (0.01 <= repetition_penalty <= 100)"),
    ("temperature", float("nan"), 2.0,
     "temperature: nan is out of range (temperature = 0 or 0.01 <= temperature < inf)"),
])
def test_each_range_is_checked_on_construction(field, bad, good, message):
    SamplingParams(**{field: good})
    with pytest.raises(SamplingError) as err:
        SamplingParams(**{field: bad})
    assert str(err.value) == message and (err.value.param, err.value.value) == (field, bad)
    assert isinstance(err.value, UsageError) and isinstance(err.value, ValueError) and err.value.exit_code == 2
    with pytest.raises(SamplingError):
        SamplingParams().override(**{field: bad})


def test_a_bad_generation_config_blames_the_file():
    with pytest.raises(ConfigError, match=r"generation_config.json: top_p: 2.0 is out of range"):
        SamplingParams.from_generation_config({"do_sample": True, "top_p": 2.0})
