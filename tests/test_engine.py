"""The serving engine (jamba_cli/engine.py) against cold runs: every reply it streams from a restored state,
and the logits it samples them from, equal `stream_generate` on the whole prompt with a fresh cache; and
`cached_tokens` says how many prompt positions it did not compute."""

from __future__ import annotations

import pytest
import torch

import jamba_cli
from conftest import assert_close
from jamba_cli.engine import Engine
from jamba_cli.errors import ContextOverflowError, UsageError
from jamba_cli.generation import stream_generate
from jamba_cli.sample import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SYSTEM = {"role": "system", "content": "You are a player in a play by Shakespeare. Answer in verse."}
QUESTIONS = ["What news, my lord?", "And what of the king?", "Who stands at the gate?", "What said the queen?"]


@pytest.fixture(scope="module")
def bundled():
    return jamba_cli.load(dtype="fp32", device="cpu")


def logged(model, make_chunks):
    """(chunks, the logits each token was sampled from: the last prompt position's, then each decode step's)."""
    logits = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: logits.append(out[0, -1].detach().clone()))
    try:
        chunks = list(make_chunks())
    finally:
        hook.remove()
    sampled = sum(c.token is not None for c in chunks)
    return chunks, torch.stack(logits[len(logits) - sampled:])


def compare(engine: Engine, ids: list[int], params: SamplingParams = GREEDY, boundaries=(), **kwargs):
    """Stream `ids` through `engine` and cold (`kwargs` to both); assert the same chunks and logits; return the
    engine's chunks."""
    model, tokenizer = engine.model, engine.tokenizer
    warm, warm_logits = logged(model, lambda: engine.stream(ids, params, boundaries=boundaries, **kwargs))
    cold, cold_logits = logged(model, lambda: stream_generate(model, tokenizer, ids, params,
                                                              context_size=engine.context_size, **kwargs))
    assert [(c.text, c.token, c.finish_reason) for c in warm] == [(c.text, c.token, c.finish_reason) for c in cold]
    assert_close(warm_logits, cold_logits)
    assert warm[-1].stats.prompt_tokens == len(ids) and cold[-1].stats.cached_tokens == 0
    return warm


def reply_of(chunks) -> str:
    return "".join(c.text for c in chunks)


def boundaries(tokenizer, messages: list[dict]) -> list[int]:
    """Where each message ends in the rendered conversation: the tokens of the messages up to it."""
    return [len(tokenizer.encode_chat(messages[:i + 1])) for i in range(len(messages))]


def test_the_turns_of_a_conversation_each_start_from_the_last(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=2048)
    messages, previous = [SYSTEM], 0
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        chunks = compare(engine, ids, boundaries=boundaries(tokenizer, messages))
        cached = chunks[-1].stats.cached_tokens
        assert previous <= cached < len(ids)  # the whole previous prompt at least: the reply's tokens too
        assert all(c.stats.cached_tokens == cached for c in chunks)
        messages.append({"role": "assistant", "content": reply_of(chunks)})
        previous = len(ids)
    stats = engine.stats()
    assert stats["requests"] == 4 and stats["hits"] == 3 and stats["entries"] > 0


