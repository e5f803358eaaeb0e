"""Device maps and memory budgets: which device each parameter of a (meta-device) model goes to.

A device map is a dict of module or parameter name ("" = the whole model) -> device, as accelerate and
transformers write it: `{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 7}`. A parameter
goes where the longest key that is a prefix of its name says. Devices are GPU indices, "cuda:N", "cpu"
or "disk". The automatic maps come from accelerate's `infer_auto_device_map`; every map is checked here
so that a wrong one fails in one line before any memory is spent.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import DeviceMapError
from .terminal import format_bytes

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
NO_SPLIT = ["DecoderLayer"]  # a layer's residual stream stays on one device; the forward moves it between layers
DeviceMap = dict[str, str]
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_max_memory(text: str) -> dict[int | str, int]:
    """'0=70GiB,1=80GiB,cpu=200GiB' (`max_memory` as a string) -> {0: bytes, 1: bytes, 'cpu': bytes}."""
    out = {}
    for item in (s.strip() for s in text.split(",")):
        key, sep, size = item.partition("=")
        if not sep or not key.strip() or not size.strip():
            raise DeviceMapError(f"`max_memory` entry {item!r} is not DEVICE=SIZE (e.g. 0=70GiB,cpu=200GiB)")
        out[key.strip().lower()] = size.strip()
    return budget_bytes(out)


def budget_bytes(budget: dict) -> dict[int | str, int]:
    """A max-memory dict with device keys (0, 'cuda:1', 'cpu', 'disk') and sizes (bytes or '70GiB') in the
    form accelerate takes: GPU indices and byte counts."""
    out = {}
    for key, size in budget.items():
        device = device_name(key, "`max_memory`")
        m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?", str(size).strip().lower())
        if isinstance(size, bool) or not m:
            raise DeviceMapError(f"`max_memory` size {size!r} for {device} is not a size like 70GiB or 500MB")
        out[int(device[5:]) if device.startswith("cuda:") else device] = \
            int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    return out


def device_name(value, what: str) -> str:
    """A device map value (GPU index, 'cuda:1', 'cpu', 'disk', ...) as the name of a device that exists here."""
    if value == "disk":
        return "disk"
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    try:
        if isinstance(value, bool):
            raise TypeError
        device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceMapError(f"{what}: {value!r} is not a device (use a GPU index, cuda:N, cpu or disk)") from None
    if device.type == "cuda":
        n, i = torch.cuda.device_count(), device.index or 0
        if i >= n:
            seen = "no GPU is visible" if n == 0 else f"only cuda:0 to cuda:{n - 1} are visible"
            raise DeviceMapError(f"{what}: there is no cuda:{i} ({seen})")
        return f"cuda:{i}"
    if device.type == "meta" or (device.type == "mps" and not torch.backends.mps.is_available()):
        raise DeviceMapError(f"{what}: device {device.type} is not available here")
    return str(device)


def explicit(model: nn.Module, device_map, what: str = "`device_map`") -> DeviceMap:
    """A device, a dict, or the path of a JSON file holding one, checked against the model's module names;
    `what` names the argument it came from in an error."""
    if isinstance(device_map, (str, os.PathLike)) and (str(device_map).endswith(".json") or Path(device_map).is_file()):
        device_map = _read_json(Path(device_map))
    if not isinstance(device_map, dict):
        return {"": device_name(device_map, what)}
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    n_layers = model.config.num_hidden_layers
    out = {}
    for key, value in device_map.items():
        if key not in names:
            m = re.fullmatch(r"model\.layers\.(\d+)(\..*)?", str(key))
            hint = f" (it has {n_layers} layers, model.layers.0 to model.layers.{n_layers - 1})" \
                if m and int(m.group(1)) >= n_layers else ""
            raise DeviceMapError(f"device map names {key!r}, which is not a module of this model{hint}")
        out[key] = device_name(value, f"device map entry {key!r}")
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise DeviceMapError(f"cannot read device map {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeviceMapError(f"device map {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DeviceMapError(f"device map {path} must hold a JSON object of module name -> device")
    return data


def automatic(model: nn.Module, kind: str, budget: dict | None, dtype: torch.dtype, special: dict) -> DeviceMap:
    """accelerate's map for `kind` (one of AUTO_MAPS): GPUs first, then the CPU, then "disk" for the rest.

    `special` gives the storage type of the weights that will be quantized, so that they are sized as such.
    """
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    budget = dict(budget) if budget else None
    if kind != "sequential":
        budget = get_balanced_memory(model, budget, no_split_module_classes=NO_SPLIT, dtype=dtype,
                                     special_dtypes=special, low_zero=kind == "balanced_low_0")
    found = infer_auto_device_map(model, budget, no_split_module_classes=NO_SPLIT, dtype=dtype,
                                  special_dtypes=special)
    return {key: device_name(value, "device map") for key, value in found.items()}


def assign(model: nn.Module, device_map: DeviceMap) -> dict[str, str]:
    """Parameter name -> device. Raises if a parameter is left unmapped or a decoder layer is split."""
    out = {}
    for name, _ in model.named_parameters():
        prefixes = [".".join(name.split(".")[:k]) for k in range(name.count(".") + 2)]  # "", "model", ...
        owner = next((p for p in reversed(prefixes) if p in device_map), None)
        if owner is None:
            top = next(p for p in prefixes[1:] if not any(k == p or k.startswith(p + ".") for k in device_map))
            raise DeviceMapError(f"device map leaves {top} unmapped; give it a device")
        out[name] = device_map[owner]
    for i in range(model.config.num_hidden_layers):
        where = sorted({d for n, d in out.items() if n.startswith(f"model.layers.{i}.")})
        if len(where) > 1:
            raise DeviceMapError(f"device map splits model.layers.{i} over {' and '.join(where)}; "
                                 f"give each layer one device")
    return out


def check_budget(sizes: dict[str, float], where: dict[str, str], budget: dict | None, offload_folder,
                 automatic: bool) -> None:
    """Raise if weights land on disk with no offload folder, or a device gets more than its budget."""
    need: dict[str, float] = {}
    for name, device in where.items():
        need[device] = need.get(device, 0) + sizes[name]
    if "disk" in need and offload_folder is None:
        if not automatic:
            raise DeviceMapError("the device map sends weights to disk: pass `offload_folder`")
        allowed = "the free memory" if budget is None else "`max_memory` (" + ", ".join(
            f"{device_name(k, '`max_memory`')} {_gib(v)}" for k, v in budget.items()) + ")"
        raise DeviceMapError(f"not enough memory: the weights need {_gib(sum(sizes.values()))} and "
                             f"{_gib(need['disk'])} of them do not fit in {allowed}; raise it, quantize, "
                             f"or pass `offload_folder`")
    for key, allowed in (budget or {}).items():
        device = device_name(key, "`max_memory`")
        if need.get(device, 0) > allowed:
            raise DeviceMapError(f"not enough memory: the device map puts {_gib(need[device])} of weights "
                                 f"on {device} but `max_memory` allows {_gib(allowed)} there")


def _gib(n: float) -> str:
    return format_bytes(n, binary=True)  # in the units budgets are usually written in (70GiB)
