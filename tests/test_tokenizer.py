"""Chat templates against transformers' apply_chat_template, and the streaming detokenizer's invariant."""

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import shared_data
from jamba_cli.errors import ChatTemplateError
from jamba_cli.tokenizer import StreamingDetokenizer, load_tokenizer

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"name": "now", "description": "The time – «ünïcode»", "parameters": {"type": "object", "properties": {}}},
]
DOCUMENTS = [{"title": "Doc A", "text": "Alpha text", "source": "wiki"}, {"text": "Beta <b>bold</b>"}]
TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "What's the weather in Paris?"}]
SYSTEM = [{"role": "system", "content": "You are brief."}]


def _copy_tokenizer(src: Path, dst: Path, template: str | None = None) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    if template is not None:
        (dst / "chat_template.jinja").write_text(template)
    return dst


@pytest.fixture(scope="module")
def jamba17(tokenizer_dir, tmp_path_factory):
    """(ours, transformers') tokenizers for a checkpoint that ships the Jamba Mini 1.7 template."""
    from transformers import AutoTokenizer

    template = shared_data("jamba_1_7_chat_template.jinja")  # AI21's file, read from the shared data
    d = _copy_tokenizer(tokenizer_dir, tmp_path_factory.mktemp("t17") / "tok", template.read_text())
    return load_tokenizer(d), AutoTokenizer.from_pretrained(d)


def _both(ours, hf, messages, **kwargs):
    want = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    got = ours.apply_chat_template(messages, **kwargs)
    assert got == want
    want_ids = list(hf.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"])
    assert ours.encode_chat(messages, **kwargs) == want_ids
    return got


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("documents", [None, DOCUMENTS])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_jamba_17_template_equals_transformers(jamba17, system, tools, documents, add_generation_prompt):
    ours, hf = jamba17
    messages = (SYSTEM if system else []) + TURNS
    text = _both(ours, hf, messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt)
    assert text.count("<|startoftext|>") == 1  # the template writes BOS; encoding must not add another
    assert ours.encode_chat(messages, tools=tools, documents=documents).count(ours.bos_token_id) == 1
    assert ("get_weather" in text) == bool(tools) and ("Alpha text" in text) == bool(documents)


def test_jamba_17_tool_calls_names_and_knobs_equal_transformers(jamba17):
    ours, hf = jamba17
    messages = SYSTEM + TURNS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"name": "now", "arguments": "{}"}]},
        {"role": "tool", "name": "get_weather", "content": {"temp_c": 21}},
        {"role": "assistant", "content": "21 °C.", "citations": [{"document_id": 0}]},
        {"role": "user", "content": "Thanks"}]
    knobs = {"is_set": True, "citation_mode": "fast", "response_format": "json_object"}
    text = _both(ours, hf, messages, documents=DOCUMENTS, knobs=knobs, add_generation_prompt=True)
    assert "<tool_calls>" in text and "Citation Mode" in text and "<|tool|> (get_weather){" in text


def test_raise_exception_in_a_template_is_a_one_line_error(jamba17):
    ours, hf = jamba17
    bad_tools = [{"type": "retrieval", "function": {"name": "x"}}]
    with pytest.raises(Exception, match="only supported tool type"):
        hf.apply_chat_template(TURNS, tools=bad_tools, tokenize=False)
    with pytest.raises(ChatTemplateError, match="only supported tool type is `function`"):
        ours.apply_chat_template(TURNS, tools=bad_tools)


JINJA_FEATURES = """{%- macro fmt(m) -%}[{{ m.role | upper }}]{% endmacro -%}
{%- set ns = namespace(n=0, last='') -%}
{{ bos_token }}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% if m.role == 'stop' %}{% break %}{% endif %}
  {% set ns.n = ns.n + 1 %}{% set ns.last = m.role %}
  {{ fmt(m) }} {% generation %}{{ m.content }}{% endgeneration %}
  {% if m.meta is defined %}{{ m.meta | tojson(indent=2) }}{{ m.meta | tojson }}{% endif %}
{% endfor %}
{{ ns.n }} {{ ns.last }} {{ eos_token }} {{ pad_token }}{{ loop_var | default('-') }}
{% if add_generation_prompt %}<gen>{% endif %}"""


