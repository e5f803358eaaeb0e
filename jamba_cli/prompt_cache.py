"""Prompt cache files: the hybrid cache after a prompt, saved so that a later prompt sharing its first tokens
computes only the rest.

A file is a safetensors file. `tokens` (n,) lists the ids the state has seen; attention layer i keeps
`{i}.k`/`{i}.v` (1, G, n, Dh), and since a K/V cache can be cut at any position, any prefix of those can be
reused. A Mamba state summarises every token before it and cannot be cut, so Mamba layer i keeps its state
at each of the S positions listed in `positions` (S,): `{i}.conv` (S, E, K-1) and `{i}.ssm` (S, E, N). The
positions are the ends of the prompt's parts (a document, then a question), every `EVERY` tokens, and n.
A later prompt restores the largest saved position within the tokens it shares with the file.

The metadata names the format, the model's `fingerprint` and the dtype. A file is untrusted input: its
header size, every tensor's name, dtype and shape, its token count against its own tensors and the
context, and the token ids are checked before anything is allocated for it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PromptCacheError, UsageError
from .files import NotRegularFile, file_kind, open_regular, remove_stale_temporaries, temporary_name
from .fingerprint import fingerprint

if TYPE_CHECKING:
    import torch

    from .cache import HybridCache
    from .model import JambaForCausalLM

# torch is imported where a function needs it: the checks on where a file may be written run in the CLI
# before the model loads, and refuse a bad path without the seconds torch's import takes

FORMAT = "jamba-prompt-cache/2"
# tokens between the Mamba states kept inside a long part: in Jamba Mini one state (all Mamba layers) has the
# bytes of ~1K tokens of K/V, so they add at most about a quarter to a file, and prefill chunks stay long
EVERY = 4096

_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64"}


# -- where a file may be written --

def check_target(path: str | os.PathLike, *, name: str = "`prompt_cache`", replace_foreign: bool = False) -> Path:
    """Check, before any work is done, that a file can be written at `path`: nothing is there, or a regular
    file (not a link, pipe, device, socket or directory) that is a prompt cache (any regular file with
    `replace_foreign`), in an existing directory we may write to. `name` is how messages call the file.

    Raises:
        UsageError: `path` is a directory, a symbolic link or not a regular file.
        PromptCacheError: the directory cannot be written, or `path` holds a file that is not a prompt cache.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise PromptCacheError(f"cannot write {_plain(name)} {path}: {getattr(e, 'strerror', None) or e}") from None
    if st is not None:
        kind = file_kind(st.st_mode)
        if kind == "directory":
            raise UsageError(f"{name} {path} is a directory; give a file name")
        if kind is not None:
            raise UsageError(f"{name} {path} is a {kind}; only regular files are written")
        if st.st_size and not replace_foreign and not _looks_like_cache(path):
            raise PromptCacheError(f"{path} exists and is not a jamba prompt cache; not overwriting it "
                                   f"(remove it or give another {_plain(name)} file)")
    parent = path.parent
    if not parent.is_dir():
        raise PromptCacheError(f"cannot write {_plain(name)} {path}: "
                               f"{'Not a directory' if parent.exists() else 'No such file or directory'}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PromptCacheError(f"cannot write {_plain(name)} {path}: Permission denied")
    return path


def _plain(name: str) -> str:
    return "prompt cache" if name == "`prompt_cache`" else name.strip("`")


def _looks_like_cache(path: Path) -> bool:
    """Whether the regular file at `path` starts with a prompt cache's header (of any version, whole or cut
    short); reads at most 64 KB."""
    try:
        with os.fdopen(open_regular(path, follow=False), "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head[8:9] == b"{" and b'"jamba-prompt-cache/' in head


def _metadata(path: Path, limit: int) -> dict:
    """The `__metadata__` of a safetensors file (`open_regular`: a pipe or a device is never read).

    Raises:
        ValueError: not a regular file with a safetensors header of at most `limit` bytes.
    """
    try:
        fd = open_regular(path)
    except NotRegularFile:
        raise ValueError("not a regular file") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("too short")
        (n,) = struct.unpack("<Q", raw)
        if n > limit:
            raise ValueError(f"header of {n} bytes")
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


# -- writing: a private regular file, replaced atomically --

def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, name: str = "`prompt_cache`",
                 replace_foreign: bool = False) -> None:
    """Write a file with mode 0600 at `path` through `write(temporary path)`, then move it into place in one
    step: a reader never sees half a file, and a failure leaves the old one. `path` is checked first as
    `check_target` does; stale temporaries of dead processes in its directory are removed.

    Raises:
        UsageError, PromptCacheError: as `check_target`, or the file cannot be written (the reason given).
    """
    path = check_target(path, name=name, replace_foreign=replace_foreign)
    remove_stale_temporaries(path.parent)
    tmp = temporary_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except Exception as e:  # OSError, or safetensors' own error wrapping one
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise PromptCacheError(f"cannot write {_plain(name)} {path}: {reason}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:  # gone: moved into place (or never made)
            pass


# -- saving --

MambaState = tuple  # (conv (1, E, K-1), ssm (1, E, N)) of one Mamba layer, CPU tensors


def mamba_states(cache: HybridCache) -> list[MambaState]:
    """CPU copies of the Mamba states of a one-sequence `cache` now (what `save` keeps at a position)."""
    from .cache import MambaCache

    return [(layer.conv.detach().to("cpu", copy=True), layer.ssm.detach().to("cpu", copy=True))
            for layer in cache.layers if isinstance(layer, MambaCache)]


def save(path: str | os.PathLike, model: JambaForCausalLM, cache: HybridCache, tokens: list[int],
         states: dict[int, list[MambaState]] | None = None, *, replace_foreign: bool = False) -> None:
    """Write the state of a one-sequence `cache`, which has seen exactly `tokens`, to `path` (atomically,
    mode 0600; see `atomic_write`), with the Mamba `states` (from `mamba_states`) taken at earlier positions.
    A regular file at `path` that is no prompt cache is replaced only with `replace_foreign`.

    Raises:
        UsageError, PromptCacheError: `path` is no place for a prompt cache, or cannot be written.
    """
    import torch
    from safetensors.torch import save_file

    from .cache import AttnCache

    n = len(tokens)
    if cache.batch_size != 1 or cache.offset != n or cache.key_mask is not None or n == 0:
        raise ValueError("a prompt cache holds one unpadded sequence whose tokens are all given")
    earlier = sorted(p for p in (states or {}) if 0 < p < n)
    at_end = mamba_states(cache)
    tensors = {"tokens": torch.tensor(tokens, dtype=torch.int64),
               "positions": torch.tensor([*earlier, n], dtype=torch.int64)}
    m = 0
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, AttnCache):
            tensors[f"{i}.k"] = layer.k[:, :, :n].contiguous().cpu()
            tensors[f"{i}.v"] = layer.v[:, :, :n].contiguous().cpu()
        else:
            kept = [states[p][m] for p in earlier] + [at_end[m]]
            tensors[f"{i}.conv"] = torch.cat([conv for conv, _ in kept])
            tensors[f"{i}.ssm"] = torch.cat([ssm for _, ssm in kept])
            m += 1
    meta = {"format": FORMAT, "fingerprint": fingerprint(model), "dtype": _dtype_name(model.dtype)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), replace_foreign=replace_foreign)


# -- reading: everything checked before anything is allocated --

@dataclass
class Reused:
    """What `restore` put in the cache: `length` tokens of the prompt, and the Mamba states the file held at
    positions up to there (still valid for the prompt, so a new file keeps them)."""

    length: int = 0
    states: dict[int, list[MambaState]] = field(default_factory=dict)


class _File:
    """An open prompt cache file whose metadata, tensor names, dtypes, shapes and values were checked."""

    def __init__(self, handle, path: Path, tokens: list[int], positions: list[int]):
        self.handle, self.path, self.tokens, self.positions = handle, path, tokens, positions

    def fill(self, cache: HybridCache, length: int, slot: int) -> None:
        """Put the state after `length` tokens (the saved position number `slot`) into the empty `cache`."""
        from .cache import AttnCache

        cache.reset()
        cache.reserve(length)
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, AttnCache):
                layer.k[:, :, :length].copy_(self.handle.get_slice(f"{i}.k")[:, :, :length])
                layer.v[:, :, :length].copy_(self.handle.get_slice(f"{i}.v")[:, :, :length])
            else:
                layer.conv.copy_(self.handle.get_slice(f"{i}.conv")[slot:slot + 1])
                layer.ssm.copy_(self.handle.get_slice(f"{i}.ssm")[slot:slot + 1])
        cache.seek(length)

    def states(self, cache: HybridCache, slots: range) -> dict[int, list[MambaState]]:
        from .cache import MambaCache

        mamba = [i for i, layer in enumerate(cache.layers) if isinstance(layer, MambaCache)]
        return {self.positions[s]: [(self.handle.get_slice(f"{i}.conv")[s:s + 1],
                                     self.handle.get_slice(f"{i}.ssm")[s:s + 1]) for i in mamba] for s in slots}


