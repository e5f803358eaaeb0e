"""Checkpoints are untrusted input: a downloaded repo can name files outside itself, forge safetensors headers,
describe a model far larger than its files, or hold values of the wrong type in any JSON file. Each is refused
with one line naming the file and the entry, key or tensor, before memory is spent; a load killed while it
offloads to disk leaves no folder behind."""

import ctypes
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from conftest import CONFIGS, BASE, make_hf_model, save_checkpoint
from helpers import ROOT, jamba
from jamba_cli import offload
from jamba_cli.config import JambaConfig
from jamba_cli.errors import CheckpointError, ConfigError, JambaError
from jamba_cli.loader import load
from jamba_cli.safetensors_header import read_header
from jamba_cli.model import JambaForCausalLM

INDEX = "model.safetensors.index.json"


# -- helpers --

@pytest.fixture
def ckpt(checkpoints, tmp_path):
    """A private copy of the 'top1' checkpoint (4 layers, 8 experts on layers 0 and 2) that a test may break."""
    return shutil.copytree(checkpoints["top1"][0], tmp_path / "ckpt")


@pytest.fixture
def tied(checkpoints, tmp_path):
    """A private copy of the 'reasoning' checkpoint: tied embeddings, no lm_head.weight on disk."""
    return shutil.copytree(checkpoints["reasoning"][0], tmp_path / "tied")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer_dir):
    return save_checkpoint(make_hf_model(**CONFIGS["top1"]), tmp_path_factory.mktemp("sharded") / "s",
                           tokenizer_dir, max_shard_size="100KB")


@pytest.fixture
def shards(sharded, tmp_path):
    """A private copy of a checkpoint in several shards with an index."""
    return shutil.copytree(sharded, tmp_path / "shards")


def refusal(directory, error=(CheckpointError, ConfigError)) -> str:
    """The one-line message with which loading `directory` is refused."""
    with within(30):
        with pytest.raises(error) as info:
            load(directory, device="cpu", dtype="fp32")
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    return message


