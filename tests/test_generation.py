"""stream_generate and generate on a real tiny checkpoint: text, finish reasons, stop strings, seeds,
cache continuation, prompt cache files, context limits."""

import copy

import pytest
import torch

from jamba_cli.cache import make_cache
from jamba_cli.errors import ContextOverflowError, PromptCacheError, SamplingError
from jamba_cli.generation import StopStrings, generate, generate_step, prompt_ids, stream_generate
from jamba_cli.loader import load
from jamba_cli.sample import SamplingParams

PROMPT = "To be, or not to be"


def greedy_ids(model, ids, n):
    return [int(t) for t in generate_step(model, torch.tensor(ids), max_tokens=n)]


def run(model, tok, prompt=PROMPT, **kw):
    chunks = list(stream_generate(model, tok, prompt, **kw))
    return "".join(c.text for c in chunks), chunks


def test_stream_text_equals_decoded_greedy_tokens(small):
    model, tok = small
    want = greedy_ids(model, tok.encode(PROMPT), 12)
    text, chunks = run(model, tok, max_tokens=12, ignore_eos=True)
    assert [c.token for c in chunks] == want
    assert text == tok.decode(want)
    assert [c.finish_reason for c in chunks] == [None] * 11 + ["length"]
    assert generate(model, tok, PROMPT, max_tokens=12, ignore_eos=True) == text
    assert generate(model, tok, tok.encode(PROMPT), max_tokens=12, temperature=0.0, seed=None, ignore_eos=True) == text


def test_eos_ids_end_generation_and_are_not_text(small):
    model, tok = small
    want = greedy_ids(model, tok.encode(PROMPT), 6)
    text, chunks = run(model, tok, max_tokens=6, eos_token_ids=[999, want[3]])
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token == want[3]
    assert text == tok.decode(want[:3])
    assert chunks[-1].stats.generation_tokens == 3


def test_default_eos_includes_end_of_turn(small):
    model, tok = small
    ids = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    first = greedy_ids(model, ids, 1)[0]
    patched = copy.copy(tok)
    patched.end_of_turn_ids = [first]  # as if the model answered with <|eom|> at once
    text, chunks = run(model, patched, [{"role": "user", "content": "hi"}], max_tokens=5)
    assert (text, chunks[-1].finish_reason, len(chunks)) == ("", "stop", 1)


def test_stop_string_across_tokens_is_withheld_then_trimmed(small):
    model, tok = small
    ids = greedy_ids(model, tok.encode(PROMPT), 30)
    pieces = [tok.decode(ids[:i + 1]) for i in range(30)]
    full = pieces[-1]
    # a stop string that starts inside one token's text and ends inside a later one's
    k = next(i for i in range(5, 29)
             if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) > len(pieces[i]))
    stop = full[len(pieces[k]) - 1:len(pieces[k]) + 1]
    text, chunks = run(model, tok, max_tokens=30, stop=[stop], ignore_eos=True)
    assert chunks[-1].finish_reason == "stop_string"
    assert text == full[:full.find(stop)]
    emitted = ""
    for c in chunks:
        emitted += c.text
        assert full.startswith(emitted) and stop not in emitted


def test_stop_strings_unit():
    s = StopStrings(["o w", "xyz"])
    assert s.feed("Hel") == ("Hel", False)
    assert s.feed("lo") == ("l", False)  # "o" could begin "o w"
    assert s.feed(" ") == ("", False)
    assert s.feed("wor") == ("", True)
    s = StopStrings(["ab"])
    assert s.feed("xa") == ("x", False)
    assert s.feed("c") == ("ac", False)
    assert s.feed("a") == ("", False) and s.flush() == "a"


def test_should_stop_interrupts_and_keeps_partial_text(small):
    model, tok = small
    chunks = []  # polled after each token (and between the prompt's chunks): the fourth token stops it
    for chunk in stream_generate(model, tok, PROMPT, max_tokens=50, ignore_eos=True,
                                 should_stop=lambda: len(chunks) >= 3):
        chunks.append(chunk)
    assert chunks[-1].finish_reason == "interrupted" and len(chunks) == 4
    assert "".join(c.text for c in chunks) == tok.decode([c.token for c in chunks])


