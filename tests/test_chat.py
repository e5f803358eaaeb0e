"""The chat session as a library: replies that continue the conversation, /regen's snapshot, save and load;
nothing here prints (the REPL does)."""

import json

import pytest

from jamba_cli.chat import ChatSession
from jamba_cli.errors import ChatTemplateError, JambaError
from jamba_cli.generation import generate
from jamba_cli.loader import load
from jamba_cli.sample import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def said(chunks) -> str:
    return "".join(c.text for c in chunks)


def test_a_session_answers_like_generate_on_the_whole_conversation(small):
    model, tok = small
    s = ChatSession(model, tok, name="top1", system="Sys.", sampling=GREEDY)
    one = said(s.ask("One", lambda: False))
    two = said(s.ask("Two", lambda: False))
    history = [{"role": "system", "content": "Sys."}, {"role": "user", "content": "One"},
               {"role": "assistant", "content": one.strip()}, {"role": "user", "content": "Two"}]
    assert two == generate(model, tok, history, GREEDY)
    assert said(s.regenerate(lambda: False)) == two  # greedy: the same reply again, from the snapshot
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert s.context_used == len(s.seen) > len(tok.encode_chat(history))  # the cache holds what `seen` lists


def test_load_of_a_bad_file_raises_and_prints_nothing(small, tmp_path, capsys):
    model, tok = small
    s = ChatSession(model, tok, sampling=GREEDY)
    said(s.ask("One", lambda: False))
    head = {"format": "jamba-chat/1"}
    for text, message in [
            ("[1, 2]", "bad.json is not a conversation saved by jamba chat"),
            ("not json", "bad.json is not a conversation saved by jamba chat (not JSON)"),
            (json.dumps({**head, "messages": [{"role": "user"}]}),
             "bad.json: messages[0].content must be text, not null"),
            (json.dumps({**head, "messages": [], "settings": {"top_p": 7}}),
             "bad.json: settings.top_p: 7 is out of range (0 < top_p <= 1)")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(JambaError) as err:
            s.load(tmp_path / "bad.json")
        assert str(err.value) == f"{tmp_path}/{message}"
    with pytest.raises(JambaError, match="cannot read .*missing.json: No such file or directory"):
        s.load(tmp_path / "missing.json")
    assert len(s.messages) == 2  # the session is as it was
    assert capsys.readouterr() == ("", "")


def test_save_and_load_round_trip_with_settings_and_notes(small, checkpoints, tmp_path, capsys):
    model, tok = small
    path = tmp_path / "talk.json"
    s = ChatSession(model, tok, sampling=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                        stop=["zz"]))
    said(s.ask("One", lambda: False))
    s.save(path)
    saved = json.loads(path.read_text())
    assert saved["settings"]["stop"] == ["zz"] and saved["settings"]["max_tokens"] == 4
    fresh = ChatSession(model, tok, sampling=SamplingParams(max_tokens=9))
    assert fresh.load(path) == []  # the saved state fits: no note
    assert fresh.messages == s.messages and fresh.seen == s.seen
    assert fresh.sampling == SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, stop=("zz",))
    other_model, other_tok = load(checkpoints["reasoning"][0], dtype="fp32", device="cpu")
    other = ChatSession(other_model, other_tok)
    notes = other.load(path)
    assert len(notes) == 1 and "made by another model" in notes[0] and notes[0].endswith("will be recomputed")
    assert other.messages == s.messages
    assert capsys.readouterr() == ("", "")


def test_a_model_without_a_chat_format_cannot_chat(small):
    import copy

    model, tok = small
    plain = copy.copy(tok)
    plain.chat_template = None
    plain.token_to_id = lambda token: None if token == "<|bom|>" else tok.token_to_id(token)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatSession(model, plain)