def test_a_regenerate_computes_one_token_and_samples_as_cold_with_its_seed(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=2048)
    ids = tokenizer.encode_chat([SYSTEM, {"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    first = compare(engine, ids, sampled)
    assert first[-1].stats.cached_tokens == 0
    again = compare(engine, ids, sampled)
    assert again[-1].stats.cached_tokens == len(ids) - 1
    assert [c.token for c in again] == [c.token for c in first]  # the same seed, the same reply
    other = compare(engine, ids, SamplingParams(max_tokens=10, temperature=0.9, seed=8, ignore_eos=True))
    assert other[-1].stats.cached_tokens == len(ids) - 1


def test_conversations_sharing_a_system_prompt_share_its_state(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=2048)
    system_end = len(tokenizer.encode_chat([SYSTEM]))
    for question in QUESTIONS[:3]:
        messages = [SYSTEM, {"role": "user", "content": question}]
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        assert ids[:system_end] == tokenizer.encode_chat([SYSTEM])
        chunks = compare(engine, ids, boundaries=boundaries(tokenizer, messages))
        assert chunks[-1].stats.cached_tokens == (0 if question == QUESTIONS[0] else system_end)


def test_an_edited_earlier_message_branches_and_both_branches_stay_cached(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=2048)
    messages, prompts = [SYSTEM], []
    for question in QUESTIONS[:3]:
        messages.append({"role": "user", "content": question})
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        prompts.append(ids)
        messages.append({"role": "assistant", "content": reply_of(compare(engine, ids,
                                                                          boundaries=boundaries(tokenizer, messages)))})
    # the second question edited: the state kept where the first reply ends is the last one before it
    edited = messages[:3] + [{"role": "user", "content": "Who comes there, ho?"}]
    ids = tokenizer.encode_chat(edited, add_generation_prompt=True)
    first_reply_end = boundaries(tokenizer, edited)[2]
    parted = next(i for i, (a, b) in enumerate(zip(ids, prompts[1])) if a != b)
    chunks = compare(engine, ids, boundaries=boundaries(tokenizer, edited))
    assert first_reply_end <= chunks[-1].stats.cached_tokens <= parted
    # back on the first branch: its third turn is still there
    chunks = compare(engine, prompts[2])
    assert chunks[-1].stats.cached_tokens == len(prompts[2]) - 1


def test_a_prompt_that_is_a_strict_start_of_a_cached_one(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=2048, snapshot_every=16)
    messages = [SYSTEM, {"role": "user", "content": " ".join(QUESTIONS)}]
    ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    compare(engine, ids)
    # tokens as they are (no template): the deepest state within, every 16 tokens here
    for n in (16, 17, 40, len(ids) - 1):
        chunks = compare(engine, ids[:n])
        assert chunks[-1].stats.cached_tokens == (n - 1) // 16 * 16


def test_a_tiny_budget_evicts_and_stays_exact(bundled):
    model, tokenizer = bundled
    c = model.config
    mamba_layers = sum(not c.is_attention(i) for i in range(c.num_hidden_layers))
    state = mamba_layers * c.d_inner * ((c.mamba_d_conv - 1) * model.dtype.itemsize + c.mamba_d_state * 4)
    kv = (c.num_hidden_layers - mamba_layers) * 2 * c.num_key_value_heads * c.head_dim * model.dtype.itemsize
    budget = 6 * state + 200 * kv  # a request keeps 5 states: a few more, and each pushes older ones out
    engine = Engine(model, tokenizer, context_size=2048, cache_budget=budget)
    system_end = len(tokenizer.encode_chat([SYSTEM]))
    for i, question in enumerate(QUESTIONS + QUESTIONS[:2]):
        messages = [SYSTEM, {"role": "user", "content": question}]
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        chunks = compare(engine, ids, boundaries=boundaries(tokenizer, messages))
        stats = engine.stats()
        assert sum(stats["bytes"].values()) <= budget and stats["entries"] >= 1
        # the shared system prompt, used by every request, stays; the states of the question asked four
        # requests before (which would give len(ids) - 1) are gone
        assert chunks[-1].stats.cached_tokens == (0 if i == 0 else system_end)
    assert stats["tokens_reused"] == 5 * system_end


def test_the_repetition_penalty_sees_the_restored_tokens(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=2048)
    penalized = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.8, ignore_eos=True)
    ids = tokenizer.encode_chat([SYSTEM, {"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    compare(engine, ids, penalized)
    chunks = compare(engine, ids, penalized)  # from the state at the last token but one
    assert chunks[-1].stats.cached_tokens == len(ids) - 1


def test_logits_processors_given_see_the_whole_prompt_and_control_tokens_can_be_left_out(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=2048)

    def unseen(history, logits):  # no token of the prompt or the reply again: depends on every token seen
        return logits.scatter(-1, history, float("-inf"))

    ids = tokenizer.encode_chat([SYSTEM, {"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    compare(engine, ids, params, logits_processors=[unseen])
    chunks = compare(engine, ids, params, logits_processors=[unseen], special=False)
    assert chunks[-1].stats.cached_tokens == len(ids) - 1


def test_stop_strings_and_end_of_text_end_a_reply_as_cold(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=2048)
    ids = tokenizer.encode_chat([SYSTEM, {"role": "user", "content": QUESTIONS[1]}], add_generation_prompt=True)
    free = compare(engine, ids, SamplingParams(max_tokens=40, temperature=0.0))
    text = reply_of(free)
    stop = text.strip()[3:6]
    assert stop
    chunks = compare(engine, ids, SamplingParams(max_tokens=40, temperature=0.0, stop=(stop,)))
    assert chunks[-1].finish_reason == "stop_string" and stop not in reply_of(chunks)


def test_a_stream_stopped_in_the_prompt_or_dropped_leaves_the_engine_exact(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=2048, snapshot_every=8)
    ids = tokenizer.encode_chat([SYSTEM, {"role": "user", "content": QUESTIONS[2]}], add_generation_prompt=True)
    polls = iter(range(100))
    chunks = list(engine.stream(ids, GREEDY, should_stop=lambda: next(polls) >= 2))
    assert len(chunks) == 1 and chunks[0].token is None and chunks[0].finish_reason == "interrupted"
    # a client that goes away after two tokens
    stream = engine.stream(ids, GREEDY)
    next(stream), next(stream)
    stream.close()
    chunks = compare(engine, ids)
    assert chunks[-1].stats.cached_tokens == len(ids) - 1
    # a stream left open while another request runs cannot go on over that request's cache
    stale = engine.stream(ids, GREEDY)
    next(stale)
    compare(engine, tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[3]}], add_generation_prompt=True))
    with pytest.raises(RuntimeError, match="later request"):
        next(stale)
    compare(engine, ids)


def test_prompts_that_cannot_run_are_refused_at_the_call(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=64)
    with pytest.raises(UsageError, match="empty"):
        engine.stream([], GREEDY)
    with pytest.raises(ContextOverflowError, match="needs 65 tokens but the context holds 64"):
        engine.stream([5] * 65, GREEDY)
    with pytest.raises(UsageError, match="snapshot_every"):
        Engine(model, tokenizer, snapshot_every=0)
    assert engine.stats()["requests"] == 0


def test_a_deeper_model_with_snapshots_inside_a_long_prompt(mini):
    model, tokenizer = mini  # 16 layers, attention on two: the tests' tiny checkpoint
    engine = Engine(model, tokenizer, context_size=1024, snapshot_every=32)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 3
    first = tokenizer.encode(text)
    compare(engine, first, params)
    longer = first + tokenizer.encode(" The slings and arrows", add_special_tokens=False)
    chunks = compare(engine, longer, params)
    assert chunks[-1].stats.cached_tokens >= len(first)
    edited = first[:50] + tokenizer.encode(" Now is the winter", add_special_tokens=False)
    chunks = compare(engine, edited, params)
    assert chunks[-1].stats.cached_tokens == 32


def test_clear_forgets_every_state(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, context_size=2048)
    ids = tokenizer.encode_chat([SYSTEM, {"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    compare(engine, ids)
    engine.clear()
    assert engine.stats()["entries"] == 0 and engine.stats()["bytes"] == {}
    assert compare(engine, ids)[-1].stats.cached_tokens == 0


@pytest.mark.slow
def test_the_gpu_benchmark_runs_on_the_cpu_with_a_tiny_shape(tmp_path):
    # so that a run on a GPU cannot fail on something a CPU could have caught
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "serve.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_serve_cache.py"), "--random", "--shape", "tiny",
                    "--prompt", "600", "--max-tokens", "4", "--out", str(out)],
                   check=True, env=os.environ, capture_output=True)
    report = json.loads(out.read_text())
    first, follow = report["first_turn"], report["follow_up"]
    assert first["cached_tokens"] == 0 and first["cold_cached_tokens"] == 0
    assert first["prompt_tokens"] <= follow["cached_tokens"] < follow["prompt_tokens"]
    assert follow["same_reply"] and follow["max_rel_logit_diff"] < 1e-4
    assert report["follow_up_ttft_s"]["cached"] > 0 and report["follow_up_ttft_s"]["cold"] > 0
    assert all(check["pass"] for check in report["checks"])
