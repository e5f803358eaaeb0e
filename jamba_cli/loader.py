"""Load a Jamba checkpoint (config.json + safetensors + tokenizer.json) from a directory or the HF cache.

The checkpoint is untrusted input (checkpoint_files.py: which files may be read, and how). Pipeline: resolve
the directory -> read config.json -> read and validate every safetensors header -> hold the config's sizes
against them (`check_sizes`) -> build the model on the meta device -> check the tensors' names, shapes and
dtypes against the model (`plan`) -> `place`: resolve the device map
(devices.py) and swap the modules to quantize for quantized ones (quant.py, quant8.py), still on meta; nothing
is allocated before all of this checks out -> allocate each parameter on its device (or memory-map it
in the offload folder) -> read tensor bytes straight into it, shard by shard; a weight to quantize is
read into a staging buffer on its device and quantized as soon as it is complete. Peak memory stays near
the final footprint plus one tensor.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint_files, offload
from . import quant as _quant  # (`load` has a parameter named quant)
from .config import JambaConfig
from .defaults import INT8_SKIP, INT8_THRESHOLD, bundled_model_dir
from .errors import CheckpointError, ConfigError, UsageError
from .files import expand_user
from .hub import is_local_path
from .kernels import KernelOptions
from .model import Experts, JambaForCausalLM, Linear
from .placement import _no_init, place
from .safetensors_header import _DTYPE_NAMES, TensorEntry, read_header
from .tokenizer import Tokenizer, load_tokenizer

Progress = Callable[[int, int], None]  # (bytes loaded, bytes in all)

DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}

# per-expert keys on disk -> a slice of the stacked parameter in memory. The expert number is written as
# Python writes it (no leading zero, ASCII digits): `experts.02` or `experts.٢` would otherwise name expert 2
# a second time.
_EXPERT_KEY = re.compile(r"(.*\.feed_forward\.experts)\.(0|[1-9][0-9]*)\.(gate_proj|up_proj|down_proj)\.weight")


def resolve(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory, or a Hub repo id already in the local HF cache (never touches the network)."""
    p = expand_user(path_or_repo, "path_or_repo")  # ~nosuchuser: one UsageError, not a RuntimeError
    if p.is_dir():
        return p
    name = str(path_or_repo)
    if p.exists():
        raise CheckpointError(f"{name} is a file; point at the checkpoint directory")
    if not is_local_path(name):
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
    raise CheckpointError(f"no such checkpoint directory: {name}")


