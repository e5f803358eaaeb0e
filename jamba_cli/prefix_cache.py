"""Exact hybrid states of prompts already processed, in a tree keyed by token ids: what `jamba serve` restores
so that a request extending a known conversation computes only its new tokens.

Resuming a hybrid model at position n takes two things: the attention K/V of positions 0..n-1, and every
Mamba layer's conv and SSM state at n. A Mamba state summarises all the tokens before it and cannot be cut
back, so it exists only where one was saved; K/V can be cut anywhere, and the K/V of a position never
changes once written (it depends only on the tokens up to it). So the store is a radix tree over token ids:

- a node is an edge of the tree: the token ids `tokens` of positions [start, end) and **the K/V of those
  positions only** (one (1, G, end - start, Dh) slice per attention layer). Resuming at a node gathers the K/V
  of its whole path from the root. Conversations that share a start (a system prompt, a document, earlier
  turns) share those nodes, so each K/V position is stored once however many entries lie beyond it; a
  conversation that grows by a turn adds only that turn's K/V. A branch (an edited earlier message) splits
  the node where the token ids part, copying it into its two halves once.
- a node may hold a `state`: the Mamba states at `end`. Only such nodes are entries (places to resume); a
  node without one exists because entries lie beyond it.

A lookup walks the tree along the prompt's ids, comparing every id of every edge, so a hit is an exact token
match: the deepest entry within the first `limit` ids (the caller leaves the prompt's last token out, as the
model must see one token to give the logits to sample from).

Bytes: every tensor is counted once; `budget` bounds the total. When an insertion would pass it, the least
recently used entry gives up its Mamba state, and a node left with no state and no children is removed with
its K/V, then its parent likewise: K/V is freed only once no entry needs it, so evicting never breaks an
entry beyond it. An insertion larger than the whole budget is not stored. Entries live on `device` when one
is given (e.g. "cpu" to keep them in host memory), else beside each layer's cache (the model's devices); there
is no automatic move from GPU to host memory when the budget is reached: the least recently used are dropped.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Sequence

import torch

from .cache import AttnCache, HybridCache, MambaCache
from .prompt_cache import common_prefix


class Node:
    """Positions [start, start + len(tokens)) of one path: their token ids, their K/V per attention layer, and
    (for an entry) the Mamba states after them."""

    __slots__ = ("parent", "start", "tokens", "kv", "state", "children")

    def __init__(self, parent: Node | None, start: int, tokens: list[int], kv: list[tuple[torch.Tensor, ...]]):
        self.parent, self.start, self.tokens, self.kv = parent, start, tokens, kv
        self.state: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (conv, ssm) per Mamba layer
        self.children: dict[int, Node] = {}  # by the first token id of the child's edge

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def path(self) -> list[Node]:
        """The nodes from the root's first child down to this one."""
        out, node = [], self
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


def _nbytes(tensors) -> Counter:
    out = Counter()
    for t in tensors:
        out[str(t.device)] += t.numel() * t.element_size()
    return out


def _kv_tensors(node: Node):
    return (t for pair in node.kv for t in pair)


def _state_tensors(node: Node):
    return (t for pair in node.state or () for t in pair)


