"""Load a Jamba checkpoint (config.json + safetensors + tokenizer.json) from a directory or the HF cache.

Pipeline: resolve the directory -> read config.json -> read every safetensors header and check the
names and shapes against the model (nothing is allocated before the whole checkpoint checks out) ->
build the model on the meta device -> allocate each parameter on its device -> read tensor bytes
straight into it, shard by shard. Peak host memory stays near one copy of the weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import JambaConfig
from .errors import CheckpointError, ConfigError
from .model import JambaForCausalLM
from .tokenizer import Tokenizer, load_tokenizer

Progress = Callable[[int, int], None]  # (bytes loaded, bytes in all)

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}

# per-expert keys on disk -> a slice of the stacked parameter in memory
_EXPERT_KEY = re.compile(r"^(.*\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header, checking that every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path.name} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path.name} is corrupt or truncated (header length {n} > file size {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name} is corrupt: its safetensors header is not valid JSON") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is corrupt: its safetensors header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name} is corrupt: bad header entry for {name}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path.name} is corrupt: {name} has {end - begin} bytes for shape {list(shape)}")
        if 8 + n + end > size:
            raise CheckpointError(f"{path.name} is truncated: {name} ends at byte {8 + n + end} "
                                  f"but the file has {size}")
        entries[name] = TensorEntry(path, dtype, shape, 8 + n + begin, 8 + n + end)
    return entries


BUNDLED_MODEL = "jamba-tiny-shakespeare"  # trained by tools/train_tiny.py, shipped in the wheel


def bundled_model_dir() -> Path:
    """The directory of the small Jamba shipped with the package, the default model."""
    return Path(__file__).resolve().parent / "assets" / BUNDLED_MODEL


def resolve(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory, or a Hub repo id already in the local HF cache (never touches the network)."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    name = str(path_or_repo)
    if p.exists():
        raise CheckpointError(f"{name} is a file; point at the checkpoint directory")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        try:
            # ask for config.json only: the checks below cover weights and tokenizer, and huggingface_hub >= 1.x
            # refuses a snapshot that lacks any file of the repo, such as the .bin copies `jamba download` skips
            return Path(snapshot_download(name, revision=revision, local_files_only=True,
                                          allow_patterns=["config.json"]))
        except (LocalEntryNotFoundError, FileNotFoundError):
            raise CheckpointError(f"{name} is not in the local Hugging Face cache; "
                                  f"fetch it with: jamba download {name}") from None
    raise CheckpointError(f"no checkpoint directory at {name}")


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index.name} is not a valid safetensors index") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"missing weight shard {missing[0]} (listed in {index.name})")
        return files
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {directory}")
    return files


def default_dtype(config: JambaConfig, device: torch.device) -> torch.dtype:
    """bf16 on accelerators; on CPU fp32 (faster and exact there) unless it would not fit comfortably."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu":
        return torch.float16
    params = approx_params(config)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 0
    return torch.float32 if avail == 0 or params * 4 < 0.5 * avail else torch.bfloat16


def approx_params(c: JambaConfig) -> int:
    mlp = 3 * c.hidden_size * c.intermediate_size
    per_layer = sum(mlp * (c.num_experts if c.is_moe(i) else 1) for i in range(c.num_hidden_layers))
    return per_layer + 2 * c.vocab_size * c.hidden_size