INDEX = "model.safetensors.index.json"


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of the checkpoint: those its index names, else model.safetensors, else every
    *.safetensors file. Each is a regular file inside the folder (checkpoint_files); an index entry that names
    anything else is refused with the entry, and no path outside the folder is opened."""
    index = directory / INDEX
    if os.path.lexists(index):
        return list(weight_map(directory))
    single = directory / "model.safetensors"
    if os.path.lexists(single):
        return [checkpoint_files.check_file(single, directory)]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {directory}")
    return [checkpoint_files.check_file(f, directory) for f in files]


def weight_map(directory: Path) -> dict[Path, set[str]]:
    """The files of the index of `directory`, each with the tensors the index puts in it (file order kept)."""
    index = checkpoint_files.check_file(directory / INDEX, directory)
    data = checkpoint_files.read_json(index)
    mapping = data.get("weight_map")
    if not isinstance(mapping, dict) or not mapping:
        raise CheckpointError(f"{INDEX} is not a valid safetensors index: its weight_map must map tensor names "
                              f"to file names")
    out: dict[Path, set[str]] = {}
    checked: dict[str, Path] = {}
    for tensor, name in mapping.items():
        if not isinstance(name, str) or name not in checked:
            entry = f"the entry for {checkpoint_files.shown(tensor)}"
            try:
                checked[name] = checkpoint_files.entry_path(directory, name, listed_in=INDEX, entry=entry)
            except CheckpointError as e:
                if str(e).endswith("which is missing"):  # inside the folder: the usual message for a lost shard
                    raise CheckpointError(f"missing weight shard {checkpoint_files.shown(name)} "
                                          f"(listed in {INDEX})") from None
                raise
        out.setdefault(checked[name], set()).add(tensor)
    return out


@dataclass
class Step:
    name: str  # the parameter, named as in the unquantized model
    entry: TensorEntry
    index: tuple = ()  # where in the parameter the tensor goes: (expert, rows) for a stacked one
    scale: TensorEntry | None = None  # a float8 weight's `weight_scale` (an FP8 checkpoint)


_SCALES = (".weight_scale", ".input_scale")


def plan(model: JambaForCausalLM, entries: dict[str, TensorEntry], scheme=None) -> list[Step]:
    """Map each checkpoint tensor to the part of a parameter it fills; raises on any missing, unexpected,
    misshapen, non-float or twice-given tensor. Experts stacked on disk are split into one step per expert,
    like per-expert keys. With an FP8 checkpoint's `scheme` (compressed_tensors.FP8Scheme), the weights it
    quantizes come in float8 with a `weight_scale`, which their step carries."""
    scales: dict[str, TensorEntry] = {}
    if scheme is not None:
        for key in sorted(k for k in entries if k.endswith(_SCALES)):
            module = key.rsplit(".", 1)[0]
            if not scheme.quantized(module):
                continue  # an unexpected tensor, reported below
            if key.endswith(".weight_scale"):
                weight = entries.get(f"{module}.weight")
                if weight is None:
                    raise CheckpointError(f"missing tensor {module}.weight (its weight_scale is in "
                                          f"{entries[key].file.name})")
                scheme.check(module, weight, entries[key], entries.get(f"{module}.input_scale"))
                scales[f"{module}.weight"] = entries[key]
        entries = {k: e for k, e in entries.items() if not (k.endswith(_SCALES) and scheme.quantized(k.rsplit(".", 1)[0]))}
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    tied = model.config.tie_word_embeddings
    covered: dict[str, set] = {}
    out = []

    def cover(name: str, key: str, entry: TensorEntry, parts: set) -> None:
        if covered.setdefault(name, set()) & parts:
            raise CheckpointError(f"tensor {checkpoint_files.shown(key)} in {entry.file.name} gives weights that "
                                  f"another tensor of the checkpoint already gives")
        covered[name] |= parts

    for key in sorted(entries):
        entry = entries[key]
        m = _EXPERT_KEY.fullmatch(key)
        if m is None and key not in shapes:
            raise CheckpointError(f"unexpected tensor {checkpoint_files.shown(key)} in {entry.file.name}")
        if not entry.dtype.is_floating_point:
            raise CheckpointError(f"{key} in {entry.file.name} has dtype {_DTYPE_NAMES[entry.dtype]}; "
                                  f"weights are floating point (BF16, F16, F32, or F8_E4M3 with a weight_scale)")
        if scheme is not None and key.endswith(".weight") and scheme.quantized(key[:-7]) and key not in scales:
            raise CheckpointError(f"missing tensor {key[:-7]}.weight_scale (config.json's quantization_config "
                                  f"makes {checkpoint_files.shown(key)} float8)")
        if entry.dtype.itemsize == 1 and key not in scales:
            why = "config.json has no quantization_config to say how it is scaled" if scheme is None else \
                "config.json's quantization_config does not quantize it"
            raise CheckpointError(f"{key} in {entry.file.name} has dtype {_DTYPE_NAMES[entry.dtype]}, but {why}")
        if key == "lm_head.weight" and tied:
            # a tied head is the embedding; a saved copy of it is redundant, but must be one
            _check_shape(key, entry, shapes["model.embed_tokens.weight"])
            continue
        if m:
            base, e, proj = m.group(1), int(m.group(2)), m.group(3)
            name = f"{base}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
            if name not in shapes or e >= shapes[name][0]:
                raise CheckpointError(f"unexpected tensor {key} in {entry.file.name}")
            _, rows, cols = shapes[name]
            part = int(proj == "up_proj")
            if proj == "down_proj":
                want, index = (rows, cols), (e,)
            else:
                half = rows // 2
                want, index = (half, cols), (e, slice(part * half, (part + 1) * half))
            _check_shape(key, entry, want)
            cover(name, key, entry, {(e, part)})
            out.append(Step(name, entry, index, scales.get(key)))
            continue
        _check_shape(key, entry, shapes[key])
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            per_expert = (entry.end - entry.begin) // entry.shape[0]
            cover(key, key, entry, {(e, p) for e in range(entry.shape[0]) for p in (0, 1)})
            for e in range(entry.shape[0]):
                begin = entry.begin + e * per_expert
                out.append(Step(key, TensorEntry(entry.file, entry.dtype, entry.shape[1:], begin, begin + per_expert),
                                (e,)))
        else:
            cover(key, key, entry, {None})
            out.append(Step(key, entry, (), scales.get(key)))
    for name, shape in shapes.items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            want = {(e, p) for e in range(shape[0]) for p in ((0, 1) if name.endswith("gate_up_proj") else (0,))}
            lacking = sorted(want - covered.get(name, set()))
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


def read_entries(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint, from the headers of its safetensors files; a tensor given by two files,
    or one that the index puts in a file that lacks it, is refused."""
    listed = weight_map(directory) if os.path.lexists(directory / INDEX) else dict.fromkeys(weight_files(directory))
    entries: dict[str, TensorEntry] = {}
    for f, names in listed.items():
        header = read_header(f)
        if names is not None and not names <= header.keys():
            lost = min(names - header.keys())
            raise CheckpointError(f"{INDEX} puts tensor {checkpoint_files.shown(lost)} in {f.name}, "
                                  f"which does not hold it")
        for key, entry in header.items():
            if key in entries:
                raise CheckpointError(f"tensor {checkpoint_files.shown(key)} appears in both "
                                      f"{entries[key].file.name} and {f.name}")
            entries[key] = entry
    return entries


