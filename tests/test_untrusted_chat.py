"""A chat survives its user, and what comes from files or the keyboard cannot drive the terminal: the real
`jamba` process, piped or on a pty, against saved chats, paths and lines built here to break it."""

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from helpers import ROOT, Terminal, jamba
from jamba_cli.generation import generate
from jamba_cli.sample import RANGES, SamplingParams
from jamba_cli.terminal import plain, printable

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil\x7f"  # retitle, clear screen, C1 CSI, right-to-left, DEL
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eevil\\x7f"


def reply(small, messages, n=3):
    model, tok = small
    return generate(model, tok, messages, max_tokens=n, ignore_eos=True)


def chat(env, *args, lines=(), data=None, cwd=ROOT):
    """A piped `jamba chat ARGS`: `lines` (text) or `data` (bytes) on stdin; returns the CompletedProcess."""
    stdin = data if data is not None else "".join(f"{line}\n" for line in lines).encode()
    return subprocess.run(jamba("chat", *args), input=stdin, capture_output=True, env=env, cwd=cwd, timeout=120)


def errors(r) -> list[str]:
    return [line for line in r.stderr.decode().splitlines() if line.startswith("error:")]


# -- item 5: what is printed is inert --

def test_printable_escapes_what_a_terminal_acts_on():
    assert printable(HOSTILE) == SHOWN
    assert printable("a\tb\nc\rd") == "a\\tb\\nc\\rd"  # one line stays one line
    assert printable("a\tb\nc\rd", multiline=True) == "a\tb\nc\\rd"
    assert printable("caf\u00e9 \u65e5\u672c [/] :smile: \\x") == "caf\u00e9 \u65e5\u672c [/] :smile: \\x"
    assert printable(b"bad \xff".decode("utf-8", "surrogateescape")) == "bad \\xff"
    for code in [*range(0x20), *range(0x7f, 0xa0)]:  # every C0 and C1 control and DEL
        assert printable(chr(code)).isprintable() and len(printable(chr(code))) > 1
    console = Console(file=None, force_terminal=True, color_system="standard", width=200, record=True)
    with console.capture() as out:
        console.print(plain("[bold]notes[draft].txt[/] :smile: a[/]b" + HOSTILE, "red"))
    text = out.get()
    assert "[bold]notes[draft].txt[/] :smile: a[/]b" + SHOWN in text  # no markup, no emoji, nothing raw
    assert "\x07" not in text and "\x1b]" not in text and "\x1b[2J" not in text and "\x9b" not in text


