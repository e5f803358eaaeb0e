"""The real `jamba` process against hostile or clumsy surroundings: prompts far larger than the context, closed
or failing standard streams, Ctrl+C at any moment from start-up to a long prompt, arguments that are not
UTF-8, `~user` paths, and output that cannot be written. Each case: the exit status, one line on stderr (or
none), no traceback, bounded memory where the case is about memory, and nothing written where it should not."""

import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import ROOT, jamba
from jamba_cli.chat import ChatSession
from jamba_cli.defaults import bundled_model_dir
from jamba_cli.errors import ContextOverflowError
from jamba_cli.generation import generate
from jamba_cli.tokenizer import PIECE_CHARS

SHAKESPEARE = ROOT / "tests" / "data" / "shakespeare_val.txt"
GiB = 2**30


# Runs a command and writes its peak RSS to a file. The command is forked from this small interpreter rather
# than from pytest: a process's ru_maxrss counts, across exec, the memory of the process it was forked from.
PEAK = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def measured(args, env, *, input=b"", cwd=ROOT, timeout=300, stdin=None):
    """Run `args` with `input` on stdin (or the file `stdin`); returns (status, stdout, stderr, peak RSS in bytes)."""
    with tempfile.NamedTemporaryFile() as peak:
        r = subprocess.run([sys.executable, "-c", PEAK, peak.name, *map(str, args)], input=input, stdin=stdin,
                           capture_output=True, env=env, cwd=cwd, timeout=timeout)
        return r.returncode, r.stdout, r.stderr, int(Path(peak.name).read_text())


def one_line(err: bytes) -> str:
    text = err.decode(errors="replace")
    assert text.count("\n") == 1 and text.endswith("\n") and "Traceback" not in text, text
    return text[:-1]


