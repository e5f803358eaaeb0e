"""The hybrid cache: K/V for the attention layers, conv + SSM state for the Mamba layers, and the position.

The cache is made by `make_cache` and passed into `model(input_ids, cache)`, which appends to it. It
cannot be trimmed: a Mamba state summarises every token it has seen and there is no way to take one back.
To return to an earlier point, `snapshot()` the cache there and `restore()` it later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import JambaConfig
from .errors import ContextOverflowError


@dataclass
class AttnCache:
    k: torch.Tensor  # (B, G, capacity, Dh); positions >= cache.offset are unused
    v: torch.Tensor  # (B, G, capacity, Dh)

    def append(self, k: torch.Tensor, v: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values (B, G, T, Dh) at positions offset.., return all (B, G, offset+T, Dh)."""
        t = k.shape[2]
        self.k[:, :, offset:offset + t] = k
        self.v[:, :, offset:offset + t] = v
        return self.k[:, :, :offset + t], self.v[:, :, :offset + t]


@dataclass
class MambaCache:
    conv: torch.Tensor  # (B, E, K-1): the last K-1 conv inputs, oldest first (causal-conv1d's layout)
    ssm: torch.Tensor  # (B, E, N), float32: the selective-scan state h


@dataclass
class Span:
    """Where the T new tokens of one forward call sit: after `offset` positions already cached.

    Attributes:
        offset: positions in the cache before these tokens (0 without a cache).
        length: T.
        pad_mask: (B, T) bool, False at left padding of a batched prompt; None when every token is real.
        key_mask: (B, S) bool over the positions attention may read (S = offset + T, or a static cache's
            capacity), False at padding; None without padding.
        pos: (1,) long on the device, equal to `offset`, for a static cache: a decode step that reads its
            position there has fixed shapes and can be replayed as a CUDA graph.
    """

    offset: int
    length: int
    pad_mask: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    _moved: dict = field(default_factory=dict, repr=False, compare=False)

    def attention_mask(self) -> torch.Tensor | None:
        """Boolean (B, 1, T, S) causal mask with padding, or None where plain causal attention does."""
        if self.key_mask is None or self.length == 1:
            return None
        if "mask" not in self._moved:
            s = self.offset + self.length
            key_mask = self.key_mask[:, :s]
            q_pos = torch.arange(self.offset, s, device=key_mask.device)[:, None]
            k_pos = torch.arange(s, device=key_mask.device)[None, :]
            # a padding query attends to itself alone, so its row is never empty (no NaN)
            allowed = (k_pos <= q_pos) & (key_mask[:, None, :] | (k_pos == q_pos))  # (B, T, S)
            self._moved["mask"] = allowed.unsqueeze(1)
        return self._moved["mask"]

    def to(self, device: torch.device) -> Span:
        """This span with its tensors on `device` (a model split over devices; copies made once)."""
        tensors = (self.pad_mask, self.key_mask, self.pos)
        if all(t is None or t.device == device for t in tensors):
            return self
        if device not in self._moved:
            moved = Span(self.offset, self.length, *(None if t is None else t.to(device) for t in tensors))
            if "mask" in self._moved:
                moved._moved["mask"] = self._moved["mask"].to(device)
            self._moved[device] = moved
        return self._moved[device]