class PrefixCache:
    """The tree of exact hybrid states of one-sequence caches, bounded by `budget` bytes (see the module doc).

    Args:
        budget: most bytes of K/V and Mamba states kept, summed over devices; 0 keeps nothing.
        device: where entries live; None: beside each layer's cache.
    """

    def __init__(self, budget: int, device: torch.device | str | None = None):
        if budget < 0:
            raise ValueError("`cache_budget` must be >= 0")
        self.budget = budget
        self.device = None if device is None else torch.device(device)
        self.root = Node(None, 0, [], [])
        self._entries: OrderedDict[int, Node] = OrderedDict()  # id(node) -> node, least recently used first
        self._bytes: Counter = Counter()  # device -> bytes
        self._ids = itertools.count()

    # -- what is held --

    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": {d: n for d, n in self._bytes.items() if n},
                "budget": self.budget}

    def clear(self) -> None:
        self.root = Node(None, 0, [], [])
        self._entries.clear()
        self._bytes.clear()

    # -- lookup and restore --

    def lookup(self, ids: Sequence[int], limit: int) -> Node | None:
        """The deepest entry whose tokens are the first `end` of `ids`, with `end` <= `limit`; None if none."""
        node, best = self.root, None
        depth = 0
        while depth < limit and depth < len(ids):
            child = node.children.get(ids[depth])
            if child is None or child.end > limit or ids[depth:child.end] != child.tokens:
                break
            node, depth = child, child.end
            if node.state is not None:
                best = node
        return best

    @torch.inference_mode()
    def restore(self, entry: Node, cache: HybridCache) -> int:
        """Bring the one-sequence `cache` (no padding) to the state at `entry` in place (its buffers stay, as
        a captured CUDA graph holds them); returns the position, `entry.end`."""
        n = entry.end
        cache.reserve(n - cache.offset)
        path = entry.path()
        attention = [layer for layer in cache.layers if isinstance(layer, AttnCache)]
        for i, layer in enumerate(attention):
            for node in path:
                k, v = node.kv[i]
                layer.k[:, :, node.start:node.end].copy_(k)
                layer.v[:, :, node.start:node.end].copy_(v)
        mamba = [layer for layer in cache.layers if isinstance(layer, MambaCache)]
        for layer, (conv, ssm) in zip(mamba, entry.state):
            layer.conv.copy_(conv)
            layer.ssm.copy_(ssm)
        cache.seek(n)
        self._entries.move_to_end(id(entry))
        return n

    # -- insertion and eviction --

    @torch.inference_mode()
    def insert(self, tokens: Sequence[int], cache: HybridCache) -> bool:
        """Keep the state of `cache`, which has seen exactly `tokens`, as an entry; False where it does not fit
        the budget (or the device's memory). An entry already there is only marked used."""
        n = len(tokens)
        if n == 0 or cache.offset != n:
            raise ValueError(f"the cache holds {cache.offset} positions, not the {n} tokens given")
        tokens = list(tokens)
        state_bytes = sum(self._state_size(cache).values())
        while True:
            parent, child, shared = self._walk(tokens)
            at = parent.end + shared  # positions already in the tree along this path
            if at == n and child is None and parent.state is not None:
                self._entries.move_to_end(id(parent))
                return True
            need = state_bytes + (n - at) * self._kv_bytes_per_position(cache)
            if need > self.budget:
                return False
            if self.nbytes + need <= self.budget:
                break
            self._evict_one()
        node = None
        try:
            if child is not None and shared:
                parent = self._split(child, shared)
            node = parent
            if parent.end < n:
                kv = [(self._copy(l.k[:, :, parent.end:n]), self._copy(l.v[:, :, parent.end:n]))
                      for l in cache.layers if isinstance(l, AttnCache)]
                node = Node(parent, parent.end, tokens[parent.end:], kv)
                parent.children[node.tokens[0]] = node
                self._bytes.update(_nbytes(_kv_tensors(node)))
            node.state = [(self._copy(l.conv), self._copy(l.ssm)) for l in cache.layers if isinstance(l, MambaCache)]
        except torch.OutOfMemoryError:  # the budget was more than the device holds now: keep what was kept
            if node is not None:
                self._prune(node)
            return False
        self._bytes.update(_nbytes(_state_tensors(node)))
        self._entries[id(node)] = node
        return True

    def _walk(self, tokens: list[int]) -> tuple[Node, Node | None, int]:
        """(deepest node whose whole path `tokens` starts with, its child where they part part way, how many
        of that child's tokens they share)."""
        node = self.root
        while node.end < len(tokens):
            child = node.children.get(tokens[node.end])
            if child is None:
                return node, None, 0
            shared = common_prefix(child.tokens, tokens[child.start:child.end])
            if shared < len(child.tokens):
                return node, child, shared
            node = child
        return node, None, 0

    def _split(self, child: Node, at: int) -> Node:
        """Cut `child` after its first `at` tokens into a new node (returned) and the rest. Both halves are
        copied, so that freeing one frees its memory."""
        parent = child.parent
        head = Node(parent, child.start, child.tokens[:at], [(k[:, :, :at].clone(), v[:, :, :at].clone())
                                                              for k, v in child.kv])
        child.kv = [(k[:, :, at:].clone(), v[:, :, at:].clone()) for k, v in child.kv]
        child.tokens, child.start, child.parent = child.tokens[at:], child.start + at, head
        head.children[child.tokens[0]] = child
        parent.children[head.tokens[0]] = head
        return head

    def _evict_one(self) -> None:
        """Drop the least recently used entry's Mamba state, and the nodes no entry needs any more."""
        _, node = self._entries.popitem(last=False)
        self._bytes.subtract(_nbytes(_state_tensors(node)))
        node.state = None
        self._prune(node)

    def _prune(self, node: Node) -> None:
        while node.parent is not None and node.state is None and not node.children:
            del node.parent.children[node.tokens[0]]
            self._bytes.subtract(_nbytes(_kv_tensors(node)))
            node = node.parent

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device or t.device, copy=True)

    def _state_size(self, cache: HybridCache) -> Counter:
        return _nbytes(t for l in cache.layers if isinstance(l, MambaCache) for t in (l.conv, l.ssm))

    @staticmethod
    def _kv_bytes_per_position(cache: HybridCache) -> int:
        return sum(2 * l.k[:, :, :1].numel() * l.k.element_size() for l in cache.layers if isinstance(l, AttnCache))