def test_should_stop_is_polled_between_prompt_chunks(small):
    """Stopped inside the prompt: no token, finish_reason interrupted, the cache holds the chunks before."""
    model, tok = small
    ids = tok.encode(" ".join([PROMPT] * 8))
    polls = []
    stop_third = lambda: polls.append(1) or len(polls) >= 3
    cache = make_cache(model.config, 1, dtype=model.dtype, device=model.layer_devices())
    chunks = list(stream_generate(model, tok, ids, max_tokens=5, should_stop=stop_third, prefill_chunk=4,
                                  cache=cache))
    assert [(c.token, c.finish_reason) for c in chunks] == [(None, "interrupted")]
    assert chunks[0].stats.generation_tokens == 0 and cache.offset == 8  # two chunks of 4, then the stop


def test_seeds_and_generation_config_defaults(small):
    model, tok = small
    sample = lambda seed, t=None, tk=tok: run(model, tk, max_tokens=10, temperature=t, seed=seed, ignore_eos=True)[0]
    assert sample(1, 1.0) == sample(1, 1.0)
    assert sample(1, 1.0) != sample(2, 1.0)
    greedy = sample(None, 0.0)
    assert sample(5) == greedy  # the checkpoint's generation_config has no do_sample: greedy
    hot = copy.copy(tok)
    hot.generation_config = {"do_sample": True, "temperature": 5.0, "top_k": 0, "max_new_tokens": 3}
    assert sample(1, tk=hot) != sample(2, tk=hot)
    assert sample(3, 0.0, hot) == greedy[:len(sample(3, 0.0, hot))]
    assert len(list(stream_generate(model, hot, PROMPT, ignore_eos=True))) == 3


def test_sampling_params_and_knobs_ask_for_the_same_thing(small):
    model, tok = small
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=4, stop=("zz",), ignore_eos=True)
    text, chunks = run(model, tok, sampling=params)
    knobs = dict(max_tokens=8, temperature=1.0, top_k=20, seed=4, stop=["zz"], ignore_eos=True)
    text_k, chunks_k = run(model, tok, **knobs)
    assert (text_k, [c.token for c in chunks_k]) == (text, [c.token for c in chunks])
    assert generate(model, tok, PROMPT, params) == generate(model, tok, PROMPT, **knobs) == text
    # a knob given beside `sampling` wins over the same field; None leaves the field as it is
    assert run(model, tok, sampling=params, seed=5, top_k=None)[0] == run(model, tok, **{**knobs, "seed": 5})[0]


def test_unknown_or_out_of_range_knobs_fail_at_the_call(small):
    model, tok = small
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        stream_generate(model, tok, PROMPT, temprature=0.5)  # raised before the first chunk is asked for
    with pytest.raises(TypeError, match="'temprature'"):
        generate(model, tok, PROMPT, max_tokens=2, temprature=0.5)
    with pytest.raises(SamplingError, match=r"top_p: 1.5 is out of range \(0 < top_p <= 1\)"):
        stream_generate(model, tok, PROMPT, top_p=1.5)


def test_stats(small):
    model, tok = small
    _, chunks = run(model, tok, max_tokens=5, ignore_eos=True)
    s = chunks[-1].stats
    assert (s.prompt_tokens, s.cached_tokens, s.generation_tokens) == (len(tok.encode(PROMPT)), 0, 5)
    assert s.ttft_s > 0 and s.prompt_tps > 0 and s.generation_tps > 0 and s.peak_memory_bytes > 0


