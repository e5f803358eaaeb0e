"""The real `jamba` process: pipes, exit statuses, Ctrl+C, a reader that goes away, terminals (pty), and
start-up cost of --help and completion."""

import os
import pty
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, Terminal, jamba, probe
from jamba_cli.generation import generate, generate_step


def expect(small, text, n, system=None):
    model, tok = small
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return generate(model, tok, messages, max_tokens=n, ignore_eos=True)


def test_piped_stdin_and_arguments(ckpt, env, small):
    r = subprocess.run(jamba("run", "-m", ckpt, "-n", 6, "--ignore-eos", "question"), input=b"document\n",
                       capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == expect(small, "document\n\nquestion", 6) + "\n"
    assert r.stderr == b""  # no progress bar, no colour, nothing else when stderr is not a terminal


def test_chat_over_stdin(ckpt, env, small):
    r = subprocess.run(jamba("chat", "-m", ckpt, "-n", 4, "--ignore-eos"), input=b"hi\n/bye\nnot sent\n",
                       capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert (r.returncode, r.stderr) == (0, b"")
    assert r.stdout.decode() == expect(small, "hi", 4) + "\n"


def _start_long_run(ckpt, env, **kwargs):
    p = subprocess.Popen(jamba("run", "-m", ckpt, "-n", 10**6, "--ignore-eos", "--raw", "Once upon a time"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, **kwargs)
    first = p.stdout.read1(64)
    assert first, p.stderr.read()
    return p, first


def test_ctrl_c_flushes_partial_output_and_exits_130(ckpt, env, small):
    p, first = _start_long_run(ckpt, env)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert b"Traceback" not in err
    out = (first + rest).decode()
    assert out.endswith("\n") and len(out) > len(first) + 1  # what came after the first read, then a newline
    # the reply so far, whole: the greedy continuation cut after some token, then a newline
    model, tok = small
    tokens = []
    for token in generate_step(model, torch.tensor(tok.encode("Once upon a time")), max_tokens=10**6):
        tokens.append(int(token))
        text = tok.decode([t for t in tokens if t not in tok.control_ids])  # as shown without --special
        if out in (text, text + "\n") or len(text) > len(out) + 8:
            break
    assert out in (text, text + "\n"), (len(tokens), out[-60:], text[-60:])


def test_closed_pipe_stops_generation_at_once(ckpt, env):
    p, _ = _start_long_run(ckpt, env)
    p.stdout.close()  # like `jamba run ... | head -c 20`
    start = time.monotonic()
    err = p.stderr.read()
    p.wait(timeout=60)
    assert p.returncode == 141 and err == b""
    assert time.monotonic() - start < 30  # a million tokens would take hours


def test_no_prompt_on_a_terminal_is_a_usage_hint_not_a_hang(env):
    master, slave = pty.openpty()
    try:
        r = subprocess.run(jamba("run", "-m", "whatever"), stdin=slave, capture_output=True, env=env, cwd=ROOT,
                           timeout=60)
    finally:
        os.close(master)
        os.close(slave)
    assert r.returncode == 2
    assert b"no prompt: try" in r.stderr and r.stderr.count(b"\n") == 1


def test_usage_errors_are_one_line(env):
    r = subprocess.run(jamba("run", "--bogus", "hi"), capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr == b"error: No such option: --bogus (see 'jamba run --help')\n"
    r = subprocess.run(jamba("run", "--top-p", "1.5", "hi"), capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr == b"error: Invalid value for '--top-p': 1.5 is out of range (0 < top-p <= 1) " \
                       b"(see 'jamba run --help')\n"


def test_help_and_completion_import_no_torch(env, ckpt):
    for args in (["--help"], ["run", "--help"], ["chat", "--help"], ["serve", "--help"], ["download", "--help"],
                 ["--version"]):
        r = probe(env, *args)
        assert r.returncode == 0 and r.stderr.endswith("HEAVY="), (args, r.stderr)
    r = probe(env, "run", "--top-p", "1.5", "hi")  # a bad sampling value is refused before torch loads
    assert "out of range" in r.stderr and r.stderr.endswith("HEAVY="), r.stderr
    r = probe(env, extra_env={"_JAMBA_COMPLETE": "complete_bash", "COMP_WORDS": "jamba run --mo", "COMP_CWORD": "2"})
    assert "--model" in r.stdout and r.stderr.endswith("HEAVY=")
    parent, name = os.path.split(ckpt)
    r = probe(env, extra_env={"_JAMBA_COMPLETE": "complete_bash", "COMP_WORDS": f"jamba run -m {parent}/{name[:2]}",
                              "COMP_CWORD": "3"})
    assert f"{parent}/{name}" in r.stdout.split() and r.stderr.endswith("HEAVY=")


# -- the REPL on a real terminal --

@pytest.mark.slow
def test_interactive_chat(ckpt, env):
    history = Path(env["XDG_STATE_HOME"]) / "jamba" / "history"
    term = Terminal(jamba("chat", "-m", ckpt, "-n", 10**6, "--ignore-eos"), env)
    banner = term.expect(b">>> ")
    assert b"Loading" in banner and b"is ready" in banner  # the load progress bar shows on a terminal
    term.type(b"\x03")
    term.expect(b"(to leave: /bye or Ctrl+D)")
    term.type(b"hello there\r")
    term.expect(b"hello there")
    term.type(b"\x03", pause=1.5)  # stop the endless reply
    term.expect(b"[reply interrupted]")
    term.type(b"/show\r")
    term.expect(b"2 messages")  # the partial reply was kept
    term.type(b"\x04")
    assert term.close() == 0
    assert history.read_text().splitlines() == ["hello there", "/show"]
    assert history.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_no_history_when_asked(ckpt, env):
    term = Terminal(jamba("chat", "-m", ckpt, "-n", 1), {**env, "JAMBA_NOHISTORY": "1"})
    term.expect(b">>> ")
    term.type(b"/show\r")
    term.expect(b"0 messages")
    term.type(b"/bye\r")
    assert term.close() == 0
    assert not (Path(env["XDG_STATE_HOME"]) / "jamba" / "history").exists()
