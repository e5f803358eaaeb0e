"""The bundled model (jamba_cli/assets/): its Hugging Face format, its tokenizer and chat template, its
quality on held-out Shakespeare, and `jamba_cli.load()` with no argument."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

import jamba_cli
from conftest import assert_close
from jamba_cli.defaults import bundled_model_dir
from jamba_cli.generation import generate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from eval_ppl import mean_nll, unigram_perplexity  # noqa: E402

EXCERPT = Path(__file__).parent / "data" / "shakespeare_val.txt"
# Perplexity of the committed model on the excerpt as `python tools/eval_ppl.py` measures it (93.43 for the
# H200-trained model, on CPU as on the GPU), with 3% headroom. Retraining: set it from the new figure.
PPL_BOUND = 96.5
SIZE_LIMIT = 16_000_000


@pytest.fixture(scope="module")
def bundled():
    return jamba_cli.load(dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def info() -> dict:
    return json.loads((bundled_model_dir() / "training.json").read_text())


def test_load_without_argument_gives_the_bundled_hybrid_model(bundled):
    model, tok = bundled
    cfg = model.config
    directory = bundled_model_dir()
    assert cfg.to_dict() == json.loads((directory / "config.json").read_text())
    kinds = [("attention" if layer.is_attn else "mamba", type(layer.feed_forward).__name__)
             for layer in model.model.layers]
    assert sum(k == "attention" for k, _ in kinds) >= 2 and sum(k == "mamba" for k, _ in kinds) >= 2
    assert {"SparseMoE", "MLP"} <= {ff for _, ff in kinds}
    assert cfg.num_experts >= 4 and cfg.num_experts_per_tok == 2
    assert sum(f.stat().st_size for f in directory.iterdir()) <= SIZE_LIMIT
    assert tok.vocab_size == cfg.vocab_size
    text = generate(model, tok, "ROMEO:", max_tokens=24)
    assert len(text.split()) >= 3


def test_transformers_loads_it_and_its_logits_equal_ours(bundled):
    from transformers import AutoTokenizer, JambaForCausalLM

    model, tok = bundled
    directory = bundled_model_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = JambaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        hf_tok = AutoTokenizer.from_pretrained(directory)
    text = EXCERPT.read_text()[:400]
    ids = tok.encode(text)
    assert hf_tok(text).input_ids == ids and ids[0] == tok.bos_token_id
    batch = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        want = reference(batch).logits
        got = model(batch)
    assert_close(got, want)


def test_tokenizer_has_jambas_special_tokens_and_byte_fallback(bundled):
    _, tok = bundled
    for i, token in enumerate(["<|pad|>", "<|startoftext|>", "<|endoftext|>"]):
        assert tok.token_to_id(token) == i
    for token in ["<|bom|>", "<|eom|>", "<|system|>", "<|user|>", "<|assistant|>", "<0x0A>", "<0xFF>"]:
        assert tok.token_to_id(token) is not None
    text = "ROMEO:\nBut soft, what light — café 日本\n\nJULIET:\n  Ay me!"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.token_to_id("<0xC3>") in ids  # é is not in the vocabulary: its UTF-8 bytes are
    raw = Tokenizer.from_file(str(bundled_model_dir() / "tokenizer.json"))
    pieces = raw.encode("What news, my lord?", add_special_tokens=False).tokens
    assert pieces[0].startswith("▁") and pieces[1].startswith("▁")  # Llama-style word pieces


def test_chat_template_renders_the_jamba_format():
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_tok = AutoTokenizer.from_pretrained(bundled_model_dir())
    one = [{"role": "user", "content": "What news, my lord?"}]
    assert hf_tok.apply_chat_template(one, tokenize=False, add_generation_prompt=True) == \
        "<|startoftext|><|bom|><|system|> <|eom|><|bom|><|user|> What news, my lord?<|eom|><|bom|><|assistant|>"
    turns = [{"role": "system", "content": "Speak in verse."}, *one, {"role": "assistant", "content": "Good."}]
    assert hf_tok.apply_chat_template(turns, tokenize=False) == (
        "<|startoftext|><|bom|><|system|> Speak in verse.<|eom|><|bom|><|user|> What news, my lord?"
        "<|eom|><|bom|><|assistant|> Good.<|eom|>")
    eom = hf_tok.convert_tokens_to_ids("<|eom|>")
    config = json.loads((bundled_model_dir() / "generation_config.json").read_text())
    assert eom in config["eos_token_id"] and 2 in config["eos_token_id"]


@pytest.mark.slow
def test_validation_perplexity_is_far_below_unigram(bundled, info):
    model, tok = bundled
    ids = tok.encode(EXCERPT.read_text(), add_special_tokens=False)
    ppl = math.exp(mean_nll(model, ids, tok.bos_token_id, info["seq_len"]))
    unigram = unigram_perplexity(ids, tok.vocab_size)  # the best unigram model of this very text
    assert ppl <= PPL_BOUND
    assert ppl < unigram / 3
    assert ppl == pytest.approx(info["excerpt"]["perplexity"], rel=0.01)  # the figure training recorded


def _jamba(*args, stdin: str) -> "subprocess.CompletedProcess[str]":
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "JAMBA_MODEL"}
    return subprocess.run([sys.executable, "-m", "jamba_cli", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.slow
def test_run_uses_the_bundled_model_by_default():
    r = _jamba("run", "-n", "60", "--seed", "0", "--raw", stdin="ROMEO:\n")
    assert r.returncode == 0, r.stderr
    assert "jamba-tiny-shakespeare" in r.stderr  # says once which model it uses
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) >= 3 and any(line.isupper() and line.endswith(":") for line in lines)  # a speaker's tag
    assert "<|" not in r.stdout


@pytest.mark.slow
def test_chat_answers_in_the_dialogue_style():
    replies = []
    for seed in range(3):  # sampled replies (generation_config.json): a few seeds, so one terse line cannot fail it
        r = _jamba("chat", "--seed", str(seed), stdin="What news, my lord?\n/bye\n")
        assert r.returncode == 0, r.stderr
        replies.append(r.stdout.strip())
    assert all(reply and "<|" not in reply and "What news" not in reply for reply in replies)
    assert max(len(reply.split()) for reply in replies) >= 5
