"""Prompt cache files as untrusted input and as output that must land safely: forged files are refused before
memory is spent on them, the fingerprint tells apart checkpoints that differ in any value, only regular
files are written (0600, atomically, stale temporaries of dead processes removed), and a second question
about the same document reuses the document's state (issue 19, items 4, 7, 8, 12, 15)."""

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CORPUS
from helpers import ROOT, jamba, probe
from jamba_cli import fingerprint, prompt_cache as pc
from jamba_cli.cache import make_cache
from jamba_cli.errors import PromptCacheError, UsageError
from jamba_cli.generation import stream_generate
from jamba_cli.loader import load

MB = 1 << 20
DOCUMENT = "\n".join(CORPUS[:4] * 3) + "\n"  # a file ends with a newline


# `jamba ARGS` that writes its own peak RSS (VmHWM, in KiB) to the file named first when it exits: a child's
# ru_maxrss would start from what the forking test process had, which grows as the tests run
PEAK = """import atexit, sys
def report(path=sys.argv[1]):
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(peak)
atexit.register(report)
sys.argv = ["jamba", *sys.argv[2:]]
from jamba_cli.cli import main
main()
"""


def measured(args, env, input=b"", timeout=120):
    """Run `jamba ARGS`; returns (exit status, stdout, stderr, its peak RSS in bytes)."""
    with tempfile.TemporaryDirectory() as d:
        peak = Path(d) / "peak"
        r = subprocess.run([sys.executable, "-c", PEAK, peak, *map(str, args)], input=input, capture_output=True,
                           env=env, cwd=ROOT, timeout=timeout)
        return r.returncode, r.stdout.decode(), r.stderr.decode(), int(peak.read_text()) * 1024


def listing(directory: Path) -> list[str]:
    """The names in a test's folder, less the `env` fixture's state folder."""
    return sorted(p.name for p in directory.iterdir() if p.name != "state")


def run(model, tok, prompt, **kw):
    chunks = list(stream_generate(model, tok, prompt, max_tokens=6, ignore_eos=True, **kw))
    return "".join(c.text for c in chunks), chunks[-1].stats.cached_tokens


# -- item 15: the longest shared start is reused, down to a position where the Mamba states were kept --

@pytest.mark.slow
def test_readme_example_reuses_the_document(ckpt, env, small, tmp_path):
    """`jamba run --prompt-cache manual.cache -f manual.md QUESTION`, twice with different questions."""
    model, tok = small
    (tmp_path / "manual.md").write_text(DOCUMENT)
    cache = tmp_path / "manual.cache"
    ask = ("run", "-m", ckpt, "-n", 8, "--ignore-eos", "--format", "json", "--stats", "-f", tmp_path / "manual.md")
    first = subprocess.run(jamba(*ask, "--prompt-cache", cache, "How do I reset the device?"), capture_output=True,
                           env=env, cwd=ROOT, timeout=120, text=True)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["usage"]["cached_tokens"] == 0
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    second = subprocess.run(jamba(*ask, "--prompt-cache", cache, "What does the red light mean?"),
                            capture_output=True, env=env, cwd=ROOT, timeout=120, text=True)
    assert second.returncode == 0, second.stderr
    got = json.loads(second.stdout)
    document_tokens = len(tok.encode(DOCUMENT, add_special_tokens=False))
    assert got["usage"]["cached_tokens"] >= document_tokens
    assert f"{got['usage']['cached_tokens']} cached" in second.stderr  # --stats says it too
    plain = subprocess.run(jamba(*ask, "What does the red light mean?"), capture_output=True, env=env, cwd=ROOT,
                           timeout=120, text=True)
    assert plain.returncode == 0, plain.stderr
    assert got["text"] == json.loads(plain.stdout)["text"]  # greedy: the cache changes nothing but the time
    assert listing(tmp_path) == ["manual.cache", "manual.md"]  # no temporary left


def test_a_later_prompt_restores_the_last_kept_state_it_shares(small, tmp_path):
    """A Mamba state exists only where it was kept: a prompt sharing 4,500 tokens with the file resumes at
    4,096 (a state kept every `EVERY` tokens), not at 4,500, and generates what a fresh run does."""
    model, tok = small
    path = tmp_path / "p.cache"
    base = tok.encode(" ".join(CORPUS[:4]) * 80)[:4600]
    assert len(base) == 4600 and pc.EVERY == 4096
    first = base + tok.encode(" Now is the winter", add_special_tokens=False)
    other = base[:4500] + tok.encode(" Friends, Romans", add_special_tokens=False)
    run(model, tok, first, prompt_cache=path)
    assert load_file(path)["positions"].tolist() == [4096, len(first) - 1]
    text, cached = run(model, tok, other, prompt_cache=path)
    assert cached == 4096
    assert text == run(model, tok, other)[0]
    # the new file keeps the shared state at 4,096: the first prompt still resumes there
    assert load_file(path)["positions"].tolist() == [4096, len(other) - 1]
    text, cached = run(model, tok, first, prompt_cache=path)
    assert cached == 4096 and text == run(model, tok, first)[0]


