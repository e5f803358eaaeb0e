"""The chat REPL's command table: /help and tab completion come from it, and every entry works in a chat."""

import pytest
from typer.testing import CliRunner

from jamba_cli.cli import app
from jamba_cli.repl import COMMANDS, TABLE, complete, help_text


def test_help_shows_every_command_of_the_table():
    text = help_text()
    for command in COMMANDS:
        row = next(line for line in text.splitlines() if line.startswith(f"  {command.names[0]}"))
        assert all(name in row for name in command.names) and command.help.splitlines()[0] in row
        for more in command.help.splitlines()[1:]:
            assert " " * 24 + more in text.splitlines()


def test_tab_completion_offers_the_table():
    assert complete("/") == list(TABLE)
    assert complete("/s") == ["/system", "/set", "/show", "/save", "/save!"]
    assert all(name in complete(name[:2]) for name in TABLE)
    assert complete("/x") == [] and complete("hello") == []


@pytest.fixture
def chat(checkpoints, monkeypatch, tmp_path):
    monkeypatch.setenv("JAMBA_MODEL", str(checkpoints["top1"][0]))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    def run(*lines):
        return CliRunner().invoke(app, ["chat", "-n", "2", "--ignore-eos"], input="\n".join(lines) + "\n")

    return run


def test_every_command_is_known_and_help_prints_the_table(chat, tmp_path):
    (tmp_path / "f.txt").write_text("notes")
    args = {"/system": "Be brief.", "/set": "seed 3", "/read": tmp_path / "f.txt", "/save": tmp_path / "t.json",
            "/save!": tmp_path / "t.json", "/load": tmp_path / "t.json", "/tool": 'lookup {"found": true}'}
    names = sorted((n for n in TABLE if TABLE[n].run is not TABLE["/bye"].run), key=lambda n: n == "/clear")
    r = chat("hi", *(f"{name} {args.get(name, '')}".strip() for name in names))
    assert r.exit_code == 0 and "unknown command" not in r.stderr and "error" not in r.stderr, r.stderr
    assert help_text() in r.stderr
    for leave in ("/bye", "/exit", "/quit"):
        r = chat(leave, "never sent")
        assert r.exit_code == 0 and r.stdout == ""


def test_an_unknown_command_is_named_and_the_chat_goes_on(chat):
    r = chat("/nope", "/show")
    assert r.exit_code == 0
    assert "error: unknown command /nope; /help lists them" in r.stderr and "0 messages" in r.stderr


def test_set_takes_aliases_on_off_and_checks_values_like_the_flags(chat):
    r = chat("/set temp 1.5", "/set n 3", "/set ignore_eos off", "/set stop END", "/set seed 4", "/set top_k x",
             "/set min_p 1", "/show")
    assert r.exit_code == 0
    assert "temp = 1.5" in r.stderr and "n = 3" in r.stderr and "ignore_eos = off" in r.stderr
    assert "error: bad value 'x' for top_k" in r.stderr
    assert "error: min_p: 1.0 is out of range (0 <= min_p < 1)" in r.stderr
    assert "parameters: max_tokens=3, temperature=1.5, seed=4, stop=['END']\n" in r.stderr