# What the weights say about a config key: (key, tensor name pattern, dimension, the key's value from the
# config's value); used to name the key when a config asks for more weights than the files hold.
_PROBES = [
    ("vocab_size", re.compile(r"model\.embed_tokens\.weight"), 0, lambda c: c.vocab_size),
    ("hidden_size", re.compile(r"model\.embed_tokens\.weight"), 1, lambda c: c.hidden_size),
    ("num_experts", re.compile(r".*\.feed_forward\.router\.weight"), 0, lambda c: c.num_experts),
    ("intermediate_size", re.compile(r".*\.feed_forward\.(experts\.[0-9]+\.)?down_proj\.weight"), 1,
     lambda c: c.intermediate_size),
    ("intermediate_size", re.compile(r".*\.feed_forward\.experts\.down_proj"), 2, lambda c: c.intermediate_size),
    ("mamba_expand", re.compile(r".*\.mamba\.A_log"), 0, lambda c: c.d_inner),
    ("mamba_d_state", re.compile(r".*\.mamba\.A_log"), 1, lambda c: c.mamba_d_state),
    ("mamba_d_conv", re.compile(r".*\.mamba\.conv1d\.weight"), 2, lambda c: c.mamba_d_conv),
    ("mamba_dt_rank", re.compile(r".*\.mamba\.dt_proj\.weight"), 1, lambda c: c.mamba_dt_rank),
]
_LAYER = re.compile(r"model\.layers\.(0|[1-9][0-9]*)\..*")