def test_part_ends_are_found_in_the_templated_prompt(small, tmp_path):
    model, tok = small
    question = "What does the red light mean?"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": DOCUMENT + "\n\n" + question}]
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    system_end, doc_end, question_end = pc.part_ends(tok, messages, ids, ["Be brief.", DOCUMENT, question])
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
    doc_prefix = rendered[:rendered.index(DOCUMENT) + len(DOCUMENT)]
    # every token within the document's text, none past it
    assert tok.decode(ids[:doc_end]) in doc_prefix and doc_end >= len(tok.encode(DOCUMENT, add_special_tokens=False))
    assert 0 < system_end < doc_end < question_end < len(ids)
    path = tmp_path / "p.cache"
    run(model, tok, messages, prompt_cache=path, prompt_parts=["Be brief.", DOCUMENT, question])
    assert load_file(path)["positions"].tolist() == [system_end, doc_end, question_end, len(ids) - 1]
    again = [messages[0], {"role": "user", "content": DOCUMENT + "\n\nHow do I reset it?"}]
    text, cached = run(model, tok, again, prompt_cache=path, prompt_parts=["Be brief.", DOCUMENT])
    assert cached == doc_end and text == run(model, tok, again)[0]
    # text prompts too (--raw): the parts joined as the CLI joins them
    raw = DOCUMENT + "\n\n" + question
    (end,) = pc.part_ends(tok, raw, tok.encode(raw), [DOCUMENT])
    assert end >= len(tok.encode(DOCUMENT))


# -- item 7: the fingerprint covers every value --

