"""The header of a safetensors file from an untrusted checkpoint: which tensors it holds, of which dtype and
shape, at which bytes, validated at least as strictly as the safetensors library (which parses it too)."""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint_files
from .errors import CheckpointError

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclass
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate a safetensors header, as strictly as the safetensors library does and more: every
    entry has a known dtype, a shape of non-negative integers and integer offsets that hold exactly its bytes;
    the tensors tile the data section from its first byte to the end of the file, with no overlap, alias or
    gap; no key is given twice. Each refusal is one line naming the file and the tensor.

    The checks are our own, so that a message can name the tensor (the library's often gives a JSON column);
    the library then parses the same header too (`_library_check`), so that nothing it refuses loads here."""
    with checkpoint_files.open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path.name} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", _read_exactly(f, 8, path))
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path.name} is corrupt or truncated (header length {n} > file size {size})")
        text = _read_exactly(f, n, path)
    what = f"{path.name} is corrupt: its safetensors header"
    try:
        header = checkpoint_files.parse_json(text.decode("utf-8"), what)
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} is not valid JSON (not UTF-8)") from None
    data_size = size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{path.name} is corrupt: its __metadata__ must map strings to strings")
            continue
        label = checkpoint_files.shown(name)
        if not isinstance(info, dict):
            raise CheckpointError(f"{path.name} is corrupt: the header entry for {label} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{path.name} is corrupt: {label} has dtype {checkpoint_files.value(dtype)}; "
                                  f"known: {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise CheckpointError(f"{path.name} is corrupt: {label} has shape {checkpoint_files.value(shape)}, "
                                  f"not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise CheckpointError(f"{path.name} is corrupt: {label} has data_offsets "
                                  f"{checkpoint_files.value(offsets)}, not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        numel = math.prod(shape)
        if end - begin != numel * _DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path.name} is corrupt: {label} has {end - begin} bytes for shape {shape}")
        if end > data_size:
            raise CheckpointError(f"{path.name} is truncated: {label} ends at byte {8 + n + end} "
                                  f"but the file has {size}")
        entries[name] = TensorEntry(path, _DTYPES[dtype], tuple(shape), 8 + n + begin, 8 + n + end)
    # the tensors must tile the data section, in offset order, as the library requires
    at, before = 8 + n, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != at:
            problem = f"overlaps {checkpoint_files.shown(before)}" if entry.begin < at else \
                f"starts {entry.begin - at} bytes after the end of the tensor before it"
            raise CheckpointError(f"{path.name} is corrupt: the bytes of {checkpoint_files.shown(name)} {problem}")
        at, before = entry.end, name
    if at != size:
        after = f", after {checkpoint_files.shown(before)}," if before is not None else ""
        raise CheckpointError(f"{path.name} is corrupt: its last {size - at} bytes{after} belong to no tensor")
    _library_check(path, entries)
    return entries


def _library_check(path: Path, entries: dict[str, TensorEntry]) -> None:
    """The safetensors library parses the header too and must agree with us tensor for tensor: whatever it
    refuses is refused, and no header can mean one thing to it and another to us. It memory-maps the file
    and reads only the header, so this costs neither time nor memory (benchmarks/bench_load.py)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            theirs = {k: f.get_slice(k) for k in f.keys()}
            same = theirs.keys() == entries.keys() and all(
                s.get_dtype() == _DTYPE_NAMES[entries[k].dtype] and tuple(s.get_shape()) == entries[k].shape
                for k, s in theirs.items())
    except Exception as e:  # SafetensorError, mostly; whatever else it raises on this file is a refusal too
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path.name} is corrupt: {checkpoint_files.shown(detail)}") from None
    if not same:
        raise CheckpointError(f"{path.name} is corrupt: the safetensors library reads its header differently")


def _read_exactly(f, n: int, path: Path) -> bytes:
    data = bytearray()
    try:
        while len(data) < n:
            chunk = f.read(n - len(data))
            if not chunk:
                raise CheckpointError(f"{path.name} is truncated")
            data += chunk
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    return bytes(data)


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