def check_sizes(config: JambaConfig, entries: dict[str, TensorEntry], source: str) -> None:
    """Hold the config's sizes against what the safetensors headers hold, before anything is built: a config
    that asks for more weights than the files hold is refused, naming the key where the weights tell which,
    so that a few bytes of config.json (`num_hidden_layers: 10000000`) cannot make the loader build or loop
    over more than the files are worth. A small shortfall goes on to `plan`, which names the missing tensor."""
    held = sum(math.prod(e.shape) for e in entries.values())
    wanted = config.param_count()
    if wanted <= held:
        return
    layers = {_LAYER.fullmatch(k).group(1) for k in entries if _LAYER.fullmatch(k)}
    if config.num_hidden_layers > len(layers):
        raise ConfigError(f"{source}: key 'num_hidden_layers' is {config.num_hidden_layers} but the weights "
                          f"hold {len(layers)} layers")
    for key, pattern, dim, expected in _PROBES:
        seen = {k: e for k, e in entries.items() if pattern.fullmatch(k) and len(e.shape) > dim}
        sizes = {e.shape[dim] for e in seen.values()}
        if len(sizes) == 1 and sizes != {expected(config)}:  # the weights agree among themselves, not with it
            name = min(seen)
            raise ConfigError(f"{source}: key {key!r} is {getattr(config, key)} but {name} in "
                              f"{seen[name].file.name} has shape {list(seen[name].shape)}")
    if wanted > 2 * held:
        raise ConfigError(f"{source}: its sizes describe {wanted:,} weights but the safetensors files hold "
                          f"{held:,}")


def fp8_scheme(config_path: Path):
    """The compressed-tensors FP8 scheme of config.json (compressed_tensors.FP8Scheme), or None when it
    has no quantization_config; that module is imported only then."""
    raw = checkpoint_files.read_json(config_path, ConfigError)
    if "quantization_config" not in raw:
        return None
    from . import compressed_tensors

    return compressed_tensors.scheme_from_config(raw, str(config_path))


def checkpoint_quantization(model: JambaForCausalLM, scheme,
                            asked: _quant.QuantConfig | None) -> _quant.QuantConfig | None:
    """What an FP8 checkpoint's modules become. With no quantization asked for: our 8-bit layers for the
    modules it holds in float8 (float8 where the GPU has it, else int8; widened on the CPU, with a note).
    With our 8-bit layers asked for: those same modules, in the format asked. Otherwise (bitsandbytes) the
    float8 weights are widened as they load and quantized as asked."""
    if asked is not None and (asked.backend == "bitsandbytes" or asked.bits == 4):
        return asked

    def on_disk(name: str, module) -> list[str]:  # the checkpoint's Linear modules behind one of ours
        if isinstance(module, Experts):
            return [f"{name}.{e}.{p}" for e in range(module.gate_up_proj.shape[0])
                    for p in ("gate_proj", "up_proj", "down_proj")]
        return [name]

    only = frozenset(name for name, module in model.named_modules() if isinstance(module, (Experts, Linear))
                     and all(scheme.quantized(n) for n in on_disk(name, module)))
    return dataclasses.replace(asked or _quant.QuantConfig(8, from_checkpoint=True), only=only, backend="ours")


def _note_fp8(directory: Path, qc: _quant.QuantConfig | None) -> None:
    """One line on stderr when an FP8 checkpoint's weights do not load as float8."""
    if qc is None:
        how = "widened to the model's dtype (the CPU has no float8 kernels)"
    elif qc.format == "fp8":
        return
    elif qc.ours:
        how = f"requantized to {qc.format}"
    else:
        how = "widened, then quantized by bitsandbytes"
    print(f"note: {directory.name} holds float8 weights; they are {how} as they load", file=sys.stderr)