def shakespeare(n_bytes: int) -> bytes:
    text = SHAKESPEARE.read_bytes()
    return (text * (n_bytes // len(text) + 1))[:n_bytes]


# -- item 4: a prompt far larger than the context is refused with memory to match the context, not the text --

def test_tokenizer_limit_is_exact_and_counts_only_about_the_limit(small):
    """A long text that fits is tokenized exactly as without a limit; one that does not is refused with a count
    it really exceeds, and only about `limit` tokens' worth of it is ever tokenized."""
    _, tok = small
    text = shakespeare(4 * PIECE_CHARS).decode()  # several pieces, cut at spaces and line breaks
    want = tok.encode(text)
    assert tok.encode(text, limit=len(want)) == want
    messages = [{"role": "user", "content": text}]
    assert tok.encode_chat(messages, limit=10**6) == tok.encode_chat(messages)
    with pytest.raises(ContextOverflowError, match=f"^the prompt needs {len(want)} tokens but the context holds {len(want) - 1}$"):
        tok.encode(text, limit=len(want) - 1)
    calls = []
    real = tok._tok.encode
    tok._tok.encode = lambda s, **kw: calls.append(len(s)) or real(s, **kw)  # count what is tokenized
    try:
        with pytest.raises(ContextOverflowError, match=r"^the prompt needs more than (\d+) tokens but the context holds 1000$") as e:
            tok.encode(text * 50, limit=1000)  # 13 MB of text
    finally:
        del tok._tok.encode
    assert sum(calls) <= PIECE_CHARS  # one piece held more than 1000 tokens
    bound = int(str(e.value).split()[5])
    assert 1000 < bound <= len(tok.encode(text[:PIECE_CHARS]))


@pytest.mark.slow
def test_huge_piped_prompt_is_refused_before_it_is_tokenized_whole(ckpt, env, tmp_path):
    """30 MB on stdin: whole, it took 3.9 GB to tokenize (more with this byte-level tokenizer) before the check."""
    status, out, err, rss = measured(jamba("run", "-m", ckpt, "-n", 2), env, input=shakespeare(30_000_000),
                                     cwd=tmp_path)
    line = one_line(err)
    assert status == 1 and out == b""
    assert line.startswith("error: the prompt needs more than ") and line.endswith(" tokens but the context holds "
                                                                                  "262144"), line
    assert int(line.split()[6]) > 262144
    assert rss < 1.2 * GiB, rss
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_huge_chat_message_and_read_file_are_refused_and_the_chat_goes_on(ckpt, env, tmp_path, small):
    """The same in `jamba chat`: a 12 MB message, and a 12 MB file given with /read (under the chat's byte
    bound for a 262144-token context, far over it in tokens), are each one "context full" line; the chat
    drops them and answers the next message as a fresh chat would."""
    big = tmp_path / "big.txt"
    big.write_bytes(shakespeare(12_000_000))
    huge_line = shakespeare(12_000_000).replace(b"\n", b" ")
    script = huge_line + b"\n/read " + bytes(big) + b"\nsummarise\nhi\n/bye\n"
    status, out, err, rss = measured(jamba("chat", "-m", ckpt, "-n", 3, "--ignore-eos"), env, input=script,
                                     cwd=tmp_path)
    assert status == 0, err
    lines = err.decode().splitlines()
    full = [line for line in lines if line.startswith("context full: the prompt needs more than ")]
    assert len(full) == 2 and "Traceback" not in err.decode(), lines
    model, tok = small
    assert out.decode() == generate(model, tok, [{"role": "user", "content": "hi"}], max_tokens=3,
                                    ignore_eos=True) + "\n"
    assert rss < GiB, rss
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


def test_endless_stdin_is_cut_at_the_prompt_limit(env, tmp_path):
    """`jamba run < /dev/zero` stops reading at 64 MiB (before any model loads) instead of filling memory."""
    with open("/dev/zero", "rb") as zero:
        status, out, err, rss = measured(jamba("run", "-m", tmp_path / "never-loaded", "hi"), env, input=None,
                                         stdin=zero, cwd=tmp_path)
    assert (status, out) == (1, b"")
    assert one_line(err) == "error: stdin holds more than 64 MiB, the most a prompt may hold"
    assert rss < 0.3 * GiB, rss  # 64 MiB read, and Python
    assert list(tmp_path.iterdir()) == []


# -- item 11: losing stderr or stdin must not lose the output --

@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """stdout of `jamba run -n 6 ... hi` with ordinary streams."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run(jamba("run", "-m", ckpt, "-n", 6, "--ignore-eos", "hi"), stdin=subprocess.DEVNULL,
                       capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    return r.stdout


def _shell(redirect: str, *args) -> list[str]:
    """`jamba ARGS REDIRECT` run by sh, for redirections Popen has no words for (2>&-, <&-)."""
    return ["sh", "-c", f'exec "$0" -m jamba_cli "$@" {redirect}', sys.executable, *map(str, args)]


@pytest.mark.slow
@pytest.mark.parametrize("redirect", ["2>&-", "2>/dev/full", "<&-", "0>>{tmp}/write-only"])
def test_run_survives_closed_or_failing_stderr_and_stdin(redirect, ckpt, env, tmp_path, reference):
    r = subprocess.run(_shell(redirect.format(tmp=tmp_path), "run", "-m", ckpt, "-n", 6, "--ignore-eos", "hi"),
                       stdout=subprocess.PIPE, stderr=None if redirect.startswith("2") else subprocess.PIPE,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout == reference  # the generated text, whole; no traceback in it
    if redirect.startswith("0>>"):  # stdin open for writing only: the prompt is made without it, with a note
        assert r.stderr == b"note: stdin cannot be read (Bad file descriptor); the prompt is made without it\n"
    elif redirect == "<&-":
        assert r.stderr == b""
    assert [p.name for p in tmp_path.iterdir()] in ([], ["write-only"])


def test_stdin_that_cannot_be_read_is_an_error_when_named(ckpt, env, tmp_path):
    r = subprocess.run(_shell(f"0>>{tmp_path}/write-only", "run", "-m", ckpt, "-f", "-", "hi"),
                       capture_output=True, env=env, cwd=tmp_path, timeout=60)
    assert (r.returncode, r.stdout) == (2, b"")
    assert one_line(r.stderr) == "error: cannot read stdin (-f -): Bad file descriptor"


@pytest.mark.parametrize("redirect, status, line", [
    (">&-", 1, "error: stdout is closed: there is nowhere to write the output"),
    (">/dev/full", 1, "error: cannot write the output: No space left on device"),
])
def test_run_with_closed_or_full_stdout_is_one_line(redirect, status, line, ckpt, env, tmp_path):
    r = subprocess.run(_shell(redirect, "run", "-m", ckpt, "-n", 2, "hi"), stdin=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == status and one_line(r.stderr) == line
    assert list(tmp_path.iterdir()) == []


# -- item 13: Ctrl+C --

def _startup_floor(env) -> float:
    """How long the bare interpreter takes to start here: a SIGINT before that reaches Python's own start-up,
    before any program's code can run (it raises KeyboardInterrupt in site.py)."""
    times = []
    for _ in range(3):
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", "import jamba_cli.terminal"], env=env, cwd=ROOT, check=True)
        times.append(time.monotonic() - start)
    return min(times)


@pytest.mark.slow
def test_ctrl_c_at_any_moment_of_start_up_exits_130_cleanly(ckpt, env):
    """SIGINT while the interpreter imports Typer, torch, the checkpoint loads, or the first tokens stream: each
    time exit 130 at once, nothing on stderr (it used to be ignored, a SIGABRT in torch's import, or an
    ImportError)."""
    floor = _startup_floor(env)
    for delay in (max(0.05, 1.5 * floor), 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5):
        p = subprocess.Popen(jamba("run", "-m", ckpt, "-n", 10**6, "--ignore-eos", "hi"), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        time.sleep(delay)
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert (p.returncode, err) == (130, b""), (delay, p.returncode, err[-800:])
        assert time.monotonic() - sent < 5, delay
        assert out in (b"", b"\n") or out.endswith(b"\n"), out  # stopped while generating: the text so far


@pytest.mark.slow
def test_ctrl_c_during_a_long_prompt_stops_between_chunks(env, tmp_path):
    """SIGINT while the bundled model reads a ~20K-token prompt (half a minute and more on a CPU): exit 130
    within seconds, with the json record saying so. It used to wait for the whole prompt."""
    text = shakespeare(70_000)
    args = jamba("run", "-m", bundled_model_dir(), "-n", 1, "--ctx-size", 32768, "--raw", "--format", "json", "-f", "-")
    start = time.monotonic()
    warm = subprocess.run(args, input=b"Once", capture_output=True, env=env, cwd=tmp_path, timeout=120)
    assert warm.returncode == 0, warm.stderr
    ready = time.monotonic() - start  # start-up and load: after this the long run is inside its prompt
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         cwd=tmp_path)
    p.stdin.write(text)
    p.stdin.close()
    time.sleep(ready + 2)
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    reacted = time.monotonic() - sent
    out, err = p.stdout.read(), p.stderr.read()
    assert (p.returncode, err) == (130, b""), err[-800:]
    record = json.loads(out)
    assert record["finish_reason"] == "interrupted" and record["usage"]["completion_tokens"] == 0
    assert record["usage"]["prompt_tokens"] > 15_000
    assert record["timings"]["ttft_s"] > 1  # it was inside the prompt for a while
    assert reacted < 6, reacted  # a 512-token chunk, not the rest of the prompt
    assert list(tmp_path.iterdir()) == []


def test_chat_stopped_inside_a_prompt_goes_on_as_if_the_reply_were_empty(small):
    """A reply stopped between prompt chunks leaves part of the prompt in the cache: the session restores its
    snapshot, so the next turn answers as a fresh session with the same messages does."""
    model, tok = small
    long_text = SHAKESPEARE.read_text()[:6000]
    session = ChatSession(model, tok, sampling=None)
    polls = []
    chunks = list(session.ask(long_text, lambda: polls.append(1) or len(polls) >= 2))
    assert [(c.token, c.finish_reason) for c in chunks] == [(None, "interrupted")]
    assert session.messages[-1] == {"role": "assistant", "content": ""}
    reply = "".join(c.text for c in session.ask("hi", lambda: False))
    fresh = ChatSession(model, tok)
    fresh.messages = [dict(m) for m in session.messages[:2]]
    assert reply == "".join(c.text for c in fresh.ask("hi", lambda: False))


# -- item 14: the remaining tracebacks --

NO_USER = "nosuchuser" + str(os.getpid())


def test_no_such_user_exists():
    with pytest.raises(KeyError):
        pwd.getpwnam(NO_USER)


@pytest.mark.parametrize("args, flag", [
    (["-f", f"~{NO_USER}/notes.txt"], "--file"),
    (["--system-file", f"~{NO_USER}/s.txt", "hi"], "--system-file"),
    (["--prompt-cache", f"~{NO_USER}/p.cache", "hi"], "--prompt-cache"),
    (["--offload-folder", f"~{NO_USER}/off", "hi"], "--offload-folder"),
    (["--device-map", f"~{NO_USER}/map.json", "hi"], "--device-map"),
])
def test_no_such_user_in_a_path_is_a_usage_error(args, flag, ckpt, env, tmp_path):
    r = subprocess.run(jamba("run", "-m", ckpt, *args), stdin=subprocess.DEVNULL, capture_output=True, env=env,
                       cwd=tmp_path, timeout=60)
    assert (r.returncode, r.stdout) == (2, b"")
    assert one_line(r.stderr) == f"error: {flag}: cannot expand ~{NO_USER}: no such user"
    assert list(tmp_path.iterdir()) == []  # no folder named ~user made here


def test_no_such_user_in_resume_is_a_usage_error(ckpt, env, tmp_path):
    r = subprocess.run(jamba("chat", "-m", ckpt, "--resume", f"~{NO_USER}/talk.json"), stdin=subprocess.DEVNULL,
                       capture_output=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and one_line(r.stderr) == f"error: --resume: cannot expand ~{NO_USER}: no such user"


def test_prompt_cache_that_is_no_file_is_a_usage_error(ckpt, env, tmp_path):
    """A directory, or a FIFO (which would block the read), is refused before the model loads: exit 2, one line
    (prompt_cache.check_target says what it is)."""
    folder = tmp_path / "caches"
    folder.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, says in ((folder, "is a directory"), (fifo, "is a named pipe")):
        r = subprocess.run(jamba("run", "-m", ckpt, "--prompt-cache", path, "hi"), stdin=subprocess.DEVNULL,
                           capture_output=True, env=env, cwd=tmp_path, timeout=60)
        assert (r.returncode, r.stdout) == (2, b"")
        assert one_line(r.stderr).startswith(f"error: --prompt-cache {path} {says}; ")
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["caches", "fifo"]


@pytest.mark.parametrize("args, flag", [
    ([b"\xff"], "the prompt"),
    ([b"-s", b"caf\xe9", b"hi"], "--system"),
    ([b"--stop", b"\xc3", b"hi"], "--stop"),
])
def test_arguments_that_are_not_utf8_are_a_usage_error(args, flag, ckpt, env):
    r = subprocess.run([sys.executable.encode(), b"-m", b"jamba_cli", b"run", b"-m", ckpt.encode(), *args],
                       stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert (r.returncode, r.stdout) == (2, b"")
    assert one_line(r.stderr) == f"error: {flag} is not valid UTF-8: {args[-1] if flag != '--system' and flag != '--stop' else args[1]!r}"


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_still_a_file(ckpt, env, tmp_path, small):
    """Paths may hold any bytes (only text is checked): -f of a Latin-1 file name reads that file."""
    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt")
    with open(name, "wb") as f:
        f.write(b"hi")
    r = subprocess.run([sys.executable.encode(), b"-m", b"jamba_cli", b"run", b"-m", ckpt.encode(), b"-n", b"4",
                        b"--ignore-eos", b"-f", name], stdin=subprocess.DEVNULL, capture_output=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    model, tok = small
    assert r.stdout.decode() == generate(model, tok, [{"role": "user", "content": "hi"}], max_tokens=4,
                                         ignore_eos=True) + "\n"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["run", "--help"]])
def test_output_into_a_full_device_is_one_line(args, env):
    with open("/dev/full", "wb") as full:
        r = subprocess.run(jamba(*args), stdout=full, stderr=subprocess.PIPE, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert one_line(r.stderr) == "error: cannot write the output: No space left on device"


def test_help_into_a_closed_pipe_is_141(env):
    read, write = os.pipe()
    os.close(read)  # like `jamba run --help | true`, when true has gone already
    try:
        r = subprocess.run(jamba("run", "--help"), stdout=write, stderr=subprocess.PIPE, env=env, cwd=ROOT,
                           timeout=60)
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (141, b"")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_install_completion_into_an_unwritable_home_is_one_line(shell, env, tmp_path):
    home = tmp_path / "home"
    home.write_text("a file, not a folder: nobody, root included, can write under it")
    r = subprocess.run(jamba("--install-completion", shell), capture_output=True, env={**env, "HOME": str(home)},
                       cwd=tmp_path, timeout=60)
    assert (r.returncode, r.stdout) == (1, b"")
    line = one_line(r.stderr)
    assert line.startswith(f"error: cannot write {home}") and line.endswith(": Not a directory"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"] and home.is_file()