def plan(model: JambaForCausalLM, entries: dict[str, TensorEntry]) -> list[tuple[str, TensorEntry, int | None]]:
    """Map each checkpoint tensor to (parameter name, entry, slot): slot is the expert's row block of a
    stacked parameter, None for a plain parameter. Raises on any missing, unexpected or misshapen tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    tied = model.config.tie_word_embeddings
    covered: dict[str, set] = {}
    out = []
    for key in sorted(entries):
        entry = entries[key]
        m = _EXPERT_KEY.match(key)
        if m:
            base, e, proj = m.group(1), int(m.group(2)), m.group(3)
            target = f"{base}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
            if target not in shapes or e >= shapes[target][0]:
                raise CheckpointError(f"unexpected tensor {key} in {entry.file.name}")
            full = shapes[target]
            want = (full[1] // 2, full[2]) if proj != "down_proj" else full[1:]
            part = {"gate_proj": 0, "up_proj": 1, "down_proj": 0}[proj]
            _check_shape(key, entry, want)
            covered.setdefault(target, set()).add((e, part))
            out.append((target, entry, e * (2 if proj != "down_proj" else 1) + part))
            continue
        if key == "lm_head.weight" and tied:
            continue  # a tied head is the embedding; a saved copy of it is redundant
        if key not in shapes:
            raise CheckpointError(f"unexpected tensor {key} in {entry.file.name}")
        _check_shape(key, entry, shapes[key])
        covered.setdefault(key, set()).add(None)
        out.append((key, entry, None))
    for name, shape in shapes.items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            want = {(e, p) for e in range(shape[0]) for p in ((0, 1) if name.endswith("gate_up_proj") else (0,))}
            got = covered.get(name, set())
            if None in got:
                continue
            lacking = sorted(want - got)
            if lacking:
                e, p = lacking[0]
                proj = "down_proj" if name.endswith("down_proj") else ("gate_proj", "up_proj")[p]
                raise CheckpointError(f"missing tensor {name.rsplit('.', 1)[0]}.{e}.{proj}.weight")
        elif name not in covered:
            raise CheckpointError(f"missing tensor {name}")
    return out


def _check_shape(key: str, entry: TensorEntry, want: tuple[int, ...]) -> None:
    if tuple(entry.shape) != tuple(want):
        raise CheckpointError(f"shape mismatch for {key}: checkpoint has {list(entry.shape)}, "
                              f"config expects {list(want)}")


def load_model(directory: Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               progress: Progress | None = None) -> JambaForCausalLM:
    config = JambaConfig.from_file(directory / "config.json")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(config, device)
    entries: dict[str, TensorEntry] = {}
    for f in weight_files(directory):
        for key, entry in read_header(f).items():
            if key in entries:
                raise CheckpointError(f"tensor {key} appears in both {entries[key].file.name} and {f.name}")
            entries[key] = entry
    with torch.device("meta"), _no_init():
        model = JambaForCausalLM(config)
    steps = plan(model, entries)  # raises before any memory is spent

    params = dict(model.named_parameters())
    for name, p in params.items():
        new = torch.empty(p.shape, dtype=dtype, device=device)
        _set_param(model, name, torch.nn.Parameter(new, requires_grad=False))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())

    total = sum(e.end - e.begin for _, e, _ in steps)
    done = 0
    by_file: dict[Path, list] = {}
    for step in steps:
        by_file.setdefault(step[1].file, []).append(step)
    for path, file_steps in by_file.items():
        with open(path, "rb", buffering=0) as f:
            for name, entry, slot in sorted(file_steps, key=lambda s: s[1].begin):
                dest = params[name].data
                if slot is not None:
                    rows = entry.shape[0]
                    dest = dest[slot // 2] if name.endswith("gate_up_proj") else dest[slot]
                    if name.endswith("gate_up_proj"):
                        dest = dest[(slot % 2) * rows:(slot % 2 + 1) * rows]
                _read_into(f, entry, dest)
                done += entry.end - entry.begin
                if progress:
                    progress(done, total)
    model.eval()
    return model


@contextlib.contextmanager
def _no_init():
    """Skip parameter init while building on meta: its values are overwritten anyway, and the first compute
    op on a meta tensor imports torch's Python decompositions (sympy & co., ~75 MB of RSS)."""
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _read_into(f, entry: TensorEntry, dest: torch.Tensor) -> None:
    """Read one tensor's bytes from the open file into `dest`, converting dtype and device as needed."""
    nbytes = entry.end - entry.begin
    direct = dest.device.type == "cpu" and dest.dtype == entry.dtype and dest.is_contiguous()
    buf = dest if direct else torch.empty(entry.shape, dtype=entry.dtype)
    # a writable view of the tensor's memory, without going through numpy (its import costs RSS)
    view = memoryview((ctypes.c_char * nbytes).from_address(buf.data_ptr())).cast("B") if nbytes else b""
    f.seek(entry.begin)
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{entry.file.name} is truncated")
        got += n
    if not direct:
        dest.copy_(buf.view(dest.shape))


def _set_param(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, value)


def load(path_or_repo: str | os.PathLike | None = None, *, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None, revision: str | None = None,
         progress: Progress | None = None) -> tuple[JambaForCausalLM, Tokenizer]:
    """Load a Jamba model and its tokenizer.

    Args:
        path_or_repo: a checkpoint directory, or a Hub repo id already in the local HF cache;
            None for the bundled model (`bundled_model_dir()`).
        dtype: torch dtype or one of bf16/fp16/fp32; default bf16 on GPU, fp32 on CPU when it fits.
        device: where the weights go; default cuda when available, else cpu.
        progress: called with (bytes loaded, total bytes) as the weights stream in.

    Returns:
        (model, tokenizer). Raises CheckpointError / ConfigError with a one-line message.
    """
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ConfigError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32")
        dtype = DTYPE_NAMES[dtype.lower()]
    directory = bundled_model_dir() if path_or_repo is None else resolve(path_or_repo, revision)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"no config.json in {directory}")
    tokenizer = load_tokenizer(directory)
    model = load_model(directory, dtype=dtype, device=device, progress=progress)
    return model, tokenizer