def load_model(directory: Path, *, progress: Progress | None = None, **placement) -> JambaForCausalLM:
    """The model in `directory`, placed as `place(**placement)` decides, its weights streamed shard by shard."""
    config_path = checkpoint_files.check_file(directory / "config.json", directory)
    config = JambaConfig.from_file(config_path)
    scheme = fp8_scheme(config_path)
    entries = read_entries(directory)
    check_sizes(config, entries, str(config_path))  # before the model is built: its size is the config's
    with torch.device("meta"), _no_init():
        model = JambaForCausalLM(config)
    steps = plan(model, entries, scheme)  # raises before any memory is spent
    if scheme is not None:
        placement["quant_config"] = checkpoint_quantization(model, scheme, placement.get("quant_config"))
    placer = None
    try:
        with offload.cleanup_on_signals():
            placer = place(model, **placement)
            if scheme is not None:
                _note_fp8(directory, placer.quant_config)
            placer.allocate()
            total = sum(s.entry.end - s.entry.begin for s in steps)
            done = 0
            by_file: dict[Path, list[Step]] = {}
            for step in steps:
                by_file.setdefault(step.entry.file, []).append(step)
            for path, file_steps in by_file.items():
                with checkpoint_files.open_regular(path) as f:
                    for step in sorted(file_steps, key=lambda s: s.entry.begin):
                        if step.scale is not None:
                            _read_fp8(f, step, placer)
                        else:
                            dest = placer.target(step.name, step.index)
                            _read_into(f, step.entry, dest)
                            placer.written(step.name, step.index, dest.numel())
                        done += step.entry.end - step.entry.begin
                        if progress:
                            progress(done, total)
            return placer.finish()
    finally:
        if placer is not None:
            placer.close()  # a no-op after finish; on an error or a signal, the offload folder goes


def _read_fp8(f, step: Step, placer) -> None:
    """A float8 weight and its scale: read as they are into a float8 module, else widened (weight · scale)
    into the parameter's dtype (and quantized from there if its module is quantized otherwise)."""
    from .compressed_tensors import to_row_scale

    scale = torch.empty(step.scale.shape, dtype=step.scale.dtype)
    with checkpoint_files.open_regular(step.scale.file) as g:  # (it may sit in another shard)
        _read_into(g, step.scale, scale)
    rows = step.entry.shape[0]
    scale = to_row_scale(scale, rows)
    direct = placer.target8(step.name, step.index)
    if direct is not None:
        weight, row_scale = direct
        _read_into(f, step.entry, weight)
        row_scale.copy_(scale)
        return
    raw = torch.empty(step.entry.shape, dtype=step.entry.dtype)
    _read_into(f, step.entry, raw)
    dest = placer.target(step.name, step.index)
    dest.copy_((raw.float() * scale[:, None]).view(dest.shape))
    placer.written(step.name, step.index, dest.numel())


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


def quant_config(load_in_8bit: bool = False, load_in_4bit: bool = False,
                 int8_skip: tuple[str, ...] | str = INT8_SKIP, int8_threshold: float = INT8_THRESHOLD,
                 quant: str | None = None, int8_backend: str = "auto") -> _quant.QuantConfig | None:
    """The quantization that `load` applies for these arguments (see there), or None. Where "auto" goes
    is settled once the device is known (`QuantConfig.resolved`).

    Raises:
        UsageError: both 8-bit and 4-bit, a negative threshold, an unknown `quant` or `int8_backend`.
        DependencyError: bitsandbytes is asked for and not installed.
    """
    if load_in_8bit and load_in_4bit:
        raise UsageError("`load_in_8bit` and `load_in_4bit` exclude each other")
    if quant is not None and load_in_4bit:
        raise UsageError(f"`quant` {quant} is 8-bit; it excludes `load_in_4bit`")
    if not (load_in_8bit or load_in_4bit or quant is not None):
        if int8_backend != "auto":
            raise UsageError(f"`int8_backend` {int8_backend} applies to `load_in_8bit`, which is not set")
        return None
    skip = _quant.parse_skip(int8_skip) if isinstance(int8_skip, str) else tuple(int8_skip)
    config = _quant.QuantConfig(4 if load_in_4bit else 8, skip, int8_threshold, int8_backend, quant)
    if config.bits == 4 or config.backend == "bitsandbytes" or (config.backend == "auto" and config.format is None
                                                               and not torch.cuda.is_available()):
        _quant.require_bnb()  # now, before a model is downloaded (auto is bitsandbytes without CUDA)
    return config