def _twin(source: Path, directory: Path, change) -> Path:
    """A copy of the checkpoint `source` whose tensors went through `change(name, tensor)`."""
    directory.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (directory / f.name).write_bytes(f.read_bytes())
    tensors = load_file(source / "model.safetensors")
    for name, t in tensors.items():
        change(name, t)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_fingerprint_tells_apart_checkpoints_that_differ_in_middle_values(ckpt, small, tmp_path):
    model, tok = small

    def middle(name, t):
        if name == "model.layers.1.mamba.in_proj.weight":
            flat = t.view(-1)
            flat[flat.numel() // 2: flat.numel() // 2 + 3] += 0.5
    twin, _ = load(_twin(Path(ckpt), tmp_path / "twin", middle), dtype="fp32", device="cpu")
    ours, theirs = model.state_dict(), twin.state_dict()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == ["model.layers.1.mamba.in_proj.weight"]
    for k in ours:  # the 16 values per weight the old fingerprint sampled are all the same
        a, b = ours[k].reshape(-1), theirs[k].reshape(-1)
        assert torch.equal(a[:8], b[:8]) and torch.equal(a[-8:], b[-8:])
    assert pc.fingerprint(twin) != pc.fingerprint(model)
    path = tmp_path / "p.cache"
    run(model, tok, "To be, or not to be", prompt_cache=path)
    with pytest.raises(PromptCacheError, match="made by another model"):
        run(twin, tok, "To be, or not to be", prompt_cache=path)
    # the same files loaded again: the same fingerprint (the file is reused)
    again, _ = load(ckpt, dtype="fp32", device="cpu")
    assert pc.fingerprint(again) == pc.fingerprint(model)
    assert run(again, tok, "To be, or not to be", prompt_cache=path)[1] > 0


def test_fingerprint_sees_sign_flips_in_the_top_bits(ckpt, small, tmp_path):
    """Signs flipped in the highest bit of 8-byte words (an fp32 at an odd index): one flip, and two, which
    cancel in a sum of the words mod 2^64 and show only in the sum shifted by 4 bytes."""
    model, _ = small
    name = "model.embed_tokens.weight"
    for flips in ((1001,), (1001, 2003)):
        def flip(key, t):
            if key == name:
                for i in flips:
                    t.view(-1)[i] *= -1
        twin, _ = load(_twin(Path(ckpt), tmp_path / f"twin{len(flips)}", flip), dtype="fp32", device="cpu")
        assert pc.fingerprint(twin) != pc.fingerprint(model)


def test_checksum_formulas_of_cpu_and_gpu_agree():
    """The CPU sums rows by an integer matrix-vector product, the GPU (no integer matmul) by a product then
    a sum: both wrap mod 2^64, so they agree (here both run on the CPU)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(-2**63, 2**63 - 1, (3, 5000), dtype=torch.int64, generator=g)
    c = torch.randint(-2**63, 2**63 - 1, (5000,), dtype=torch.int64, generator=g) | 1
    want = [(sum(int(a) * int(b) for a, b in zip(row.tolist(), c.tolist())) + 2**63) % 2**64 - 2**63 for row in rows]
    assert fingerprint._row_sums(rows, c).tolist() == want == (rows * c).sum(1).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fingerprint_is_the_same_on_every_device(ckpt):
    on_cpu, _ = load(ckpt, dtype="bf16", device="cpu")
    on_gpu, _ = load(ckpt, dtype="bf16", device="cuda")
    assert pc.fingerprint(on_cpu) == pc.fingerprint(on_gpu)


# -- item 4: a forged file is refused before anything is allocated for it --

def _forged(model, path: Path, n: int, positions: int = 1, kv_len: int | None = None) -> Path:
    """A file with this model's metadata and fingerprint whose `tokens` claim n tokens."""
    c = model.config
    tensors = {"tokens": torch.zeros(n, dtype=torch.int64), "positions": torch.tensor([n] * positions)}
    for i in range(c.num_hidden_layers):
        if c.is_attention(i):
            for kind in "kv":
                tensors[f"{i}.{kind}"] = torch.zeros(1, c.num_key_value_heads, kv_len or 1, c.head_dim)
        else:
            tensors[f"{i}.conv"] = torch.zeros(positions, c.d_inner, c.mamba_d_conv - 1)
            tensors[f"{i}.ssm"] = torch.zeros(positions, c.d_inner, c.mamba_d_state)
    save_file(tensors, str(path), metadata={"format": pc.FORMAT, "fingerprint": pc.fingerprint(model),
                                            "dtype": "float32"})
    return path


@pytest.mark.slow
def test_forged_chat_state_claiming_huge_context_is_refused_in_bounded_memory(ckpt, env, small, tmp_path):
    model, _ = small
    talk = tmp_path / "talk.json"
    talk.write_text(json.dumps({"format": "jamba-chat/1", "model": "x", "system": None,
                                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                "settings": {}}))
    state = _forged(model, tmp_path / "talk.json.state", 4 * MB)  # 32 MB of tokens: 2 GB of K/V if believed
    before = state.read_bytes()
    code, out, err, rss = measured(("chat", "-m", ckpt, "-n", 2, "--resume", talk), env, b"hi\n")
    assert code == 0, err
    assert f"prompt cache {state} holds {4 * MB} tokens, more than the context" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert rss < 1000 * MB, rss
    assert state.read_bytes() == before and listing(tmp_path) == ["talk.json", "talk.json.state"]


@pytest.mark.slow
def test_forged_prompt_cache_is_refused_in_bounded_memory(ckpt, env, small, tmp_path):
    model, _ = small
    huge = _forged(model, tmp_path / "huge.cache", 4 * MB)
    code, out, err, rss = measured(("run", "-m", ckpt, "-n", 2, "--prompt-cache", huge, "hi"), env)
    assert (code, out) == (1, "") and rss < 1000 * MB, (code, err, rss)
    assert err == f"error: prompt cache {huge} holds {4 * MB} tokens, more than the context (262144)\n"
    # within the context, but its K/V do not hold what `tokens` claims
    short = _forged(model, tmp_path / "short.cache", 200_000)
    before = short.read_bytes()
    code, out, err, rss = measured(("run", "-m", ckpt, "-n", 2, "--prompt-cache", short, "hi"), env)
    assert (code, out) == (1, "") and rss < 1000 * MB, (code, err, rss)
    assert err == (f"error: prompt cache {short}: tensor 0.k has shape [1, 2, 1, 16], this model and 200000 "
                   f"tokens need [1, 2, 200000, 16]\n")
    assert short.read_bytes() == before
    assert listing(tmp_path) == ["huge.cache", "short.cache"]


def test_malformed_files_name_the_tensor(small, tmp_path):
    model, tok = small
    path = tmp_path / "p.cache"
    run(model, tok, "To be, or not to be", prompt_cache=path)
    good = load_file(path)
    meta = {"format": pc.FORMAT, "fingerprint": pc.fingerprint(model), "dtype": "float32"}

    def refused(tensors, message, metadata=meta):
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(PromptCacheError, match=message):
            run(model, tok, "To be, or not to be, that", prompt_cache=path)

    refused({**good, "1.k": good["0.k"].clone()}, "unexpected tensor 1.k")
    refused({k: v for k, v in good.items() if k != "3.ssm"}, "lacks the tensor 3.ssm")
    refused({**good, "1.ssm": good["1.ssm"].double()}, "tensor 1.ssm is F64")
    refused({**good, "tokens": good["tokens"] + 10_000}, "ids outside the vocabulary")
    refused({**good, "positions": good["positions"] + 1}, "tensor positions is not an increasing list")
    refused({**good, "\x1b]0;pwned\x07": good["0.k"].clone()}, r"unexpected tensor '\\x1b\]0;pwned\\x07'")
    refused(good, "another version of jamba-cli", {**meta, "format": "jamba-prompt-cache/1"})
    # the chat's loader checks the same way
    with pytest.raises(PromptCacheError, match="another version"):
        pc.load(path, model, make_cache(model.config, 1, dtype=model.dtype))


# -- item 8: only regular files are written, refused before any work --

@pytest.mark.slow
def test_prompt_cache_must_be_a_regular_file(env, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "notes.md").write_text("my notes")
    cases = [("dir", 2, "is a directory; give a file name"), ("link", 2, "is a symbolic link"),
             ("fifo", 2, "is a named pipe"), ("notes.md", 1, "exists and is not a jamba prompt cache")]
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        cases.append(("null", 2, "is a device"))
    except (PermissionError, OSError):
        pass  # creating a device node needs root
    for name, status, message in cases:
        # -m names no model: the refusal comes before the model would be loaded
        code, out, err, _ = measured(("run", "-m", tmp_path / "no-model", "--prompt-cache", tmp_path / name,
                                           "hi"), env, timeout=60)
        assert (code, out) == (status, ""), (name, err)
        assert err.count("\n") == 1 and f"{tmp_path / name}" in err and message in err, err
        assert "--prompt-cache" in err or status == 1
    # nothing heavy is even imported before the refusal
    assert probe(env, "run", "--prompt-cache", tmp_path / "dir", "hi").stderr.endswith("HEAVY=")
    assert target.read_text() == "keep me" and (tmp_path / "link").is_symlink()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode) and (tmp_path / "notes.md").read_text() == "my notes"
    if (tmp_path / "null").exists():
        assert stat.S_ISCHR(os.lstat(tmp_path / "null").st_mode)
    assert listing(tmp_path) == sorted(["target.txt", "dir", "link", "fifo", "notes.md", *(["null"] if (tmp_path / "null").exists() else [])])


