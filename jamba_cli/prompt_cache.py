"""Prompt cache files: the hybrid cache (attention K/V and Mamba conv/SSM state) after a prompt, saved so a
later prompt that starts with the same tokens computes only the rest.

A file is a safetensors file: `tokens` (the ids the state has seen), per layer `{i}.k`/`{i}.v` (only the
used positions) or `{i}.conv`/`{i}.ssm`, and metadata naming the format, the model fingerprint and dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .cache import AttnCache, HybridCache
from .errors import PromptCacheError
from .model import JambaForCausalLM

FORMAT = "jamba-prompt-cache/1"


def fingerprint(model: JambaForCausalLM) -> str:
    """A hash of the config and of a sample of every weight: two checkpoints with equal shapes still differ."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:8], flat[-8:]]).float().cpu() if flat.numel() else flat.float().cpu()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def save(path: Path, model: JambaForCausalLM, cache: HybridCache, tokens: list[int]) -> None:
    """Write the state of a one-sequence `cache`, which has seen exactly `tokens`, to `path` (atomically)."""
    from safetensors.torch import save_file

    if cache.batch_size != 1 or cache.offset != len(tokens) or cache.key_mask is not None:
        raise ValueError("a prompt cache holds one unpadded sequence whose tokens are all given")
    tensors = {"tokens": torch.tensor(tokens, dtype=torch.int64)}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, AttnCache):
            tensors[f"{i}.k"] = layer.k[:, :, :cache.offset].contiguous().cpu()
            tensors[f"{i}.v"] = layer.v[:, :, :cache.offset].contiguous().cpu()
        else:
            tensors[f"{i}.conv"] = layer.conv.contiguous().cpu()
            tensors[f"{i}.ssm"] = layer.ssm.contiguous().cpu()
    meta = {"format": FORMAT, "fingerprint": fingerprint(model), "dtype": _dtype_name(model.dtype)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except Exception as e:  # OSError, or safetensors' own error wrapping one
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise PromptCacheError(f"cannot write prompt cache {path}: {reason}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _read(path: Path, model: JambaForCausalLM) -> tuple[dict[str, torch.Tensor], list[int]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise PromptCacheError(f"{path} is not a jamba prompt cache file")
            if meta.get("dtype") != _dtype_name(model.dtype):
                raise PromptCacheError(f"{path} was made with dtype {meta.get('dtype')} but the model runs in "
                                       f"{_dtype_name(model.dtype)}; use another file or set `dtype` to {meta.get('dtype')}")
            if meta.get("fingerprint") != fingerprint(model):
                raise PromptCacheError(f"{path} was made by another model; use another file or delete it")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            return tensors, tensors["tokens"].tolist()
    except PromptCacheError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise PromptCacheError(f"cannot read prompt cache {path}: {str(e).splitlines()[0]}") from None


def _fill(path: Path, cache: HybridCache, tensors: dict[str, torch.Tensor], n: int) -> None:
    """Copy the saved state of `n` positions into an empty `cache`."""
    if cache.static and n > cache.capacity:
        raise PromptCacheError(f"prompt cache {path} holds {n} tokens, more than the context ({cache.capacity})")
    cache.reserve(n)
    try:
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, AttnCache):
                layer.k[:, :, :n].copy_(tensors[f"{i}.k"])
                layer.v[:, :, :n].copy_(tensors[f"{i}.v"])
            else:
                layer.conv.copy_(tensors[f"{i}.conv"])
                layer.ssm.copy_(tensors[f"{i}.ssm"])
    except (KeyError, RuntimeError):
        raise PromptCacheError(f"prompt cache {path} is corrupt") from None
    cache.seek(n)


def load(path: Path, model: JambaForCausalLM, cache: HybridCache) -> list[int]:
    """Put the state of a prompt cache file made by this model in this dtype into `cache` (emptied first,
    its buffers kept); returns the tokens that state has seen.

    Raises:
        PromptCacheError: the file is unreadable, was made by another model or dtype, or holds more tokens
            than the static `cache` has room for.
    """
    tensors, tokens = _read(path, model)
    cache.reset()
    _fill(path, cache, tensors, len(tokens))
    return tokens


def restore(path: Path, model: JambaForCausalLM, ids: list[int], cache: HybridCache) -> int:
    """Load the state saved in `path` into the empty `cache` when its tokens begin `ids` and leave at
    least one token to feed; returns how many tokens of `ids` the cache then holds (0: nothing reused)."""
    if not path.exists():
        return 0
    tensors, tokens = _read(path, model)
    if not (len(tokens) < len(ids) and ids[:len(tokens)] == tokens):
        return 0
    _fill(path, cache, tensors, len(tokens))
    return len(tokens)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