@pytest.mark.slow
def test_an_error_quoting_a_tensor_name_is_inert(env, ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0" + HOSTILE + "[/]:smile:"
    save_file({**tensors, name: next(iter(tensors.values())).clone()}, bad / "model.safetensors")
    r = subprocess.run(jamba("run", "-m", bad, "-n", 2, "hi"), capture_output=True, env=env, cwd=ROOT, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 1 and r.stdout == b"" and err.count("\n") == 1, err
    assert err.startswith("error: ") and "model.layers.0" + SHOWN + "[/]:smile:" in err
    assert not any(c in err for c in "\x1b\x07\x9b\x7f\u202e")


@pytest.mark.slow
def test_names_and_texts_in_a_piped_chat_print_as_they_are(env, ckpt, small, tmp_path):
    (tmp_path / "notes[draft].txt").write_text("draft")
    (tmp_path / "a[").mkdir()
    (tmp_path / "a[" / "]b").write_text("more")
    (tmp_path / ":smile:.txt").write_text("x")
    model = tmp_path / ("m[bold]" + HOSTILE)
    model.symlink_to(ckpt)
    r = chat(env, "-m", model, "-n", 3, "--ignore-eos", cwd=tmp_path, lines=[
        "/read notes[draft].txt", "/read a[/]b", "/read :smile:.txt", "/read " + HOSTILE,
        "/system sys[bold] " + HOSTILE, "/set stop [/]", "/show", "hi"])
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "read notes[draft].txt; it goes with your next message\n" in err
    assert "read a[/]b; it goes with your next message\n" in err
    assert "read :smile:.txt; it goes with your next message\n" in err
    assert f"error: cannot read {SHOWN}: No such file or directory\n" in err
    assert f"model: {model.parent}/m[bold]{SHOWN}\n" in err
    assert f"system: sys[bold] {SHOWN}\n" in err and "stop=['[/]']" in err
    assert not any(c in err for c in "\x1b\x07\x9b\x7f\u202e")
    sent = "draft\n\nmore\n\nx\n\nhi"
    assert r.stdout.decode() == reply(small, [{"role": "system", "content": "sys[bold] " + HOSTILE},
                                              {"role": "user", "content": sent}]) + "\n"


# -- item 9: a session survives its user; the flags and /set share one table of rules --

BAD_FLAGS = [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "1e-45"),
             ("--seed", str(2**64)), ("--seed", "-1"), ("--top-k", str(2**31)), ("--repetition-penalty", "1e-300"),
             ("--repetition-penalty", "inf"), ("--repetition-penalty", "nan"), ("--min-p", "nan"), ("--top-p", "inf")]


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_sampling_flags_out_of_range_are_usage_errors(env, flag, value):
    r = subprocess.run(jamba("run", flag, value, "hi"), capture_output=True, env=env, cwd=ROOT, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"" and err.count("\n") == 1, err
    assert err.startswith(f"error: Invalid value for '{flag}'") and "is out of range (" in err
    assert flag[2:] in err.split("out of range")[1]  # the rule is stated with the flag's name


def test_one_table_of_rules_for_the_dataclass():
    for name in RANGES:
        with pytest.raises(ValueError, match=f"^{name}: .* is out of range"):
            SamplingParams(**{name: -1})
        with pytest.raises(TypeError, match=f"^{name} must be"):
            SamplingParams(**{name: "1"})
        with pytest.raises(TypeError):
            SamplingParams(**{name: True})  # a bool is no number
    SamplingParams(temperature=0, seed=2**64 - 1, top_k=2**31 - 1, repetition_penalty=100, max_tokens=10**9)
    SamplingParams(temperature=0.01, repetition_penalty=0.01)
    with pytest.raises(TypeError):
        SamplingParams(stop=[1])
    with pytest.raises(TypeError):
        SamplingParams(ignore_eos="yes")


def _saved(tmp_path, name, body) -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


@pytest.mark.slow
def test_no_command_ends_a_piped_chat(env, ckpt, small, tmp_path):
    head = {"format": "jamba-chat/1", "messages": []}
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"format": "jamba-chat/1", "system": "caf\xe9", "messages": []}')
    loads = {  # a saved chat -> the one line it gets
        _saved(tmp_path, "list.json", [1, 2]): "is not a conversation saved by jamba chat",
        _saved(tmp_path, "text.json", "not json"): "is not a conversation saved by jamba chat (not JSON)",
        latin1: "(not JSON)",
        _saved(tmp_path, "negative.json", {**head, "settings": {"temperature": -1}}):
            "settings.temperature: -1 is out of range (temperature = 0 or 0.01 <= temperature < inf)",
        _saved(tmp_path, "seed.json", {**head, "settings": {"seed": 1.5}}):
            "settings.seed must be an integer, not float",
        _saved(tmp_path, "topk.json", {**head, "settings": {"top_k": True}}):
            "settings.top_k must be an integer, not bool",
        _saved(tmp_path, "stop.json", {**head, "settings": {"stop": "x"}}):
            "settings.stop must be a list of texts, not text",
        _saved(tmp_path, "stats.json", {**head, "settings": {"stats": "yes"}}):
            "settings.stats must be true or false, not text",
        _saved(tmp_path, "settings.json", {**head, "settings": [1]}): "settings must be an object, not a list",
        _saved(tmp_path, "system.json", {**head, "system": 5}): "system must be text, not a number",
        _saved(tmp_path, "model.json", {**head, "model": ["x"]}): "model must be text, not a list",
        _saved(tmp_path, "messages.json", {**head, "messages": {"a": 1}}): "messages must be a list, not an object",
        _saved(tmp_path, "message.json", {**head, "messages": ["hi"]}):
            "messages[0] must be an object with a role and a content, not text",
        _saved(tmp_path, "role.json", {**head, "messages": [{"role": "admin", "content": "x"}]}):
            'messages[0].role must be user, assistant or tool, not "admin"',
        _saved(tmp_path, "calls.json", {**head, "messages": [{"role": "assistant", "content": "",
                                                               "tool_calls": [{"function": {}}]}]}):
            'messages[0].tool_calls[0] must be an object with a "function" that has a "name"',
        _saved(tmp_path, "thought.json", {**head, "messages": [{"role": "assistant", "content": "",
                                                                 "reasoning_content": 3}]}):
            "messages[0].reasoning_content must be text, not a number",
        _saved(tmp_path, "content.json", {**head, "messages": [{"role": "user", "content": 5}]}):
            "messages[0].content must be text, not a number",
        _saved(tmp_path, "deep.json", "[" * 100000 + "]" * 100000): "(not JSON)",
        tmp_path: "it is a directory, not a regular file",
        fifo: "it is a named pipe, not a regular file",
        tmp_path / "missing.json": "No such file or directory",
    }
    sets = {"seed 1e20": "bad value '1e20' for seed",
            f"seed {2**64}": f"seed: {2**64} is out of range (0 <= seed < 2^64)",
            "seed -1": "seed: -1 is out of range (0 <= seed < 2^64)",
            "temperature 1e-45": "temperature: 1e-45 is out of range (temperature = 0 or 0.01 <= temperature < inf)",
            "temperature nan": "temperature: nan is out of range",
            "temperature inf": "temperature: inf is out of range",
            "repetition_penalty 1e-300":
                "repetition_penalty: 1e-300 is out of range (0.01 <= repetition_penalty <= 100)",
            "repetition_penalty inf": "repetition_penalty: inf is out of range",
            "min_p nan": "min_p: nan is out of range", f"top_k {2**31}": "top_k: 2147483648 is out of range"}
    (tmp_path / "huge.txt").touch()
    os.truncate(tmp_path / "huge.txt", 1 << 40)  # sparse: a terabyte that takes no disk
    others = {"/save ~nosuchuser/x": "cannot expand ~nosuchuser: no such user or home directory",
              f"/read {tmp_path}": "it is a directory, not a regular file",
              f"/read {fifo}": "it is a named pipe, not a regular file",  # reading it would wait for a writer forever
              "/read /dev/zero": "it is a device, not a regular file",  # reading it would never end
              f"/read {tmp_path / 'huge.txt'}": "has 1,099,511,627,776 bytes, more than the context can hold",
              "/read": "usage: /read FILE", "/load": "usage: /load FILE", "/save": "usage: /save FILE"}
    lines = [*(f"/set {s}" for s in sets), *(f"/load {p}" for p in loads), *others]
    data = "".join(f"{line}\n" for line in lines).encode() + b"caf\xe9 \xff\n" + b"hi\n"
    r = chat(env, "-m", ckpt, "-n", 3, "--ignore-eos", data=data)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    got = errors(r)
    assert len(got) == len(lines) + 1 and len(err.splitlines()) == len(got), err  # one line each, nothing else
    want = [*sets.values(), *loads.values(), *others.values(),
            f"that message (line {len(lines) + 1}) is not UTF-8 (byte 0xe9); it was not sent"]
    for line, message in zip(got, want):
        assert message in line, (line, message)
    for line, path in zip(got[len(sets):], loads):
        assert str(path) in line  # each /load error names the file
    # nothing that failed changed the session: the reply is the first turn's, greedy, of a fresh chat
    assert r.stdout.decode() == reply(small, [{"role": "user", "content": "hi"}]) + "\n"


@pytest.mark.slow
def test_a_line_longer_than_the_context_is_dropped_in_bounded_memory(env, ckpt, small):
    def peak(stdin_chunks):
        p = subprocess.Popen(jamba("chat", "-m", ckpt, "-n", 3, "--ignore-eos", "--ctx-size", 64),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        for chunk in stdin_chunks:
            p.stdin.write(chunk)
        p.stdin.close()
        out, err = p.stdout.read(), p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        return p.returncode, out, err.decode(), usage.ru_maxrss * 1024

    code, out, err, small_peak = peak([b"hi\n"])
    assert code == 0 and err == ""
    block = b"word " * (1 << 18)  # 1.25 MB
    code, big_out, err, big_peak = peak([block] * 80 + [b"\n", b'"""\n'] + [block + b"\n"] * 40 + [b'"""\nhi\n'])
    assert code == 0 and big_out == out
    assert err == ("error: that message (line 1) is longer than the context can hold; it was not sent\n"
                   "error: that message (line 2) is longer than the context can hold; it was not sent\n")
    assert big_peak < small_peak + 64 * 2**20, (small_peak, big_peak)  # 100 MB and 50 MB of input, never held


@pytest.mark.slow
def test_a_conversation_the_template_refuses_is_one_line(env, ckpt, small, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if 'boom' in m['content'] %}{{ raise_exception('no boom here') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|eom|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    saved = _saved(tmp_path, "boom.json", {"format": "jamba-chat/1", "messages": [{"role": "user", "content": "boom"}]})
    r = chat(env, "-m", d, "-n", 3, "--ignore-eos", lines=["boom", f"/load {saved}", "/regen", "hi"])
    assert r.returncode == 0, r.stderr
    assert errors(r) == ["error: chat template: no boom here",
                         f"error: {saved}: chat template: no boom here",
                         "error: there is no reply to regenerate"]
    model, tok = small
    want = generate(model, tok, tok.encode("<|user|>hi<|eom|><|assistant|>", add_special_tokens=False),
                    max_tokens=3, ignore_eos=True)
    assert r.stdout.decode() == want + "\n"  # "boom" left no trace in the conversation


# -- item 8: /save writes only regular files, asks or refuses before replacing one --

@pytest.mark.slow
def test_save_refuses_links_fifos_devices_and_directories_and_existing_files(env, ckpt, small, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "link.json").symlink_to(victim)
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "dir.json").mkdir()
    os.mkfifo(tmp_path / "halfway.json.state")  # the conversation could be written, its state not: neither is
    (tmp_path / "stale.json").write_text("old")
    (tmp_path / "stale.json.state").symlink_to(victim)
    device = tmp_path / "null.json"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:  # only root may make a device node; /dev/full showed the bug as root
        device = None
    refused = {"link.json": ("link.json", "a symbolic link"), "dangling.json": ("dangling.json", "a symbolic link"),
               "fifo.json": ("fifo.json", "a named pipe"), "dir.json": ("dir.json", "a directory"),
               "halfway.json": ("halfway.json.state", "a named pipe"), "stale.json": ("stale.json.state", "a symbolic link"),
               **({"null.json": ("null.json", "a device")} if device else {})}
    lines = ["hi", *(f"/save {t}" for t in refused), *(f"/save! {t}" for t in refused),
             "/save talk.json", "/save talk.json", "/save! talk.json"]
    before = {p.name: p.lstat() for p in tmp_path.iterdir()}
    r = chat(env, "-m", ckpt, "-n", 3, "--ignore-eos", lines=lines, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    refusals = [f"error: will not write {name}: it is {kind}, not a regular file" for name, kind in refused.values()]
    assert errors(r) == [*refusals, *refusals,
                         "error: talk.json and talk.json.state exist; /save! talk.json replaces them"], r.stderr
    assert r.stderr.decode().count("saved to talk.json\n") == 2
    assert r.stdout.decode() == reply(small, [{"role": "user", "content": "hi"}]) + "\n"
    # nothing refused was touched, nothing else was left behind
    after = {p.name: p.lstat() for p in tmp_path.iterdir()}
    assert set(after) == set(before) | {"talk.json", "talk.json.state"}
    for name, st in before.items():
        assert (after[name].st_mode, after[name].st_ino, after[name].st_mtime_ns) == \
               (st.st_mode, st.st_ino, st.st_mtime_ns), name
    assert victim.read_text() == "precious"
    saved = tmp_path / "talk.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["messages"][0] == {"role": "user", "content": "hi"}


@pytest.mark.slow
def test_a_save_without_a_model_state_drops_the_stale_one(env, ckpt, tmp_path):
    r = chat(env, "-m", ckpt, "-n", 3, "--ignore-eos", cwd=tmp_path,
             lines=["hi", "/save t.json", "/clear", "/save! t.json"])
    assert r.returncode == 0 and errors(r) == [], r.stderr
    # the second save had no model state: the first one's was removed, not left to pass for this conversation's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    assert json.loads((tmp_path / "t.json").read_text())["messages"] == []


@pytest.mark.slow
def test_save_on_a_terminal_asks_before_replacing(env, ckpt, tmp_path):
    (tmp_path / "t.json").write_text("old")
    term = Terminal(jamba("chat", "-m", ckpt, "-n", 2, "--ignore-eos"), env)
    term.expect(b">>> ")
    term.type(f"/save {tmp_path / 't.json'}\r".encode())
    term.expect(b"exists. Replace it? [y/N] ")
    term.type(b"n\r")
    term.expect(b"not saved")
    assert (tmp_path / "t.json").read_text() == "old"
    term.type(f"/save {tmp_path / 't.json'}\r".encode())
    term.expect(b"exists. Replace it? [y/N] ")
    term.type(b"yes\r")
    term.expect(b"saved to ")
    term.type(b"/bye\r")
    assert term.close() == 0
    assert json.loads((tmp_path / "t.json").read_text())["format"] == "jamba-chat/1"
    history = Path(env["XDG_STATE_HOME"]) / "jamba" / "history"
    assert history.read_text().splitlines() == [f"/save {tmp_path / 't.json'}"] * 2 + ["/bye"]  # no answers


# -- item 10: no history file, no refusal to start --

def _unprivileged():
    """A command prefix under which a read-only directory is read-only: root ignores permission bits, so
    root's child runs without CAP_DAC_OVERRIDE (it still owns, and reads, everything it did)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root, and setpriv (util-linux) is missing to drop CAP_DAC_OVERRIDE")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["read-only HOME", "read-only XDG_STATE_HOME", "no HOME"])
def test_chat_runs_without_history_when_it_cannot_be_written(env, ckpt, tmp_path, case):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    env = {k: v for k, v in env.items() if k not in ("HOME", "XDG_STATE_HOME")}
    if case == "read-only HOME":
        env["HOME"] = str(ro)
    elif case == "read-only XDG_STATE_HOME":
        env.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(ro))
    real = Path(os.path.expanduser("~")) / ".local" / "state" / "jamba" / "history"
    real_before = real.stat().st_mtime_ns if real.exists() else None
    term = Terminal([*_unprivileged(), *jamba("chat", "-m", ckpt, "-n", 1, "--ignore-eos")], env)
    banner = term.expect(b">>> ").decode()
    for line in ("hello", "/show"):
        term.type(line.encode() + b"\r")
        term.expect(b">>> ")
    term.type(b"/bye\r")
    assert term.close() == 0
    seen = banner + term.seen.decode(errors="replace")
    assert banner.count("note: no input history this session: ") == 1 and "is ready" in banner
    assert seen.count("no input history") == 1 and "Traceback" not in seen and "error" not in seen
    if case == "no HOME":
        assert "HOME is not set" in banner
    else:
        where = ro / (".local/state/jamba/history" if case == "read-only HOME" else "jamba/history")
        assert f"cannot write {where}: Permission denied" in banner
    assert list(ro.iterdir()) == [] and not (ROOT / "~").exists() and not (tmp_path / "home").exists()
    assert (real.stat().st_mtime_ns if real.exists() else None) == real_before
    ro.chmod(0o755)
