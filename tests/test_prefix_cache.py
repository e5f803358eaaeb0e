"""The prefix cache's tree (jamba_cli/prefix_cache.py) on a real model's caches: a hit is an exact token match,
a restored state continues exactly as a cold run, shared starts keep their K/V once, and the byte budget holds
with the least recently used entries out and no entry broken by an eviction."""

from __future__ import annotations

import pytest
import torch

import jamba_cli
from conftest import assert_close
from jamba_cli.cache import AttnCache, MambaCache, make_cache
from jamba_cli.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def bundled():
    return jamba_cli.load(dtype="fp32", device="cpu")


def fresh(model):
    return make_cache(model.config, 1, dtype=model.dtype, device="cpu")


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 4000, (n,), generator=g).tolist()


@torch.inference_mode()
def fill(model, tokens: list[int], store: PrefixCache, points: list[int]):
    """Run `tokens` through a fresh cache, inserting the state at each of `points`; return the cache."""
    cache, done = fresh(model), 0
    for p in points:
        model(torch.tensor([tokens[done:p]]), cache)
        done = p
        store.insert(tokens[:p], cache)
    return cache


@torch.inference_mode()
def continued_logits(model, store: PrefixCache, ids: list[int]) -> tuple[int, torch.Tensor]:
    """(the position restored for `ids`, logits of the rest computed from there), through the store."""
    entry = store.lookup(ids, len(ids) - 1)
    cache = fresh(model)
    n = store.restore(entry, cache) if entry is not None else 0
    return n, model(torch.tensor([ids[n:]]), cache)[0]


@torch.inference_mode()
def cold_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]))[0]


def held_bytes(store: PrefixCache) -> int:
    """Bytes of every tensor in the tree, walked: what the store's own count must equal."""
    total, todo = 0, list(store.root.children.values())
    while todo:
        node = todo.pop()
        todo.extend(node.children.values())
        for pair in node.kv + (node.state or []):
            total += sum(t.numel() * t.element_size() for t in pair)
    return total


def kv_bytes(model, positions: int) -> int:
    c = model.config
    layers = sum(c.is_attention(i) for i in range(c.num_hidden_layers))
    return positions * layers * 2 * c.num_key_value_heads * c.head_dim * model.dtype.itemsize


def state_bytes(model) -> int:
    cache = fresh(model)
    return sum(t.numel() * t.element_size() for l in cache.layers if isinstance(l, MambaCache) for t in (l.conv, l.ssm))


def test_restored_states_continue_as_a_cold_run_and_hits_are_exact(bundled):
    model, _ = bundled
    store = PrefixCache(1 << 30)
    a = ids_of(120, 0)
    fill(model, a, store, [30, 70, 119])
    # the prompt itself: the deepest entry that leaves a token to compute
    n, logits = continued_logits(model, store, a)
    assert n == 119
    assert_close(logits[-1], cold_logits(model, a)[-1])
    # one id changed at 50: the entry at 30 is the last exact match, though 70 and 119 share most ids
    b = a[:50] + [a[50] + 1] + a[51:]
    n, logits = continued_logits(model, store, b)
    assert n == 30
    assert_close(logits, cold_logits(model, b)[30:])
    # a strict prefix of a stored prompt, ending on an entry: that entry cannot be used (nothing left to
    # compute), the one before is
    n, logits = continued_logits(model, store, a[:70])
    assert n == 30
    assert_close(logits[-1], cold_logits(model, a[:70])[-1])
    # ending between entries
    n, _ = continued_logits(model, store, a[:90])
    assert n == 70
    # nothing shared: no entry
    assert store.lookup(ids_of(40, 1), 39) is None
    assert store.lookup(a[:30], 29) is None


def test_a_restore_gives_the_cache_back_bit_for_bit(bundled):
    model, _ = bundled
    store = PrefixCache(1 << 30)
    a = ids_of(64, 2)
    cache = fill(model, a, store, [40, 64])
    target = fresh(model)
    with torch.inference_mode():
        model(torch.tensor([ids_of(100, 3)]), target)  # something else was there: it is overwritten
    store.restore(store.lookup(a + [7], 64), target)
    assert target.offset == 64
    for mine, theirs in zip(target.layers, cache.layers):
        if isinstance(mine, AttnCache):
            assert torch.equal(mine.k[:, :, :64], theirs.k[:, :, :64])
            assert torch.equal(mine.v[:, :, :64], theirs.v[:, :, :64])
        else:
            assert torch.equal(mine.conv, theirs.conv) and torch.equal(mine.ssm, theirs.ssm)