def test_a_cache_continues_where_the_last_reply_stopped(small):
    """The cache keeps the prompt and every sampled token but the last: feeding that token and more equals
    a fresh run on the whole sequence."""
    from jamba_cli.cache import make_cache

    model, tok = small
    turn1 = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    cache = make_cache(model.config, 1, dtype=model.dtype)
    _, chunks = run(model, tok, turn1, max_tokens=6, ignore_eos=True, cache=cache)
    sampled = [c.token for c in chunks]
    assert cache.offset == len(turn1) + len(sampled) - 1
    turn2 = [sampled[-1]] + tok.encode("<|eom|><|bom|><|user|> more<|eom|><|bom|><|assistant|>",
                                       add_special_tokens=False)
    text, _ = run(model, tok, turn2, max_tokens=6, ignore_eos=True, cache=cache)
    fresh, _ = run(model, tok, turn1 + sampled[:-1] + turn2, max_tokens=6, ignore_eos=True)
    assert text == fresh


def test_prompt_cache_file_reuses_the_prefix(small, tmp_path):
    model, tok = small
    path = tmp_path / "p.cache"
    base = PROMPT + " that is the question whether"
    plain, _ = run(model, tok, base, max_tokens=8, ignore_eos=True)
    first, chunks = run(model, tok, base, max_tokens=8, ignore_eos=True, prompt_cache=path)
    assert first == plain and chunks[-1].stats.cached_tokens == 0 and path.exists()
    again, chunks = run(model, tok, base, max_tokens=8, ignore_eos=True, prompt_cache=path)
    assert again == plain and chunks[-1].stats.cached_tokens == len(tok.encode(base)) - 1
    longer = base + " tis nobler in the mind"
    want, _ = run(model, tok, longer, max_tokens=8, ignore_eos=True)
    got, chunks = run(model, tok, longer, max_tokens=8, ignore_eos=True, prompt_cache=path)
    assert got == want and chunks[-1].stats.cached_tokens == len(tok.encode(base)) - 1
    other, _ = run(model, tok, "Now is the winter", max_tokens=8, ignore_eos=True, prompt_cache=path)
    assert other == run(model, tok, "Now is the winter", max_tokens=8, ignore_eos=True)[0]  # no prefix: full run


def test_prompt_cache_refuses_another_model_or_dtype(small, checkpoints, tmp_path):
    from conftest import CONFIGS, make_hf_model, save_checkpoint

    model, tok = small
    path = tmp_path / "p.cache"
    run(model, tok, max_tokens=1, prompt_cache=path)
    twin_dir = save_checkpoint(make_hf_model(seed=1, **CONFIGS["top1"]), tmp_path / "twin",
                               checkpoints["top1"][0])
    twin, _ = load(twin_dir, dtype="fp32", device="cpu")  # same shapes, other weights
    with pytest.raises(PromptCacheError, match="another model"):
        run(twin, tok, max_tokens=1, prompt_cache=path)
    half, _ = load(checkpoints["top1"][0], dtype="bf16", device="cpu")
    with pytest.raises(PromptCacheError, match="dtype float32"):
        run(half, tok, max_tokens=1, prompt_cache=path)
    path.write_bytes(path.read_bytes()[:-100])  # the header whole, the data cut short
    with pytest.raises(PromptCacheError, match="cannot read"):
        run(model, tok, max_tokens=1, prompt_cache=path)


def test_context_size_limits_prompt_and_reply(small):
    model, tok = small
    n = len(tok.encode(PROMPT))
    with pytest.raises(ContextOverflowError, match=f"needs {n} tokens but the context holds {n - 1}"):
        run(model, tok, context_size=n - 1)
    _, chunks = run(model, tok, max_tokens=50, ignore_eos=True, context_size=n + 3)
    assert len(chunks) == 4 and chunks[-1].finish_reason == "length"


def test_prompt_kinds(small):
    _, tok = small
    messages = [{"role": "user", "content": "hi"}]
    assert prompt_ids(tok, messages) == tok.encode_chat(messages, add_generation_prompt=True)
    assert prompt_ids(tok, "hi") == tok.encode("hi") and prompt_ids(tok, [5, 6]) == [5, 6]