def test_save_writes_a_private_regular_file_and_refuses_others(small, tmp_path):
    """What chat's /save uses for FILE.state: `check_target` before anything, `save` writes 0600 atomically."""
    model, tok = small
    cache = make_cache(model.config, 1, dtype=model.dtype)
    ids = tok.encode("To be, or not to be")
    model(torch.tensor([ids]), cache)
    path = tmp_path / "talk.json.state"
    path.write_bytes(b"")  # an empty file may be replaced
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        pc.save(path, model, cache, ids)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and pc.check_target(path) == path
    other = make_cache(model.config, 1, dtype=model.dtype)
    assert pc.load(path, model, other) == ids and other.offset == len(ids)
    link = tmp_path / "link.state"
    link.symlink_to(path)
    with pytest.raises(UsageError, match="is a symbolic link"):
        pc.save(link, model, cache, ids)
    with pytest.raises(UsageError, match="is a directory"):
        pc.check_target(tmp_path)
    with pytest.raises(PromptCacheError, match="cannot write prompt cache .*: No such file or directory"):
        pc.check_target(tmp_path / "missing" / "x.state")
    (tmp_path / "talk.json").write_text("{}")
    with pytest.raises(PromptCacheError, match="not a jamba prompt cache"):
        pc.check_target(tmp_path / "talk.json")
    assert pc.check_target(tmp_path / "talk.json", name="conversation", replace_foreign=True)
    assert link.is_symlink() and listing(tmp_path) == ["link.state", "talk.json", "talk.json.state"]


# -- item 12: temporaries of dead processes are removed at the next save, those of live ones are not --

@pytest.mark.slow
def test_stale_temporaries_of_dead_processes_are_removed(ckpt, env, tmp_path):
    path = tmp_path / "p.cache"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        mine = pc.temporary_name(path).name
        stale = tmp_path / mine.replace(f"-{os.getpid()}.", f"-{dead.pid}.")
        running = tmp_path / mine.replace(f"-{os.getpid()}.", f"-{live.pid}.")
        elsewhere = tmp_path / f".p.cache.another-host-{dead.pid}.jamba-tmp"
        unrelated = tmp_path / f".notes.{dead.pid}.tmp"
        for f in (stale, running, elsewhere, unrelated):
            f.write_bytes(b"half a file")
        r = subprocess.run(jamba("run", "-m", ckpt, "-n", 2, "--prompt-cache", path, "hi"), capture_output=True,
                           env=env, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        assert not stale.exists()
        assert running.exists() and elsewhere.exists() and unrelated.exists() and path.exists()
    finally:
        live.kill()
        live.wait()