@contextmanager
def within(seconds: float):
    """Fail, rather than hang, when the block takes longer than `seconds` (a FIFO that is read blocks)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def split(path: Path) -> tuple[dict, bytes]:
    """The header (as JSON) and the data section of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def library_refuses(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                f.get_slice(key).get_shape()
    except SafetensorError:
        return True
    return False


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


class FileOpens:
    """Watches files with inotify and tells whether anyone opened them since (Linux)."""

    IN_OPEN, IN_NONBLOCK = 0x20, 0o4000

    def __init__(self, *paths: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        assert self.fd >= 0
        for path in paths:
            assert self.libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN) >= 0, path

    def opened(self) -> bool:
        try:
            return bool(os.read(self.fd, 4096))
        except BlockingIOError:
            return False

    def close(self):
        os.close(self.fd)


MEASURE = """import os, resource, signal, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def run_measured(args, env, timeout=120, cwd=ROOT) -> tuple[int, str, str, int]:
    """Run a command; (exit status, stdout, stderr, its peak RSS in bytes). A small Python process starts it
    and reports the peak of its only child: started straight from pytest, the child's figure would include
    the RSS of the pytest process it was forked from (Linux keeps the peak of the memory an exec replaces)."""
    peak = Path(env["XDG_STATE_HOME"]).parent / "peak.txt"
    r = subprocess.run([sys.executable, "-c", MEASURE, str(peak), *map(str, args)], capture_output=True,
                       stdin=subprocess.DEVNULL, env=env, cwd=cwd, timeout=timeout)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"), \
        int(peak.read_text())


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- item 2: the index may name only regular files inside the checkpoint folder --

def _first_entry(directory: Path) -> tuple[str, str]:
    index = json.loads((directory / INDEX).read_text())
    tensor = sorted(index["weight_map"])[0]
    return tensor, index["weight_map"][tensor]


def _point(directory: Path, tensor: str, target: str) -> None:
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"][tensor] = target
    (directory / INDEX).write_text(json.dumps(index))


def test_index_entries_outside_the_folder_are_refused_without_an_existence_oracle(shards, tmp_path):
    tensor, shard = _first_entry(shards)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    shutil.copy(shards / shard, secret)  # a valid shard: followed, it would load
    fifo = outside / "fifo"
    os.mkfifo(fifo)
    watch = FileOpens(secret, fifo)
    messages = {}
    for label, target in [("absolute", str(secret)), ("absolute, missing", str(outside / "nothing.safetensors")),
                          ("dotdot", f"../outside/{secret.name}"), ("dotdot, missing", "../outside/nothing"),
                          ("fifo outside", str(fifo)), ("device", "/dev/zero"), ("root", "/"),
                          ("dotdot inside", f"./sub/../{shard}"), ("empty", "")]:
        _point(shards, tensor, target)
        message = refusal(shards)
        assert message.startswith(f"{INDEX}: the entry for {tensor} names "), message
        assert message.endswith("which is not a file inside the checkpoint folder"), message
        messages[label] = message.replace(repr(target), "TARGET")
    # the same words whether or not the outside path exists: nothing to learn about the disk
    assert len(set(messages.values())) == 1, messages
    assert not watch.opened()  # neither the outside shard nor the FIFO was opened
    watch.close()


def test_symlinks_out_of_the_folder_fifos_and_devices_inside_are_refused(shards, tmp_path):
    tensor, shard = _first_entry(shards)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(shards / shard, other / "copy.safetensors")
    os.symlink(other / "copy.safetensors", shards / "link-out.safetensors")
    os.symlink("/dev/zero", shards / "link-dev.safetensors")
    os.mkfifo(shards / "pipe.safetensors")
    os.symlink(shards / "pipe.safetensors", shards / "link-pipe.safetensors")
    (shards / "folder.safetensors").mkdir()
    watch = FileOpens(other / "copy.safetensors", shards / "pipe.safetensors")
    for name, tail in [("link-out.safetensors", "which is not a file inside the checkpoint folder"),
                       ("link-dev.safetensors", "which is not a file inside the checkpoint folder"),
                       ("pipe.safetensors", "which is not a regular file"),
                       ("link-pipe.safetensors", "which is not a regular file"),
                       ("folder.safetensors", "which is not a regular file")]:
        _point(shards, tensor, name)
        assert refusal(shards) == f"{INDEX}: the entry for {tensor} names {name!r}, {tail}"
    assert not watch.opened()
    watch.close()


def test_an_index_entry_for_a_missing_shard_inside_names_it(shards):
    tensor, _ = _first_entry(shards)
    _point(shards, tensor, "model-00009-of-00009.safetensors")
    assert refusal(shards) == f"missing weight shard model-00009-of-00009.safetensors (listed in {INDEX})"


def test_the_index_must_agree_with_the_headers(shards):
    # a tensor that the index puts in a shard that does not hold it
    index = json.loads((shards / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    tensor = next(t for t, f in sorted(index["weight_map"].items()) if f == files[0])
    _point(shards, tensor, files[1])
    assert refusal(shards) == f"{INDEX} puts tensor {tensor} in {files[1]}, which does not hold it"


def test_single_file_and_globbed_weights_must_be_regular_files_inside(ckpt, tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(elsewhere)
    os.symlink(elsewhere, ckpt / "model.safetensors")
    assert refusal(ckpt) == f"model.safetensors in {ckpt} is a link to outside the checkpoint folder"
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    assert refusal(ckpt) == f"{ckpt / 'model.safetensors'} is not a regular file"
    (ckpt / "model.safetensors").unlink()
    shutil.copy(elsewhere, ckpt / "a.safetensors")
    os.mkfifo(ckpt / "b.safetensors")
    assert refusal(ckpt) == f"{ckpt / 'b.safetensors'} is not a regular file"


def test_the_hugging_face_cache_layout_of_symlinks_into_blobs_still_loads(sharded, tmp_path, checkpoints):
    repo = tmp_path / "models--ai21labs--tiny"
    snapshot = repo / "snapshots" / ("ab" * 20)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(sharded.iterdir())):
        shutil.copy(f, repo / "blobs" / f"{i:040x}")
        os.symlink(f"../../blobs/{i:040x}", snapshot / f.name)
    model, _ = load(snapshot, device="cpu", dtype="fp32")
    want, _ = load(sharded, device="cpu", dtype="fp32")
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert torch.equal(model(ids), want(ids))
    # a snapshot symlink that leaves blobs is refused like any other
    tensor, shard = _first_entry(snapshot)
    os.symlink(f"../../../../outside/{shard}", snapshot / "escape.safetensors")
    _point(snapshot, tensor, "escape.safetensors")
    assert refusal(snapshot).endswith("which is not a file inside the checkpoint folder")


def test_a_link_to_a_checkpoint_folder_loads(ckpt, tmp_path):
    os.symlink(ckpt, tmp_path / "link")
    model, _ = load(tmp_path / "link", device="cpu", dtype="fp32")
    assert model.config.num_hidden_layers == 4


def test_config_and_tokenizer_files_that_are_fifos_or_links_out_are_refused(ckpt, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "chat_template.jinja"):
        case = shutil.copytree(ckpt, tmp_path / name)
        if (case / name).exists():
            (case / name).unlink()
        os.mkfifo(case / name)
        assert name in refusal(case) and "not a regular file" in refusal(case)
        (case / name).unlink()
        (tmp_path / "outside.json").write_text("{}")
        os.symlink(tmp_path / "outside.json", case / name)
        assert refusal(case) == f"{name} in {case} is a link to outside the checkpoint folder"


@pytest.mark.slow
def test_cli_refuses_an_index_pointing_outside_in_one_line(shards, tmp_path, env):
    tensor, shard = _first_entry(shards)
    outside = tmp_path / "private"
    outside.mkdir()
    os.mkfifo(outside / "pipe")
    for target in (str(outside / "pipe"), "../private/pipe"):
        _point(shards, tensor, target)
        rc, out, err, _ = run_measured(jamba("run", "-m", shards, "-n", 2, "hi"), env, timeout=60)
        line = one_error_line(err)
        assert rc == 1 and out == ""
        assert line == f"error: {INDEX}: the entry for {tensor} names {target!r}, which is not a file inside " \
                       f"the checkpoint folder"


# -- item 3: safetensors headers, validated at least as strictly as the safetensors library --

def _shift(header, name, by):
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + by, end + by]


def _h_overlap(h, d):
    _shift(h, by_offset(h)[1], -4)
    return by_offset(h)[1], "overlaps"


def _h_alias(h, d):
    names = by_offset(h)
    a, b = next((a, b) for a, b in zip(names, names[1:]) if h[a]["shape"] == h[b]["shape"] and
                h[a]["dtype"] == h[b]["dtype"])
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return (a, b), "overlaps"


def _h_gap(h, d):
    names = by_offset(h)
    for name in names[5:]:
        _shift(h, name, 8)
    end = h[names[4]]["data_offsets"][1]
    return names[5], "starts 8 bytes after the end of the tensor before it", d[:end] + bytes(8) + d[end:]


def _h_trailing(h, d):
    return by_offset(h)[-1], "last 16 bytes, after", d + bytes(16)


def _h_entry(change):
    def edit(h, d):
        name = by_offset(h)[3]
        change(h[name])
        return name, ""
    return edit


HEADER_CASES = {
    # case: (edit, does the safetensors library refuse it too)
    "overlapping offsets": (_h_overlap, True),
    "aliased offsets": (_h_alias, True),
    "a gap between tensors": (_h_gap, True),
    "bytes after the last tensor": (_h_trailing, True),
    "float offsets": (_h_entry(lambda e: e.update(data_offsets=[float(o) for o in e["data_offsets"]])), True),
    "float shape": (_h_entry(lambda e: e.update(shape=[float(s) for s in e["shape"]])), True),
    "string shape": (_h_entry(lambda e: e.update(shape=[str(s) for s in e["shape"]])), True),
    "negative shape": (_h_entry(lambda e: e.update(shape=[-s for s in e["shape"]])), True),
    "bool shape": (_h_entry(lambda e: e.update(shape=[True] * len(e["shape"]))), True),
    "null shape": (_h_entry(lambda e: e.update(shape=None)), True),
    "shape an object": (_h_entry(lambda e: e.update(shape={"0": 1})), True),
    "string offsets": (_h_entry(lambda e: e.update(data_offsets=[str(o) for o in e["data_offsets"]])), True),
    "three offsets": (_h_entry(lambda e: e.update(data_offsets=[*e["data_offsets"], 0])), True),
    "begin after end": (_h_entry(lambda e: e.update(data_offsets=e["data_offsets"][::-1])), True),
    "bytes do not match the shape": (_h_entry(lambda e: e.update(shape=[e["shape"][0] * 2, *e["shape"][1:]])),
                                     True),
    "unknown dtype": (_h_entry(lambda e: e.update(dtype="Q4_K")), True),
    "dtype not a string": (_h_entry(lambda e: e.update(dtype=32)), True),
    "entry not an object": (_h_entry(lambda e: (e.clear())), True),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_forged_headers_are_refused_naming_the_file_and_tensor(ckpt, case):
    edit, library = HEADER_CASES[case]
    path = ckpt / "model.safetensors"
    header, data = split(path)
    name, words, *new_data = edit(header, data)
    write_raw(path, header, new_data[0] if new_data else data)
    assert library_refuses(path) == library  # what the library makes of it: we must refuse at least that
    message = refusal(ckpt, CheckpointError)
    assert message.startswith("model.safetensors is "), message
    assert any(n in message for n in ((name,) if isinstance(name, str) else name)), message
    assert words in message


def test_a_key_given_twice_in_a_header_is_refused(ckpt):
    # the library takes the last of the two; Python's json too; another reader may take the first
    path = ckpt / "model.safetensors"
    header, data = split(path)
    name = by_offset(header)[0]
    text = json.dumps(header).encode()
    twice = text[:-1] + b", " + json.dumps({name: header[name]}).encode()[1:]
    write_raw(path, twice, data)
    assert not library_refuses(path)
    assert refusal(ckpt) == f"model.safetensors is corrupt: its safetensors header holds key {name!r} twice"


def test_metadata_must_map_strings_to_strings(ckpt):
    path = ckpt / "model.safetensors"
    header, data = split(path)
    header["__metadata__"] = {"format": ["pt"]}
    write_raw(path, header, data)
    assert library_refuses(path)
    assert refusal(ckpt) == "model.safetensors is corrupt: its __metadata__ must map strings to strings"


def test_every_header_the_library_refuses_is_refused(ckpt, tmp_path):
    """Random damage to the numbers of a real header: whatever the library refuses, read_header refuses with
    a CheckpointError (and never fails any other way)."""
    header, data = split(ckpt / "model.safetensors")
    names = by_offset(header)
    rng = random.Random(0)
    path = tmp_path / "fuzz.safetensors"
    refused = 0
    for _ in range(300):
        h = json.loads(json.dumps(header))
        for _ in range(rng.randint(1, 3)):
            entry = h[rng.choice(names)]
            field = rng.choice(["data_offsets", "shape"])
            if not entry[field]:
                continue
            i = rng.randrange(len(entry[field]))
            if type(entry[field][i]) is not int:  # damaged already
                continue
            entry[field][i] = rng.choice([entry[field][i] + rng.choice([-8, -4, -2, -1, 1, 2, 4, 8]), 0,
                                          entry[field][i] * 2, float(entry[field][i]), -1, None, True, 2**64])
        write_raw(path, h, data[:len(data) - rng.choice([0, 0, 0, 4])] + bytes(rng.choice([0, 0, 0, 4])))
        if library_refuses(path):
            refused += 1
            with pytest.raises(CheckpointError) as info:
                read_header(path)
            assert "\n" not in str(info.value) and "fuzz.safetensors" in str(info.value)
        else:
            assert read_header(path).keys() == {k for k in h if k != "__metadata__"}
    assert refused > 200  # the damage was real


def _save_with(ckpt, edit):
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("alias", ["experts.02", "experts.\u0662", "experts.+2", "experts. 2"])
def test_expert_numbers_written_another_way_are_not_the_same_expert(ckpt, alias):
    key = "model.layers.0.feed_forward.experts.2.down_proj.weight"
    other = key.replace("experts.2", alias)
    _save_with(ckpt, lambda t: t.update({other: t[key].clone()}))
    assert refusal(ckpt) == f"unexpected tensor {other.encode('unicode_escape').decode()} in model.safetensors" \
        if not other.isprintable() else f"unexpected tensor {other} in model.safetensors"


def test_a_key_with_a_trailing_newline_is_not_the_tensor(ckpt):
    key = "model.layers.0.feed_forward.experts.2.down_proj.weight"
    _save_with(ckpt, lambda t: t.update({key + "\n": t[key].clone()}))
    assert refusal(ckpt) == f"unexpected tensor {key}\\n in model.safetensors"


def test_stacked_and_per_expert_copies_of_the_same_weights_are_refused(ckpt):
    base = "model.layers.0.feed_forward.experts"

    def both(t):
        t[f"{base}.down_proj"] = torch.stack([t[f"{base}.{e}.down_proj.weight"] for e in range(8)])
    _save_with(ckpt, both)
    assert refusal(ckpt) == (f"tensor {base}.down_proj in model.safetensors gives weights that another tensor "
                             f"of the checkpoint already gives")


def test_a_tied_model_s_extra_head_must_have_the_embedding_s_shape(tied):
    _save_with(tied, lambda t: t.update({"lm_head.weight": torch.zeros(BASE["vocab_size"], 65)}))
    assert refusal(tied) == ("shape mismatch for lm_head.weight: checkpoint has [320, 65], config expects "
                             "[320, 64]")
    _save_with(tied, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model, _ = load(tied, device="cpu", dtype="fp32")  # a redundant copy of the right shape is fine
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype, name", [(torch.int32, "I32"), (torch.int64, "I64"), (torch.bool, "BOOL"),
                                         (torch.uint8, "U8")])
def test_integer_and_bool_weights_are_refused(ckpt, dtype, name):
    key = "model.embed_tokens.weight"
    _save_with(ckpt, lambda t: t.update({key: t[key].to(dtype)}))
    assert refusal(ckpt) == f"{key} in model.safetensors has dtype {name}; weights are floating point " \
                            f"(BF16, F16, F32, or F8_E4M3 with a weight_scale)"


# -- item 4: a config is held against the files before anything is built --

def test_param_count_is_the_model_s_in_closed_form():
    for overrides in CONFIGS.values():
        for extra in ({}, {"mamba_proj_bias": True, "mamba_conv_bias": False}, {"tie_word_embeddings": True}):
            config = JambaConfig.from_dict({**BASE, **overrides, **extra})
            with torch.device("meta"):
                model = JambaForCausalLM(config)
            assert config.param_count() == sum(p.numel() for p in model.parameters())
    huge = JambaConfig.from_dict({**BASE, **CONFIGS["mini"], "num_hidden_layers": 10**15})
    assert huge.param_count() > 10**18  # in closed form: no loop over the layers


@pytest.mark.parametrize("key, value, names", [
    ("num_hidden_layers", 10_000_000, "but the weights hold 4 layers"),
    ("vocab_size", 10**12, "model.embed_tokens.weight in model.safetensors has shape [320, 64]"),
    ("hidden_size", 2**40, "model.embed_tokens.weight in model.safetensors has shape [320, 64]"),
    ("num_experts", 10**9, "router.weight in model.safetensors has shape [8, 64]"),
    ("intermediate_size", 10**9, "down_proj.weight in model.safetensors has shape [64, 96]"),
    ("mamba_d_state", 10**9, "A_log in model.safetensors has shape [128, 8]"),
    ("mamba_expand", 10**6, "A_log in model.safetensors has shape [128, 8]"),
    ("mamba_d_conv", 10**9, "conv1d.weight in model.safetensors has shape [128, 1, 4]"),
    ("mamba_dt_rank", 10**9, "dt_proj.weight in model.safetensors has shape [128, 7]"),
])
def test_absurd_sizes_are_refused_naming_config_json_and_the_key(ckpt, key, value, names):
    edit_json(ckpt / "config.json", **{key: value})
    with within(10):  # nothing is built or looped over
        message = refusal(ckpt, ConfigError)
    assert message.startswith(f"{ckpt / 'config.json'}: key {key!r} is {value} but "), message
    assert names in message


def test_a_config_far_beyond_its_files_is_refused_even_without_a_telling_tensor(ckpt):
    edit_json(ckpt / "config.json", num_experts=10**6, num_experts_per_tok=1)
    _save_with(ckpt, lambda t: [t.pop(k) for k in list(t) if "router" in k])  # nothing tells the expert count
    held = sum(t.numel() for t in load_file(ckpt / "model.safetensors").values())
    message = refusal(ckpt, ConfigError)
    assert message.startswith(f"{ckpt / 'config.json'}: its sizes describe "), message
    assert message.endswith(f" weights but the safetensors files hold {held:,}")


@pytest.mark.slow
@pytest.mark.parametrize("key, value", [("num_hidden_layers", 10_000_000), ("num_experts", 10**9),
                                        ("hidden_size", 2**40)])
def test_cli_memory_stays_bounded_for_a_tiny_config_with_huge_sizes(ckpt, env, key, value):
    edit_json(ckpt / "config.json", **{key: value})
    rc, out, err, peak = run_measured(jamba("run", "-m", ckpt, "-n", 2, "hi"), env, timeout=120)
    line = one_error_line(err)
    assert rc == 1 and out == ""
    assert line.startswith(f"error: {ckpt / 'config.json'}: key {key!r} is {value} but "), line
    assert peak < 1 << 30, f"peak RSS {peak / 2**20:.0f} MiB"  # a normal tiny run takes about 0.45 GiB


# -- item 12: offload folders never outlive their process --

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(folder: Path, pid: int, start: int) -> Path:
    path = folder / f"{offload.PREFIX}{pid}-{start}-0123abcd"
    path.mkdir(parents=True)
    (path / "model.embed_tokens.weight.bin").write_bytes(bytes(4096))
    return path


def test_sweep_removes_folders_of_dead_processes_only(tmp_path):
    me = os.getpid()
    dead = _plant(tmp_path, _dead_pid(), 1)
    reused = _plant(tmp_path, me, offload._start_time(me) + 1)  # this pid, but another process's start time
    mine = _plant(tmp_path, me, offload._start_time(me))
    unknown_start = _plant(tmp_path, me, 0)
    old_style = tmp_path / "jamba-offload-k2j4h5"
    old_style.mkdir()
    target = tmp_path / "victim"
    target.mkdir()
    os.symlink(target, tmp_path / f"{offload.PREFIX}{_dead_pid()}-1-0123abcd")
    assert sorted(offload.sweep(tmp_path)) == sorted([dead, reused])
    assert mine.is_dir() and unknown_start.is_dir() and old_style.is_dir() and target.is_dir()


def test_an_interrupted_load_removes_its_offload_folder(checkpoints, tmp_path):
    def interrupt(done, total):
        if done > total // 2:
            assert [p.name[:len(offload.PREFIX)] for p in offload_dir.iterdir()] == [offload.PREFIX]
            raise KeyboardInterrupt

    offload_dir = tmp_path / "offload"
    with pytest.raises(KeyboardInterrupt):
        load(checkpoints["mini"][0], dtype="fp32", device_map="auto", max_memory="cpu=2MB",
             offload_folder=offload_dir, progress=interrupt)
    assert list(offload_dir.iterdir()) == []


@pytest.fixture(scope="module")
def heavy(tmp_path_factory, tokenizer_dir) -> Path:
    """A ~150 MB bf16 checkpoint (zeros): its disk offload takes long enough to be caught while it loads."""
    config = JambaConfig.from_dict({**BASE, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 8,
                                    "num_key_value_heads": 2, "num_hidden_layers": 4, "num_experts": 2,
                                    "num_experts_per_tok": 1, "attn_layer_period": 4, "attn_layer_offset": 2,
                                    "expert_layer_period": 2, "expert_layer_offset": 1, "torch_dtype": "bfloat16"})
    with torch.device("meta"):
        model = JambaForCausalLM(config)
    directory = tmp_path_factory.mktemp("heavy")
    save_file({n: torch.zeros(p.shape, dtype=torch.bfloat16) for n, p in model.named_parameters()},
              directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    (directory / "map.json").write_text(json.dumps({"": "disk"}))
    return directory


def _offload_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(offload.PREFIX)) if folder.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130),
                                         (signal.SIGHUP, -signal.SIGHUP)], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_during_an_offloaded_load_leaves_no_folder(heavy, tmp_path, env, sig, status):
    folder = tmp_path / "offload"
    for attempt in range(5):
        p = subprocess.Popen(jamba("run", "-m", heavy, "--dtype", "bf16", "--device-map", heavy / "map.json",
                                   "--offload-folder", folder, "-n", 1, "hi"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        end = time.monotonic() + 60
        while not any(any(d.iterdir()) for d in (folder.glob(offload.PREFIX + "*") if folder.exists() else [])):
            assert p.poll() is None and time.monotonic() < end, p.communicate()
            time.sleep(0.001)
        p.send_signal(signal.SIGSTOP)  # hold it still, and make sure it is still loading
        loading = bool(_offload_folders(folder))
        if loading:
            p.send_signal(sig)
        p.send_signal(signal.SIGCONT)
        out, err = p.communicate(timeout=60)
        if loading:
            break
    else:
        pytest.fail("never caught the load in progress")
    assert p.returncode == status, err
    assert b"Traceback" not in err
    assert _offload_folders(folder) == []
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_the_next_run_removes_stale_folders_of_dead_processes_only(ckpt, tmp_path, env):
    folder = tmp_path / "offload"
    me = os.getpid()
    dead = _plant(folder, _dead_pid(), 12345)
    live = _plant(folder, me, offload._start_time(me))
    (tmp_path / "map.json").write_text(json.dumps({"": "disk"}))
    r = subprocess.run(jamba("run", "-m", ckpt, "--device-map", tmp_path / "map.json", "--offload-folder", folder,
                             "-n", 2, "hi"), capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not dead.exists() and live.is_dir()
    assert _offload_folders(folder) == [live.name]  # its own folder is gone too


# -- item 14: every kind of wrong value in every checkpoint file, one line naming the file and key --

def _config_cases():
    cases = []
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_experts", "mamba_d_state",
                "attn_layer_period", "expert_layer_offset", "mamba_dt_rank", "num_key_value_heads"):
        for value in ("64", [64], {"value": 64}, 1.5, True, -1, "1e9"):
            cases.append((f"config {key}={value!r}", "config.json", {key: value}, key))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "mamba_d_conv"):
        cases += [(f"config {key}=null", "config.json", {key: None}, key),
                  (f"config {key}=0", "config.json", {key: 0}, key)]
    for key, value in [("tie_word_embeddings", "yes"), ("tie_word_embeddings", 1), ("mamba_conv_bias", None),
                       ("mamba_proj_bias", "false"), ("rms_norm_eps", "1e-6"), ("rms_norm_eps", None),
                       ("rms_norm_eps", 0), ("hidden_act", 5), ("hidden_act", ["silu"]), ("model_type", None),
                       ("model_type", ["jamba"]), ("eos_token_id", "2"), ("eos_token_id", [2, "3"]),
                       ("eos_token_id", {"id": 2}), ("eos_token_id", 10**6), ("eos_token_id", -1),
                       ("architectures", "JambaForCausalLM"), ("torch_dtype", 16), ("initializer_range", [0.02]),
                       ("attn_layer_offset", 10**30), ("num_attention_heads", 10**30), ("mamba_expand", 2.0),
                       ("num_experts_per_tok", 10**9)]:
        cases.append((f"config {key}={value!r}", "config.json", {key: value}, key))
    return cases


FILE_CASES = [
    # (case, file, content: dict of keys to set, or bytes for the whole file, what the message must name)
    *_config_cases(),
    ("config: not JSON", "config.json", b"{\"vocab_size\": ", "not valid JSON"),
    ("config: a list", "config.json", b"[1, 2]", "must hold a JSON object"),
    ("config: nested too deeply", "config.json", b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ("config: a number with 5000 digits", "config.json", b'{"vocab_size": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("config: not UTF-8", "config.json", b'{"hidden_act": "\xff\xfe"}', "not UTF-8"),
    ("config: key twice", "config.json", b'{"model_type": "jamba", "model_type": "llama"}', "'model_type' twice"),
    ("config: empty", "config.json", b"", "not valid JSON"),
    ("tokenizer_config: bos_token=5", "tokenizer_config.json", {"bos_token": 5}, "bos_token"),
    ("tokenizer_config: eos_token=list", "tokenizer_config.json", {"eos_token": ["<|endoftext|>"]}, "eos_token"),
    ("tokenizer_config: pad_token content=5", "tokenizer_config.json", {"pad_token": {"content": 5}}, "pad_token"),
    ("tokenizer_config: add_bos_token='no'", "tokenizer_config.json", {"add_bos_token": "no"}, "add_bos_token"),
    ("tokenizer_config: chat_template=5", "tokenizer_config.json", {"chat_template": 5}, "chat_template"),
    ("tokenizer_config: chat_template list without template", "tokenizer_config.json",
     {"chat_template": [{"name": "default"}]}, "chat_template"),
    ("tokenizer_config: template syntax error", "tokenizer_config.json", {"chat_template": "{% if %}"},
     "syntax error on line 1"),
    ("tokenizer_config: named template syntax error", "tokenizer_config.json",
     {"chat_template": [{"name": "default", "template": "{{ x }"}]}, "template 'default'"),
    ("tokenizer_config: template nested too deeply", "tokenizer_config.json",
     {"chat_template": "{% if x %}" * 5000 + "{% endif %}" * 5000}, "chat_template"),
    ("tokenizer_config: a list", "tokenizer_config.json", b"[]", "must hold a JSON object"),
    ("tokenizer_config: nested too deeply", "tokenizer_config.json", b"{\"a\":" * 100_000 + b"1" + b"}" * 100_000,
     "not valid JSON"),
    ("special_tokens_map: eos_token=null content", "special_tokens_map.json", {"eos_token": {"content": []}},
     "eos_token"),
    ("chat_template.jinja: syntax error", "chat_template.jinja", b"{% for m in messages %}", "syntax error"),
    ("chat_template.jinja: not UTF-8", "chat_template.jinja", b"{{ '\xff' }}", "not UTF-8"),
    ("tokenizer.json: garbage", "tokenizer.json", b"{\"model\": 5}", "cannot be read"),
    ("tokenizer.json: nested too deeply", "tokenizer.json", b"[" * 100_000, "cannot be read"),
    *[(f"generation_config: {key}={value!r}", "generation_config.json", {key: value}, key)
      for key, value in [("temperature", "hot"), ("temperature", [0.7]), ("temperature", True),
                         ("top_k", 1.5), ("top_k", "50"), ("top_p", {}), ("min_p", "0"),
                         ("repetition_penalty", "1.1"), ("max_new_tokens", "many"),
                         ("do_sample", "yes"), ("do_sample", 1), ("eos_token_id", "2"), ("eos_token_id", [-1]),
                         ("eos_token_id", [[2]])]],
    ("generation_config: a list", "generation_config.json", b"[0.7]", "must hold a JSON object"),
    # of the right type but out of range: refused when the sampling options are first resolved
    ("generation_config: temperature=-1", "generation_config.json", {"do_sample": True, "temperature": -1},
     "temperature"),
    ("generation_config: top_p=5", "generation_config.json", {"do_sample": True, "top_p": 5}, "top_p"),
    ("index: a list", INDEX, b"[]", "must hold a JSON object"),
    ("index: no weight_map", INDEX, {"weight_map": None}, "weight_map"),
    ("index: weight_map a list", INDEX, {"weight_map": ["model.safetensors"]}, "weight_map"),
    ("index: weight_map empty", INDEX, {"weight_map": {}}, "weight_map"),
    ("index: file a number", INDEX, {"weight_map": {"model.embed_tokens.weight": 5}}, "model.embed_tokens.weight"),
    ("index: file a list", INDEX, {"weight_map": {"model.embed_tokens.weight": ["model.safetensors"]}},
     "model.embed_tokens.weight"),
    ("index: file null", INDEX, {"weight_map": {"model.embed_tokens.weight": None}}, "model.embed_tokens.weight"),
    ("index: tensor twice", INDEX, b'{"weight_map": {"a": "model.safetensors", "a": "x.safetensors"}}', "'a' twice"),
    ("index: nested too deeply", INDEX, b'{"weight_map": ' + b"[" * 100_000, "not valid JSON"),
    ("header: a list", "model.safetensors", "header:[]", "must hold a JSON object"),
    ("header: entry a string", "model.safetensors", "header:entry=\"x\"", "is not an object"),
    ("header: shape string", "model.safetensors", "header:shape=\"64\"", "shape"),
    ("header: offsets null", "model.safetensors", "header:data_offsets=null", "data_offsets"),
    ("header: dtype null", "model.safetensors", "header:dtype=null", "dtype"),
    ("header: nested too deeply", "model.safetensors", "header:deep", "not valid JSON"),
    ("header: not UTF-8", "model.safetensors", "header:latin1", "not valid JSON"),
]


def _break(directory: Path, name: str, content) -> None:
    path = directory / name
    if name == INDEX and isinstance(content, dict):
        edit_json(path, **content)
        return
    if name == "model.safetensors":
        header, data = split(path)
        victim = by_offset(header)[0]
        kind, _, value = content.removeprefix("header:").partition("=")
        if kind == "[]":
            text = b"[]"
        elif kind == "deep":
            text = b"[" * 100_000 + b"]" * 100_000
        elif kind == "latin1":
            text = json.dumps(header).encode()[:-1] + b', "caf\xe9": 1}'
        else:
            if kind == "entry":
                header[victim] = json.loads(value)
            else:
                header[victim][kind] = json.loads(value)
            text = json.dumps(header).encode()
        write_raw(path, text, data)
        return
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        edit_json(path, **content)


@pytest.fixture(scope="module")
def broken(checkpoints, sharded, tmp_path_factory) -> dict[str, Path]:
    """case -> a checkpoint broken that way (the index cases on the sharded one)."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for i, (case, name, content, _) in enumerate(FILE_CASES):
        source = sharded if name == INDEX else checkpoints["top1"][0]
        directory = shutil.copytree(source, root / f"{i:03d}", copy_function=os.link)
        if (directory / name).exists():  # the copy is a hard link: replace, never write through it
            data = (directory / name).read_bytes()
            (directory / name).unlink()
            (directory / name).write_bytes(data)
        _break(directory, name, content)
        out[case] = directory
    return out


@pytest.mark.parametrize("case", [c[0] for c in FILE_CASES])
def test_every_broken_file_is_refused_in_one_line_naming_file_and_key(broken, case):
    _, name, _, names = next(c for c in FILE_CASES if c[0] == case)
    directory = broken[case]
    with within(30):
        try:
            model, tokenizer = load(directory, device="cpu", dtype="fp32")
        except JambaError as e:
            message = str(e)
        else:  # a sampling value of the right type but out of range is refused when it is first used
            from jamba_cli.sample import SamplingParams

            with pytest.raises(JambaError) as info:
                SamplingParams().resolve(tokenizer.generation_config)
            message = str(info.value)
    assert "\n" not in message, message
    assert name in message and names in message, message


CLI_DRIVER = r"""
import json, os, sys
from jamba_cli.cli import main
# imported once: each case runs in a fork of this process
import huggingface_hub, jinja2, rich.console, rich.markup, safetensors, tokenizers, torch
import jamba_cli.hub, jamba_cli.loader, jamba_cli.terminal
results = []
for case, argv in json.loads(sys.stdin.read()):
    err = os.path.join(os.environ["DRIVER_DIR"], "stderr.txt")
    pid = os.fork()
    if pid == 0:
        fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = ["jamba", *argv]
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append([case, os.waitstatus_to_exitcode(status), open(err, errors="replace").read()])
print(json.dumps(results))
"""


@pytest.mark.slow
def test_the_cli_refuses_every_broken_file_with_one_line_and_exit_1(broken, env, tmp_path):
    """The same cases through the `jamba run` command line (main(), in a fork per case of one process that has
    imported torch once, so that a hundred cases take seconds): exit 1, one line, no traceback."""
    argv = [[case, ["run", "-m", str(broken[case]), "-n", "2", "hi"]] for case, *_ in FILE_CASES]
    r = subprocess.run([sys.executable, "-c", CLI_DRIVER], input=json.dumps(argv), capture_output=True, text=True,
                       env={**env, "DRIVER_DIR": str(tmp_path)}, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for case, status, stderr in json.loads(r.stdout):
        _, name, _, names = next(c for c in FILE_CASES if c[0] == case)
        line = one_error_line(stderr)
        assert status == 1, (case, stderr)
        assert name in line and names in line, (case, line)