def _open(path: Path, model: JambaForCausalLM, cache: HybridCache, context_size: int | None, use):
    """Open and check the prompt cache at `path` for `model`, then return `use(_File)`.

    Raises:
        PromptCacheError: anything about the file that does not fit this model and context (one line naming
            the file, and the tensor where one is at fault).
    """
    from safetensors import safe_open

    from .cache import AttnCache

    config = model.config
    context = context_size or (cache.capacity if cache.static else config.max_position_embeddings)
    names = [(f"{i}.k", f"{i}.v") if isinstance(layer, AttnCache) else (f"{i}.conv", f"{i}.ssm")
             for i, layer in enumerate(cache.layers)]
    limit = 4096 + 256 * (2 + 2 * len(names))  # a header with room for the expected tensors, no more
    try:
        meta = _metadata(path, limit)
    except OSError as e:
        raise PromptCacheError(f"cannot read prompt cache {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # (a JSON nested thousands deep)
        raise PromptCacheError(f"{path} is not a jamba prompt cache file ({str(e).splitlines()[0]})") from None
    fmt = str(meta.get("format", ""))
    if fmt != FORMAT:
        if fmt.startswith("jamba-prompt-cache/"):
            raise PromptCacheError(f"{path} was made by another version of jamba-cli ({_shown(fmt)}); delete it")
        raise PromptCacheError(f"{path} is not a jamba prompt cache file")
    if meta.get("dtype") != _dtype_name(model.dtype):
        made = _shown(meta.get("dtype"))
        raise PromptCacheError(f"{path} was made with dtype {made} but the model runs in "
                               f"{_dtype_name(model.dtype)}; use another file or set `dtype` to {made}")
    if meta.get("fingerprint") != fingerprint(model):
        raise PromptCacheError(f"{path} was made by another model; use another file or delete it")
    try:
        with safe_open(str(path), framework="pt") as f:
            return use(_checked(f, path, model, names, context))
    except PromptCacheError:
        raise
    except Exception as e:  # safetensors' own errors: offsets outside the file, overlapping tensors, ...
        raise PromptCacheError(f"cannot read prompt cache {path}: {str(e).splitlines()[0]}") from None


def _checked(f, path: Path, model: JambaForCausalLM, names: list[tuple[str, str]], context: int) -> _File:
    import torch

    config = model.config
    expected = {"tokens", "positions", *(k for pair in names for k in pair)}
    keys = set(f.keys())
    extra, missing = sorted(keys - expected), sorted(expected - keys, key=_order)
    if extra:
        raise PromptCacheError(f"prompt cache {path} has an unexpected tensor {_shown(extra[0])}")
    if missing:
        raise PromptCacheError(f"prompt cache {path} lacks the tensor {missing[0]}")

    def shape_of(key: str, dtype: torch.dtype, ndim: int) -> list[int]:
        s = f.get_slice(key)
        shape, have = list(s.get_shape()), s.get_dtype()
        want = _ST_DTYPES.get(_dtype_name(dtype), _dtype_name(dtype))
        if have != want or len(shape) != ndim:
            raise PromptCacheError(f"prompt cache {path}: tensor {key} is {have} {shape}, not a {ndim}-d {want} tensor")
        return shape

    (n,) = shape_of("tokens", torch.int64, 1)
    (s,) = shape_of("positions", torch.int64, 1)
    if n > context:
        raise PromptCacheError(f"prompt cache {path} holds {n} tokens, more than the context ({context})")
    if not 0 < s <= n:
        raise PromptCacheError(f"prompt cache {path}: tensor positions lists {s} states for {n} tokens")
    e, k, g, dh = config.d_inner, config.mamba_d_conv, config.num_key_value_heads, config.head_dim
    for a, b in names:
        attention = a.endswith(".k")
        for key, dtype, want in ((a, model.dtype, [1, g, n, dh] if attention else [s, e, k - 1]),
                                 (b, model.dtype if attention else torch.float32,
                                  [1, g, n, dh] if attention else [s, e, config.mamba_d_state])):
            shape = shape_of(key, dtype, len(want))
            if shape != want:
                raise PromptCacheError(f"prompt cache {path}: tensor {key} has shape {shape}, "
                                       f"this model and {n} tokens need {want}")
    tokens, positions = f.get_tensor("tokens"), f.get_tensor("positions")  # n ≤ context: bounded
    if n and not (0 <= int(tokens.min()) and int(tokens.max()) < config.vocab_size):
        raise PromptCacheError(f"prompt cache {path}: tensor tokens holds ids outside the vocabulary "
                               f"(0..{config.vocab_size - 1})")
    if int(positions[-1]) != n or int(positions[0]) < 1 or (s > 1 and not bool((positions.diff() > 0).all())):
        raise PromptCacheError(f"prompt cache {path}: tensor positions is not an increasing list ending at {n}")
    return _File(f, path, tokens.tolist(), positions.tolist())


def _shown(value) -> str:
    """A string from a file as it may be printed: as is when plain, else quoted with its control
    characters escaped (a file must not drive the terminal)."""
    text = str(value)
    return text if re.fullmatch(r"[\w.+/-]{1,64}", text, flags=re.ASCII) else ascii(text[:64])


def _order(key: str) -> tuple:
    head = key.split(".")[0]
    return (int(head), key) if head.isdigit() else (-1, key)


def load(path: str | os.PathLike, model: JambaForCausalLM, cache: HybridCache, *,
         context_size: int | None = None) -> list[int]:
    """Put the state saved in the prompt cache file `path` (made by this model in this dtype) into `cache`
    (emptied first, its buffers kept); returns the tokens that state has seen.

    Args:
        context_size: most tokens the file may hold (default: a static cache's capacity, else the model's
            max_position_embeddings).

    Raises:
        PromptCacheError: the file is unreadable, was made by another model or dtype, holds more tokens than
            the context, or is malformed (one line naming the file and the tensor at fault).
    """
    path = Path(path)
    _regular(path)

    def use(file: _File) -> list[int]:
        n = len(file.tokens)
        file.fill(cache, n, len(file.positions) - 1)
        return file.tokens

    return _open(path, model, cache, context_size, use)


def restore(path: str | os.PathLike, model: JambaForCausalLM, ids: list[int], cache: HybridCache, *,
            context_size: int | None = None) -> Reused:
    """Load into the empty `cache` the longest state of the file at `path` that `ids` begins with and that
    leaves at least one token of `ids` to feed: the K/V of the tokens `ids` shares with the file are cut
    at the last position there where the file kept the Mamba states.

    Returns:
        how many tokens of `ids` the cache now holds (0: nothing reused; also when there is no file), and
        the Mamba states the file kept up to there.

    Raises:
        PromptCacheError: as `load`.
    """
    path = Path(path)
    try:
        if not os.path.lexists(path):
            return Reused()
    except ValueError:  # a NUL in the name
        raise PromptCacheError(f"cannot read prompt cache {path}: embedded null byte") from None
    _regular(path)

    def use(file: _File) -> Reused:
        shared = common_prefix(file.tokens, ids)
        slots = [s for s, p in enumerate(file.positions) if p <= shared and p < len(ids)]
        if not slots:
            return Reused()
        length = file.positions[slots[-1]]
        file.fill(cache, length, slots[-1])
        return Reused(length, file.states(cache, range(slots[-1] + 1)))

    return _open(path, model, cache, context_size, use)


def _regular(path: Path) -> None:
    try:
        mode = path.stat().st_mode  # a link to a regular file may be read
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise PromptCacheError(f"cannot read prompt cache {path}: {e.strerror or e}") from None
    kind = file_kind(mode)
    if kind is not None:
        raise PromptCacheError(f"cannot read prompt cache {path}: it is a {kind}")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of the token ids `a` and `b` (the prompt cache, the chat session
    and the server's prefix cache all resume where a new prompt stops agreeing with what they hold)."""
    a, b = list(a), list(b)  # slices of a list and a tuple never compare equal
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: halve (slices compare in C)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


# -- where to keep Mamba states --

def save_points(tokenizer, prompt, ids: list[int], parts: Sequence[str] | None = None, *, start: int = 0,
                every: int = EVERY, template_kwargs: dict | None = None) -> list[int]:
    """The positions in (start, len(ids) - 1] at which a prompt cache keeps the Mamba state of `prompt`
    (text or chat messages, tokenized as `ids`): the end of each of `parts` (the texts the prompt was built
    from, in order, such as a document and a question), every `every` tokens, and len(ids) - 1 (the file
    stops before the last prompt token, which the model must see to sample)."""
    end = len(ids) - 1
    points = {end, *range(every, end, every), *part_ends(tokenizer, prompt, ids, parts or (), template_kwargs)}
    return sorted(p for p in points if start < p <= end)


def part_ends(tokenizer, prompt, ids: list[int], parts: Sequence[str],
              template_kwargs: dict | None = None) -> list[int]:
    """For each of `parts` found in order in the text of `prompt` (chat messages rendered with the chat
    template), the number of leading tokens of `ids` that lie within the text up to its end: the tokens of
    that prefix alone, as far as they equal those of the whole prompt (a token that spans the boundary is
    left out, so any prompt continuing the prefix differently shares them)."""
    if not parts:
        return []
    if isinstance(prompt, str):
        text, encode = prompt, tokenizer.encode
    elif prompt and isinstance(prompt[0], dict):
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, **(template_kwargs or {}))
        encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731 (as encode_chat does)
    else:
        return []  # token ids: no text to find the parts in
    out, cursor = [], 0
    for part in parts:
        at = text.find(part, cursor) if part else -1
        if at < 0:
            continue
        cursor = at + len(part)
        out.append(common_prefix(encode(text[:cursor]), ids))
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