def test_shared_starts_keep_their_kv_once_and_a_branch_splits_a_node(bundled):
    model, _ = bundled
    store = PrefixCache(1 << 30)
    system = ids_of(50, 4)
    a = system + ids_of(40, 5)
    fill(model, a, store, [50, 90])
    assert store.nbytes == held_bytes(store) == kv_bytes(model, 90) + 2 * state_bytes(model)
    # a second conversation with the same system prompt adds only its own positions and state
    b = system + ids_of(30, 6)
    before = store.nbytes
    fill(model, b, store, [50, 80])  # the entry at 50 is there already: only marked used
    assert store.nbytes - before == kv_bytes(model, 30) + state_bytes(model)
    assert store.stats()["entries"] == 3
    # a branch inside a's own positions (no entry at 70): the node of 50..90 is split at 70, nothing added
    # twice, and both sides still restore exactly
    c = a[:70] + ids_of(25, 7)
    before = store.nbytes
    fill(model, c, store, [95])
    assert store.nbytes - before == kv_bytes(model, 25) + state_bytes(model)
    assert store.nbytes == held_bytes(store)
    for ids, expected in ((a + [9], 90), (b + [9], 80), (c + [9], 95)):
        n, logits = continued_logits(model, store, ids)
        assert n == expected
        assert_close(logits[-1], cold_logits(model, ids)[-1])


def test_the_budget_holds_least_recently_used_out_and_evictions_break_no_entry(bundled):
    model, _ = bundled
    one = kv_bytes(model, 40) + state_bytes(model)
    store = PrefixCache(3 * one)  # three 40-token prompts, not four
    prompts = [ids_of(40, 10 + i) for i in range(4)]
    for p in prompts[:3]:
        fill(model, p, store, [40])
        assert store.nbytes <= store.budget
    store.restore(store.lookup(prompts[0] + [1], 40), fresh(model))  # the first is used again: the second goes
    fill(model, prompts[3], store, [40])
    assert store.nbytes <= store.budget and store.nbytes == held_bytes(store)
    assert [store.lookup(p + [1], 40) is not None for p in prompts] == [True, False, True, True]

    # along one path: evicting the state of a shallow entry keeps the K/V a deeper entry stands on
    store = PrefixCache(kv_bytes(model, 90) + 3 * state_bytes(model))
    a = ids_of(90, 20)
    fill(model, a, store, [30, 60, 89])
    assert store.nbytes > store.budget - state_bytes(model) // 2  # full: the next insert evicts
    fill(model, a[:60] + ids_of(1, 21), store, [61])  # one more position and a state: the entry at 30 goes
    assert store.nbytes <= store.budget and store.nbytes == held_bytes(store)
    assert store.stats()["entries"] == 3
    assert store.lookup(a, 40) is None  # 30's state is gone ...
    n, logits = continued_logits(model, store, a + [5])  # ... but its K/V, which 60 and 89 need, stayed
    assert n == 89
    assert_close(logits[-1], cold_logits(model, a + [5])[-1])


def test_what_cannot_fit_the_budget_is_not_stored(bundled):
    model, _ = bundled
    store = PrefixCache(kv_bytes(model, 20))
    a = ids_of(40, 30)
    fill(model, a, store, [40])
    assert store.stats()["entries"] == 0 and store.nbytes == 0 == held_bytes(store)
    nothing = PrefixCache(0)
    fill(model, a, nothing, [10, 40])
    assert nothing.stats() == {"entries": 0, "bytes": {}, "budget": 0}


def test_entries_can_live_in_another_place_than_the_cache(bundled):
    model, _ = bundled
    store = PrefixCache(1 << 30, device="meta")  # a device no layer is on: where entries go is the store's
    a = ids_of(20, 40)
    fill(model, a, store, [20])
    assert set(store.stats()["bytes"]) == {"meta"}
    node = store.lookup(a + [1], 20)
    assert all(t.device.type == "meta" for pair in node.kv + node.state for t in pair)
