"""The `jamba` CLI in-process through Typer's CliRunner, on a real tiny checkpoint: what reaches stdout,
stderr and the exit status for each flag, and the chat REPL driven over stdin."""

import json
import re

import pytest
from typer.testing import CliRunner

from jamba_cli.cli import app
from jamba_cli.defaults import bundled_model_dir
from jamba_cli.generation import generate

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def jamba(ckpt, monkeypatch, tmp_path):
    """Run `jamba ARGS` in-process with the tiny checkpoint as JAMBA_MODEL; returns the Result."""
    monkeypatch.setenv("JAMBA_MODEL", ckpt)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for name in ("NO_COLOR", "FORCE_COLOR", "JAMBA_DEBUG", "JAMBA_NOHISTORY"):
        monkeypatch.delenv(name, raising=False)

    def invoke(*args, input=None, env=None):
        return CliRunner().invoke(app, [str(a) for a in args], input=input, env=env)

    return invoke


def user(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def expect(small, prompt, n=6, **kw):
    """What run and chat print: control tokens (random weights sample them) are left out, as without --special."""
    model, tok = small
    return generate(model, tok, prompt, max_tokens=n, ignore_eos=True, **{"special": False, **kw})


def test_run_prints_only_the_reply_and_one_newline(jamba, small):
    r = jamba("run", "-n", 6, "--ignore-eos", "Hello", "there")
    assert r.exit_code == 0, r.output
    assert r.stdout == expect(small, user("Hello there")) + "\n"
    assert r.stderr == ""


def test_raw_skips_the_chat_template(jamba, small):
    r = jamba("run", "--raw", "-n", 6, "--ignore-eos", "To be")
    assert r.stdout == expect(small, "To be") + "\n"
    assert r.stdout != expect(small, user("To be")) + "\n"


def test_prompt_sources_compose_stdin_files_then_arguments(jamba, small, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("file A\n")
    b.write_text("file B")
    r = jamba("run", "-n", 5, "--ignore-eos", "-f", a, "-f", b, "question", input="piped\n")
    assert r.stdout == expect(small, user("piped\n\nfile A\n\n\nfile B\n\nquestion"), 5) + "\n"
    r = jamba("run", "-n", 5, "--ignore-eos", "-f", a, "-f", "-", "q", input="piped")
    assert r.stdout == expect(small, user("file A\n\n\npiped\n\nq"), 5) + "\n"


def test_system_prompt_from_flag_or_file(jamba, small, tmp_path):
    want = expect(small, user("hi", system="Be brief.")) + "\n"
    assert jamba("run", "-n", 6, "--ignore-eos", "-s", "Be brief.", "hi").stdout == want
    (tmp_path / "sys.txt").write_text("Be brief.")
    assert jamba("run", "-n", 6, "--ignore-eos", "--system-file", tmp_path / "sys.txt", "hi").stdout == want
    r = jamba("run", "-s", "x", "--system-file", tmp_path / "sys.txt", "hi")
    assert r.exit_code == 2 and "exclude each other" in r.stderr
    r = jamba("run", "--raw", "-s", "x", "hi")
    assert r.exit_code == 2 and "drop --raw" in r.stderr


def test_json_and_jsonl_carry_the_same_text_and_a_summary(jamba, small):
    args = ("run", "-n", 7, "--ignore-eos", "--temperature", "1.0", "--seed", 11, "hi")
    text = jamba(*args).stdout[:-1]
    record = json.loads(jamba(*args, "--format", "json").stdout)
    assert record["text"] == text and record["seed"] == 11 and record["finish_reason"] == "length"
    assert record["usage"]["completion_tokens"] == 7 and record["usage"]["prompt_tokens"] > 0
    assert set(record["timings"]) == {"load_s", "ttft_s", "prompt_tps", "generation_tps", "peak_memory_bytes"}
    lines = [json.loads(line) for line in jamba(*args, "--format", "jsonl").stdout.splitlines()]
    assert [e["type"] for e in lines] == ["chunk"] * 7 + ["done"]
    assert "".join(e["text"] for e in lines[:-1]) == text
    assert lines[-1]["usage"] == record["usage"] and "text" not in lines[-1]
    assert jamba(*args[:-2], "--seed", 12, "hi").stdout[:-1] != text


def test_random_seed_is_reported_and_reproduces(jamba):
    first = json.loads(jamba("run", "-n", 6, "--temperature", 1, "--ignore-eos", "hi", "--format", "json").stdout)
    again = jamba("run", "-n", 6, "--temperature", 1, "--ignore-eos", "hi", "--seed", first["seed"])
    assert again.stdout[:-1] == first["text"]


def test_sampling_flags_reach_the_sampler(jamba, small):
    # top-k 1 is greedy whatever the temperature; min-p near 1 too
    greedy = expect(small, user("hi")) + "\n"
    assert jamba("run", "-n", 6, "--ignore-eos", "--temp", 2, "--top-k", 1, "--seed", 1, "hi").stdout == greedy
    assert jamba("run", "-n", 6, "--ignore-eos", "--temp", 2, "--min-p", 0.999, "--seed", 1, "hi").stdout == greedy
    assert jamba("run", "-n", 6, "--ignore-eos", "--temp", 2, "--top-p", 1e-6, "--seed", 1, "hi").stdout == greedy
    penalised = expect(small, user("hi"), repetition_penalty=3.0) + "\n"
    assert jamba("run", "-n", 6, "--ignore-eos", "--repetition-penalty", 3, "hi").stdout == penalised


def test_stop_strings_and_eos(jamba, small):
    full = expect(small, user("hi"), 12)
    stop = full[4:6]
    r = jamba("run", "-n", 12, "--ignore-eos", "--stop", "zzz", "--stop", stop, "--format", "json", "hi")
    record = json.loads(r.stdout)
    assert record["text"] == full[:full.find(stop)] and record["finish_reason"] == "stop_string"


@pytest.mark.parametrize("args, message", [
    # sampling ranges are SamplingParams' checks, stated with the flag's name
    (["--top-p", "1.5"], "Invalid value for '--top-p': 1.5 is out of range (0 < top-p <= 1)"),
    (["--top-p", "0"], "Invalid value for '--top-p': 0.0 is out of range (0 < top-p <= 1)"),
    (["--min-p", "1"], "Invalid value for '--min-p': 1.0 is out of range (0 <= min-p < 1)"),
    (["--temp", "-1"], "Invalid value for '--temperature' / '--temp': -1.0 is out of range (temperature = 0 or "
                            "0.01 <= temperature < inf)"),
    (["--repetition-penalty", "0"], "'--repetition-penalty': 0.0 is out of range (0.01 <= repetition-penalty <= 100)"),
    (["-n", "-2"], "Invalid value for '--max-tokens' / '-n': -2 is out of range (max-tokens >= 0)"),
    (["--top-k", "-1"], "Invalid value for '--top-k': -1 is out of range (0 <= top-k < 2^31)"),
    (["--format", "xml"], "xml"), (["--bogus"], "No such option"),
    (["--load-in-8bit", "--load-in-4bit"], "error: --load-in-8bit and --load-in-4bit exclude each other"),
])
def test_usage_errors_exit_2(jamba, args, message):
    r = jamba("run", *args, "hi")
    assert r.exit_code == 2 and message in r.output


def test_library_messages_name_the_flags_here_and_the_parameters_in_the_api(jamba, ckpt):
    from jamba_cli.errors import UsageError
    from jamba_cli.loader import load

    for args, kwargs, flag, param in (
            (["--max-memory", "cpu"], dict(max_memory="cpu"), "--max-memory entry 'cpu'", "`max_memory` entry 'cpu'"),
            (["--device", "cuda:9"], dict(device="cuda:9"), "--device: there is no cuda:9", "`device`: there is no"),
            (["--device-map", "auto", "--max-memory", "cpu=1KB"], dict(device_map="auto", max_memory="cpu=1KB"),
             "do not fit in --max-memory (cpu 1000 B); raise it, quantize, or pass --offload-folder",
             "do not fit in `max_memory` (cpu 1000 B); raise it, quantize, or pass `offload_folder`"),
            (["--load-in-8bit", "--load-in-4bit"], dict(load_in_8bit=True, load_in_4bit=True),
             "--load-in-8bit and --load-in-4bit exclude each other",
             "`load_in_8bit` and `load_in_4bit` exclude each other")):
        r = jamba("run", *args, "hi")
        assert r.exit_code == 2 and flag in r.stderr and "`" not in r.stderr, r.stderr
        with pytest.raises(UsageError) as err:
            load(ckpt, **kwargs)
        assert param in str(err.value) and "--" not in str(err.value) and err.value.exit_code == 2


def test_empty_prompt_and_missing_model(jamba, monkeypatch):
    r = jamba("run", input="")
    assert r.exit_code == 2 and "the prompt is empty" in r.stderr
    monkeypatch.delenv("JAMBA_MODEL")
    r = jamba("run", "-n", 2, "hi")
    if bundled_model_dir() is None:
        assert r.exit_code == 2 and "pass -m PATH_OR_REPO_ID or set JAMBA_MODEL" in r.stderr
    else:
        assert r.exit_code == 0 and r.stdout


def test_runtime_errors_are_one_line_exit_1(jamba, tmp_path, checkpoints, monkeypatch):
    r = jamba("run", "-m", tmp_path / "nowhere", "hi")
    assert r.exit_code == 1 and r.stderr.startswith("error: no such checkpoint directory: ")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.output
    r = jamba("run", "-m", "nobody/nothing-here", "hi", env={"HF_HUB_CACHE": str(tmp_path / "hub"),
                                                            "HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 1 and "jamba download nobody/nothing-here" in r.stderr and r.stderr.count("\n") == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoints["top1"][0].iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:2000] if f.suffix == ".safetensors" else f.read_bytes())
    r = jamba("run", "-m", broken, "hi")
    assert r.exit_code == 1 and "truncated" in r.stderr and r.stderr.count("\n") == 1
    (broken / "model.safetensors").write_bytes((checkpoints["top1"][0] / "model.safetensors").read_bytes())
    (broken / "tokenizer.json").write_text("{}")
    r = jamba("run", "-m", broken, "hi")
    assert r.exit_code == 1 and "tokenizer.json" in r.stderr and r.stderr.count("\n") == 1


def test_unexpected_errors_show_a_traceback_only_with_jamba_debug(jamba, monkeypatch):
    def broken_loader(*args, **kwargs):
        raise RuntimeError("something no check foresaw\nsecond line")

    monkeypatch.setattr("jamba_cli.loader.load", broken_loader)
    r = jamba("run", "hi")
    assert r.exit_code == 1 and r.stderr.startswith("error: RuntimeError: something no check foresaw (")
    assert "JAMBA_DEBUG=1 shows the traceback" in r.stderr and r.stderr.count("\n") == 1
    r = jamba("run", "hi", env={"JAMBA_DEBUG": "1"})
    assert isinstance(r.exception, RuntimeError)


def test_placement_and_quantization_options_reach_the_loader(jamba, tmp_path):
    r = jamba("run", "-n", 2, "--ignore-eos", "--device-map", "auto", "--max-memory", "cpu=300KB",
              "--offload-folder", tmp_path, "--load-in-8bit", "--int8-skip", "lm_head", "--int8-threshold", 4,
              "--stats", "hi")
    assert r.exit_code == 0, r.output
    assert re.match(r"weights cpu [\d.]+ [KM]B, disk [\d.]+ [KM]B \(float32 [\d.]+ [KM]B\)\n", r.stderr)
    for args, message in ((["--device-map", "cuda:7"], "error: --device-map: there is no cuda:7"),
                          (["--max-memory", "cpu=1KB"], "error: not enough memory: the weights need"),
                          (["--int8-threshold", -1, "--load-in-8bit"], "Invalid value for '--int8-threshold'")):
        r = jamba("run", *args, "hi")
        assert r.exit_code == 2 and message in r.stderr, r.stderr


def test_dtype_and_device_reach_the_loader(jamba):
    r = jamba("run", "-n", 3, "--ignore-eos", "--dtype", "bf16", "--device", "cpu", "--format", "json", "hi")
    assert r.exit_code == 0 and json.loads(r.stdout)["usage"]["completion_tokens"] == 3
    assert jamba("run", "--device", "nonsense", "hi").exit_code == 2


def test_stats_and_colour(jamba):
    r = jamba("run", "-n", 3, "--ignore-eos", "--stats", "hi")
    assert re.search(r"load [\d.]+ s · prompt \d+ tok [\d.]+ tok/s · first token [\d.]+ s · generated 3 tok "
                     r"[\d.]+ tok/s · peak RSS [\d.]+ [KMG]?B · finish length\n$", r.stderr)
    assert not ANSI.search(r.stderr)
    assert ANSI.search(jamba("run", "-n", 1, "--stats", "--color", "always", "hi").stderr)
    assert ANSI.search(jamba("run", "-n", 1, "--stats", "--color", "always", "hi", env={"NO_COLOR": "1"}).stderr)
    assert not ANSI.search(jamba("run", "-n", 1, "--stats", "hi", env={"NO_COLOR": "1", "FORCE_COLOR": "1"}).stderr)
    assert ANSI.search(jamba("run", "-n", 1, "--stats", "hi", env={"FORCE_COLOR": "1"}).stderr)
    assert not ANSI.search(jamba("run", "-n", 1, "--color", "never", "--stats", "hi").stderr)


def test_prompt_cache_file(jamba, tmp_path, checkpoints):
    path = tmp_path / "prompt.cache"
    args = ("run", "-n", 5, "--ignore-eos", "--format", "json", "--prompt-cache", path)
    cold = json.loads(jamba(*args, "A long shared document. " * 4 + "First question").stdout)
    assert cold["usage"]["cached_tokens"] == 0 and path.exists()
    warm = json.loads(jamba(*args, "A long shared document. " * 4 + "First question").stdout)
    assert warm["text"] == cold["text"] and warm["usage"]["cached_tokens"] == warm["usage"]["prompt_tokens"] - 1
    other = jamba(*args, "-m", checkpoints["mini"][0], "hi")
    assert other.exit_code == 1 and "made by another model" in other.stderr
    other = jamba(*args, "--dtype", "bf16", "hi")
    assert other.exit_code == 1 and "dtype float32" in other.stderr


def test_context_overflow_in_run(jamba):
    r = jamba("run", "--ctx-size", 5, "a longer prompt than five tokens")
    assert r.exit_code == 1 and "but the context holds 5" in r.stderr


# -- chat over stdin (not a TTY): one message per line, replies alone on stdout --

def test_chat_replies_continue_the_conversation_exactly(jamba, small):
    r = jamba("chat", "-n", 5, "--ignore-eos", input="Hello\nHow are you?\n/bye\nnot sent\n")
    assert r.exit_code == 0, r.output
    first = expect(small, user("Hello"), 5)
    history = user("Hello") + [{"role": "assistant", "content": first.strip()},
                               {"role": "user", "content": "How are you?"}]
    # the second reply comes from the cached state; it must equal a fresh run on the whole conversation
    assert r.stdout == first + "\n" + expect(small, history, 5) + "\n"
    assert r.stderr == ""


def test_chat_commands(jamba, small, tmp_path):
    (tmp_path / "doc.txt").write_text("some notes")
    script = ["/help", "/set max_tokens 4", "/set temperature 0", "/set top_p 7", "/set colour red",
              "/system Be terse.", "hi", "/show", "/clear", "/show", f"/read {tmp_path / 'doc.txt'}", "sum up",
              "//slash", '"""', "two", "lines", '"""', "/set stats on", '"""one line"""', "/nope", "/exit",
              "never sent"]
    r = jamba("chat", "--ignore-eos", input="\n".join(script) + "\n")
    assert r.exit_code == 0
    conversation, want = [], []
    for message in ["hi", None, "some notes\n\nsum up", "/slash", "two\nlines", "one line"]:
        if message is None:  # /clear
            conversation = []
            continue
        conversation.append({"role": "user", "content": message})
        want.append(expect(small, user("", "Be terse.")[:1] + conversation, 4))
        conversation.append({"role": "assistant", "content": want[-1].strip()})
    assert r.stdout == "".join(w + "\n" for w in want)
    assert "top_p: 7.0 is out of range (0 < top_p <= 1)" in r.stderr and "unknown setting 'colour'" in r.stderr
    assert "unknown command /nope" in r.stderr and "system: Be terse." in r.stderr
    assert "Commands:" in r.stderr and "/regen" in r.stderr
    assert r.stderr.count("generated 4 tok") == 1  # stats only after /set stats on: the last reply
    assert re.search(r"context: \d+ of 262144 tokens used, 2 messages", r.stderr)
    assert "context: 0 of 262144 tokens used, 0 messages" in r.stderr


def test_chat_regen_restores_the_snapshot(jamba, small):
    r = jamba("chat", "-n", 5, "--ignore-eos", input="Hello\n/regen\n/set temperature 1.5\n/regen\n/quit\nHi\n")
    greedy = expect(small, user("Hello"), 5) + "\n"
    assert r.stdout.startswith(greedy * 2)  # greedy regenerates the same reply
    assert r.stdout[2 * len(greedy):] not in ("", greedy)
    r = jamba("chat", input="/regen\n")
    assert r.exit_code == 0 and "no reply to regenerate" in r.stderr and r.stdout == ""


def test_chat_save_load_and_resume(jamba, small, tmp_path, checkpoints):
    path = tmp_path / "talk.json"
    r = jamba("chat", "-n", 4, "--ignore-eos", "-s", "Sys.", input=f"One\n/save {path}\nTwo\n")
    one = expect(small, user("One", "Sys."), 4)
    two = expect(small, user("One", "Sys.") + [{"role": "assistant", "content": one.strip()},
                                               {"role": "user", "content": "Two"}], 4)
    assert r.stdout == one + "\n" + two + "\n"
    assert path.exists() and path.with_name("talk.json.state").exists()
    saved = json.loads(path.read_text())
    assert saved["system"] == "Sys." and [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    resumed = jamba("chat", "--resume", path, input="Two\n")
    assert resumed.stdout == two + "\n" and resumed.stderr == ""
    loaded = jamba("chat", "-n", 4, "--ignore-eos", input=f"/load {path}\nTwo\n")
    assert loaded.stdout == two + "\n"
    # /load in a session whose cache has grown: the state goes into the same cache, in place
    again = jamba("chat", "-n", 4, "--ignore-eos", "-s", "Sys.", input=f"One\n/save {path}\nTwo\n/load {path}\nTwo\n")
    assert again.stdout == one + "\n" + two + "\n" + two + "\n" and "recomputed" not in again.stderr
    other = jamba("chat", "-m", checkpoints["reasoning"][0], "--resume", path, input="Two\n")
    assert other.exit_code == 0 and "made by another model" in other.stderr and "recomputed" in other.stderr
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert "not a conversation saved by jamba chat" in jamba("chat", "--resume", tmp_path / "junk.json").stderr


def test_chat_context_overflow_is_a_message_not_a_crash(jamba, small):
    r = jamba("chat", "--ctx-size", 30, "-n", 3, "--ignore-eos",
              input="hi\n" + "a much longer message " * 5 + "\nok\n")
    assert r.exit_code == 0
    assert "context full" in r.stderr and "/clear" in r.stderr
    hi = expect(small, user("hi"), 3)
    ok = expect(small, user("hi") + [{"role": "assistant", "content": hi.strip()},
                                     {"role": "user", "content": "ok"}], 3)
    assert r.stdout.startswith(hi + "\n")  # the message that did not fit left no trace in the conversation
    second = r.stdout[len(hi) + 1:-1]
    assert second and ok.startswith(second)  # a reply may be cut short where the context ends


def test_chat_needs_a_chat_format(jamba, tmp_path, ckpt):
    d = tmp_path / "plain"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (d / name).hardlink_to(f"{ckpt}/{name}")  # a symlink out of the folder is refused: links are untrusted
    (d / "tokenizer.json").write_text(open(f"{ckpt}/tokenizer.json").read().replace("<|bom|>", "<|xyz|>"))
    r = jamba("chat", "-m", d, input="hi\n")
    assert r.exit_code == 1 and "jamba run --raw" in r.stderr


def test_prompt_cache_that_cannot_be_written_is_a_one_line_error(jamba, tmp_path):
    (tmp_path / "file").write_text("")
    r = jamba("run", "-n", 2, "--prompt-cache", tmp_path / "file" / "p.cache", "hi")
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: cannot write prompt cache {tmp_path / 'file' / 'p.cache'}: ")


def test_interrupt_guard_stops_first_then_raises():
    import os
    import signal

    from jamba_cli.terminal import Interrupt

    previous = signal.getsignal(signal.SIGINT)
    with Interrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_kernels_choice_reaches_the_model(jamba, monkeypatch):
    from jamba_cli import loader

    loaded = []
    real_load = loader.load

    def spy(*args, **kwargs):  # the real loader; we only keep what it returned
        model, tokenizer = real_load(*args, **kwargs)
        loaded.append(model)
        return model, tokenizer

    monkeypatch.setattr(loader, "load", spy)
    assert jamba("run", "--raw", "-n", "2", "--kernels", "torch", "Hi").exit_code == 0
    assert jamba("run", "--raw", "-n", "2", "Hi").exit_code == 0
    assert [m.kernel_options.backend for m in loaded] == ["torch", "auto"]
    bad = jamba("run", "--kernels", "cuda", "Hi")
    assert bad.exit_code == 2 and "--kernels" in bad.output