def load(path_or_repo: str | os.PathLike | None = None, *, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None, revision: str | None = None,
         progress: Progress | None = None, device_map: str | dict | os.PathLike | None = None,
         max_memory: dict | str | None = None, offload_folder: str | os.PathLike | None = None,
         load_in_8bit: bool = False, load_in_4bit: bool = False, int8_skip: tuple[str, ...] | str = INT8_SKIP,
         int8_threshold: float = INT8_THRESHOLD, quant: str | None = None, int8_backend: str = "auto",
         kernels: KernelOptions | str | None = None) -> tuple[JambaForCausalLM, Tokenizer]:
    """Load a Jamba model and its tokenizer.

    Args:
        path_or_repo: a checkpoint directory, or a Hub repo id already in the local HF cache;
            None for the bundled model (`bundled_model_dir()`).
        dtype: torch dtype or one of bf16/fp16/fp32; default bf16 on GPU, fp32 on CPU when it fits.
        device: where the weights go; default cuda when available, else cpu. Or give a device_map:
        device_map: "auto"/"balanced" (spread evenly over the GPUs, then CPU, then disk), "balanced_low_0"
            (spare GPU 0), "sequential" (fill GPU 0 first), a device ("cpu", "cuda:1"), a dict of module name
            -> device (GPU index, "cuda:N", "cpu", "disk") or the path of a JSON file holding one.
            Modules on "cpu" or "disk" run on the CPU; each layer's cache lives on its layer's device.
        max_memory: per-device budget for the automatic maps, {0: "70GiB", "cpu": "200GiB"} or the string
            "0=70GiB,cpu=200GiB"; implies device_map="auto" when no map is given.
        offload_folder: where "disk" weights are kept (memory-mapped, in full precision).
        load_in_8bit: 8-bit weights for the linear layers and experts, quantized as they stream in. On CUDA
            our layers (weight-only, one scale per output row, the decode step a CUDA graph): float8 (e4m3)
            on GPUs that have it (compute capability 8.9+: Ada, Hopper), int8 elsewhere; on the CPU
            bitsandbytes' LLM.int8. `int8_skip` names the modules kept in full precision (Mamba mixers,
            routers and lm_head by default).
        quant: "int8" or "fp8": our 8-bit layers in that format, wherever the model runs (implies
            `load_in_8bit`).
        int8_backend: "auto" (as above), "ours" or "bitsandbytes" (LLM.int8 everywhere; `int8_threshold` is
            its outlier threshold).
        load_in_4bit: bitsandbytes' nf4 weights, with the same skip list.
        progress: called with (bytes loaded, total bytes) as the weights stream in.
        kernels: the kernel choices the model runs with (`kernels.KernelOptions`, or "auto"/"torch" for
            its backend); default: the active ones (`kernels.using`).

    Returns:
        (model, tokenizer). Raises a JambaError subclass with a one-line message: UsageError (or its
        DeviceMapError) for arguments that cannot work together, CheckpointError or ConfigError for files.
    """
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise UsageError(f"unknown `dtype` {dtype!r}; use bf16, fp16 or fp32")
        dtype = DTYPE_NAMES[dtype.lower()]
    quantization = quant_config(load_in_8bit, load_in_4bit, int8_skip, int8_threshold, quant, int8_backend)
    directory = bundled_model_dir() if path_or_repo is None else resolve(path_or_repo, revision)
    if directory is None:
        raise CheckpointError("this build of jamba-cli ships no model: give a checkpoint directory or repo id")
    if not (directory / "config.json").exists():
        raise CheckpointError(f"no config.json in {directory}")
    tokenizer = load_tokenizer(directory)
    config = JambaConfig.from_file(checkpoint_files.check_file(directory / "config.json", directory))
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer.json in {directory} has {tokenizer.vocab_size} tokens but config.json's "
                              f"vocab_size is {config.vocab_size}: the ones past it have no embedding")
    if isinstance(kernels, str):
        try:
            kernels = KernelOptions(backend=kernels)
        except ValueError as e:
            raise UsageError(str(e)) from None
    model = load_model(directory, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                       offload_folder=offload_folder, quant_config=quantization, progress=progress)
    model.kernel_options = kernels
    return model, tokenizer