class HybridCache:
    """Per-layer state of a batch of sequences, and how many positions it has seen (`offset`).

    `key_mask` (B, capacity) marks the positions that are real tokens; it is None until a call brings
    padding (left-padded batched prompts), so the unpadded common case pays nothing for it.
    With `static=True` the K/V buffers never grow and `pos` holds `offset` on the device, so a decode
    step has fixed shapes and reads no host value: it can be captured in a CUDA graph. `advance` and
    `seek` are the only ways the position moves; they keep `offset` and `pos` equal.
    """

    def __init__(self, layers: list[AttnCache | MambaCache], capacity: int, static: bool = False,
                 pos: torch.Tensor | None = None):
        self.layers = layers
        self.capacity = capacity
        self.static = static
        self.pos = pos  # (1,) long, static caches only
        self.offset = 0
        self.key_mask: torch.Tensor | None = None
        self.decoder = None  # a captured decode step over these buffers (generation.CUDAGraphDecoder)

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0] if isinstance(self.layers[0], AttnCache) else self.layers[0].conv.shape[0]

    def span(self, t: int, pad_mask: torch.Tensor | None = None) -> Span:
        """Make room for `t` new tokens (`pad_mask` (B, t): which are real) and say where they go. The
        position does not move: `advance(t)` once they are in."""
        self.reserve(t)
        self.record_padding(pad_mask, t)
        key_mask = self.key_mask
        if key_mask is not None and self.pos is None:
            key_mask = key_mask[:, :self.offset + t]
        return Span(self.offset, t, pad_mask, key_mask, self.pos)

    def advance(self, t: int) -> None:
        """The state now holds `t` more positions."""
        self.offset += t
        if self.pos is not None:
            self.pos.add_(t)

    def seek(self, n: int) -> None:
        """Set the position to `n` (the state held must be that of n positions: `restore` and loaders)."""
        self.offset = n
        if self.pos is not None:
            self.pos.fill_(n)

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more positions, doubling the K/V buffers when they are full."""
        need = self.offset + new_tokens
        if need <= self.capacity:
            return
        if self.static:
            raise ContextOverflowError(f"context is full: {self.offset} + {new_tokens} tokens exceed the cache size "
                                       f"{self.capacity} (raise `context_size`)")
        capacity = max(need, 2 * self.capacity, 256)
        for layer in self.layers:
            if isinstance(layer, AttnCache):
                layer.k = _grow(layer.k, capacity, self.offset)
                layer.v = _grow(layer.v, capacity, self.offset)
        if self.key_mask is not None:
            self.key_mask = _grow(self.key_mask, capacity, self.offset, dim=1)
        self.capacity = capacity

    def record_padding(self, mask: torch.Tensor | None, t: int) -> None:
        """Note which of the next `t` positions are real tokens (`mask` (B, t), or None for all)."""
        if mask is None and (self.key_mask is None or self.static):
            return  # a static mask starts all True, so decode steps write nothing (graph-safe)
        if self.key_mask is None:
            device = next(iter(layer.k.device for layer in self.layers if isinstance(layer, AttnCache)),
                          mask.device)
            self.key_mask = torch.ones(self.batch_size, self.capacity, dtype=torch.bool, device=device)
        self.key_mask[:, self.offset:self.offset + t] = True if mask is None else mask.to(self.key_mask.device)

    def snapshot(self) -> HybridCache:
        """A copy of the state held now, for `restore`. Its K/V keep only the positions in use, so a
        snapshot of a large static cache costs what its content does, not its capacity."""
        n = self.offset
        layers = [AttnCache(l.k[:, :, :n].clone(), l.v[:, :, :n].clone()) if isinstance(l, AttnCache) else
                  MambaCache(l.conv.clone(), l.ssm.clone()) for l in self.layers]
        out = HybridCache(layers, n)
        out.seek(n)
        out.key_mask = None if self.key_mask is None else self.key_mask[:, :n].clone()
        return out

    def restore(self, snapshot: HybridCache) -> None:
        """Go back to the state of `snapshot` (this cache's, from `snapshot()`) in place: the buffers stay,
        as a captured CUDA graph holds them. Positions past the snapshot keep stale K/V, never read: they
        are rewritten before the offset reaches them."""
        n = snapshot.offset
        self.reserve(n - self.offset)  # room for n positions: a no-op for the cache the snapshot came from
        for mine, theirs in zip(self.layers, snapshot.layers):
            if isinstance(mine, AttnCache):
                mine.k[:, :, :n].copy_(theirs.k)
                mine.v[:, :, :n].copy_(theirs.v)
            else:
                mine.conv.copy_(theirs.conv)
                mine.ssm.copy_(theirs.ssm)
        self.seek(n)
        if snapshot.key_mask is None:
            self.key_mask = None
        elif self.key_mask is None:
            self.key_mask = torch.ones(self.batch_size, self.capacity, dtype=torch.bool,
                                       device=snapshot.key_mask.device)
        if self.key_mask is not None:  # in place: a captured CUDA graph holds this tensor
            self.key_mask[:, :n].copy_(snapshot.key_mask)
            self.key_mask[:, n:] = True  # what a static cache assumes of the positions to come

    def reset(self) -> None:
        for layer in self.layers:
            if isinstance(layer, MambaCache):
                layer.conv.zero_()
                layer.ssm.zero_()
        self.seek(0)
        self.key_mask = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for l in self.layers
                   for t in ((l.k, l.v) if isinstance(l, AttnCache) else (l.conv, l.ssm)))


def _grow(t: torch.Tensor, capacity: int, used: int, dim: int = 2) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = capacity
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, used).copy_(t.narrow(dim, 0, used))
    return out


def make_cache(config: JambaConfig, batch_size: int, *, dtype: torch.dtype, device: torch.device | str
               | list[torch.device | str] = "cpu", capacity: int = 0, static: bool = False) -> HybridCache:
    """An empty cache for `batch_size` sequences.

    Args:
        dtype: the model's dtype; K/V and conv state use it, the SSM state is always float32.
        device: one device, or one per layer (a model split over devices keeps each layer's state with it).
        capacity: K/V positions to preallocate; the cache grows past it unless `static`.
    """
    devices = device if isinstance(device, (list, tuple)) else [device] * config.num_hidden_layers
    b, e = batch_size, config.d_inner
    layers: list[AttnCache | MambaCache] = []
    for i, dev in enumerate(devices):
        if config.is_attention(i):
            shape = (b, config.num_key_value_heads, capacity, config.head_dim)
            layers.append(AttnCache(torch.zeros(shape, dtype=dtype, device=dev),
                                    torch.zeros(shape, dtype=dtype, device=dev)))
        else:
            layers.append(MambaCache(torch.zeros(b, e, config.mamba_d_conv - 1, dtype=dtype, device=dev),
                                     torch.zeros(b, e, config.mamba_d_state, dtype=torch.float32, device=dev)))
    pos = torch.zeros(1, dtype=torch.long, device=devices[0]) if static else None
    return HybridCache(layers, capacity, static, pos)