def test_jinja_features_render_like_transformers(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    d = _copy_tokenizer(tokenizer_dir, tmp_path / "tok", JINJA_FEATURES)
    ours, hf = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    messages = [{"role": "user", "content": "a < b & \"c\"", "meta": {"k": [1, "é", None]}},
                {"role": "skip", "content": "hidden"}, {"role": "assistant", "content": "ok", "meta": None},
                {"role": "stop", "content": "x"}, {"role": "user", "content": "never"}]
    for gp in (True, False):
        assert _both(ours, hf, messages, add_generation_prompt=gp)


def test_namespace_rejects_underscore_attributes(tokenizer_dir, tmp_path):
    d = _copy_tokenizer(tokenizer_dir, tmp_path / "tok", "{% set ns = namespace(_x=1) %}{{ ns._x }}")
    with pytest.raises(Exception, match="underscore"):
        load_tokenizer(d).apply_chat_template(TURNS)


def test_builtin_jamba_format_equals_the_17_template(tokenizer_dir, jamba17):
    plain = load_tokenizer(tokenizer_dir)  # the tiny tokenizer ships no template but has <|bom|> and friends
    assert plain.chat_template is None and plain.has_chat_format
    official = jamba17[0]
    for messages in (TURNS, SYSTEM + TURNS, SYSTEM, [{"role": "user", "content": ""}]):
        for gp in (True, False):
            assert plain.apply_chat_template(messages, add_generation_prompt=gp) == \
                official.apply_chat_template(messages, add_generation_prompt=gp)
    with pytest.raises(ChatTemplateError, match="tools"):
        plain.apply_chat_template(TURNS, tools=TOOLS)


def test_no_chat_format_is_a_clear_error(tokenizer_dir, tmp_path):
    d = _copy_tokenizer(tokenizer_dir, tmp_path / "tok")
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace("<|bom|>", "<|xyz|>"))
    tok = load_tokenizer(d)
    assert not tok.has_chat_format
    with pytest.raises(ChatTemplateError, match="no chat template; give the prompt as text"):
        tok.apply_chat_template(TURNS)


def test_template_sources_and_eos_lists(tokenizer_dir, tmp_path):
    d = _copy_tokenizer(tokenizer_dir, tmp_path / "tok", "FILE{{ messages[0].content }}")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "DEFAULT"}, {"name": "tool_use", "template": "TOOLS"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4], "do_sample": True}))
    tok = load_tokenizer(d)
    assert tok.apply_chat_template(TURNS) == "FILEHi"  # chat_template.jinja wins, as in transformers
    (d / "chat_template.jinja").unlink()
    tok = load_tokenizer(d)
    assert tok.apply_chat_template(TURNS) == "DEFAULT"
    assert tok.apply_chat_template(TURNS, tools=TOOLS) == "TOOLS"
    assert tok.eos_token_ids == [2, 4] and tok.end_of_turn_ids == [tok.token_to_id("<|eom|>")]
    assert tok.generation_config["do_sample"] is True


# -- streaming detokenizer --

TEXTS = ["Hello, world! How are you?", "Ünïcödé façade — naïve café 日本語 テキスト 🙂👍🏽 emoji",
         "  leading spaces and\ttabs\nand\n\nnewlines  ", "To be, or not to be: 🙂🙂🙂 that is the question",
         "数学と🧮 – ½ ≠ ⅓"]


def _sentencepiece_like(tokenizer_dir: Path, tmp_path: Path) -> Path:
    """A Llama/Jamba-style tokenizer: '▁' word marks, byte fallback for rare characters, strip on decode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    corpus = ["the quick brown fox jumps over the lazy dog", "To be, or not to be, that is the question",
              "hello world, how are you today?"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    raw = json.loads(tok.to_str())
    vocab = raw["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    d = tmp_path / "sp"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(raw))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d


@pytest.fixture(scope="module")
def tokenizers_under_test(tokenizer_dir, tmp_path_factory):
    return {"byte-level": load_tokenizer(tokenizer_dir),
            "sentencepiece": load_tokenizer(_sentencepiece_like(tokenizer_dir, tmp_path_factory.mktemp("sp")))}


def _stream(tok, ids):
    detok = StreamingDetokenizer(tok)
    segments = [detok.add(i) for i in ids]
    return segments, detok.flush()


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_segments_of_real_text_join_to_decode_and_never_split_a_character(tokenizers_under_test, kind):
    tok = tokenizers_under_test[kind]
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        segments, tail = _stream(tok, ids)
        assert "".join(segments) + tail == tok.decode(ids)
        assert not any("\ufffd" in s for s in segments + [tail])
        if kind == "sentencepiece" and "🙂" in text:
            assert len(ids) > len(text.split())  # the emoji really went through byte fallback


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_segments_of_random_ids_join_to_decode(tokenizers_under_test, kind):
    tok = tokenizers_under_test[kind]
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        segments, tail = _stream(tok, ids)
        assert "".join(segments) + tail == tok.decode(ids)
