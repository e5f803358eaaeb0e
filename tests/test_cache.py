"""The hybrid cache: decoding, chunked prefill and padded batches must equal one plain forward."""

import pytest
import torch

from conftest import assert_close
from jamba_cli.errors import ContextOverflowError
from jamba_cli.cache import AttnCache, MambaCache, make_cache


def _ids(b, t, seed=0):
    return torch.randint(3, 300, (b, t), generator=torch.Generator().manual_seed(seed))


def test_layout_per_layer_type(mini):
    model, _ = mini
    cfg = model.config
    cache = make_cache(cfg, 3, dtype=torch.float32, capacity=10)
    for i, layer in enumerate(cache.layers):
        if cfg.is_attention(i):
            assert isinstance(layer, AttnCache)
            assert layer.k.shape == (3, cfg.num_key_value_heads, 10, cfg.head_dim)
        else:
            assert isinstance(layer, MambaCache)
            assert layer.conv.shape == (3, cfg.d_inner, cfg.mamba_d_conv - 1)
            assert layer.ssm.shape == (3, cfg.d_inner, cfg.mamba_d_state)
            assert layer.ssm.dtype == torch.float32
    assert sum(isinstance(l, AttnCache) for l in cache.layers) == 2  # attention only on layers 4 and 12


def test_token_by_token_decode_equals_full_forward(mini):
    model, _ = mini
    ids = _ids(2, 40)
    with torch.no_grad():
        full = model(ids)
        cache = make_cache(model.config, 2, dtype=torch.float32)
        steps = torch.cat([model(ids[:, t:t + 1], cache) for t in range(40)], dim=1)
    assert cache.offset == 40
    assert_close(steps, full)


@pytest.mark.parametrize("cuts", [(5, 20), (1, 2), (17, 18), (3, 39)])
def test_prompt_in_three_chunks_equals_prompt_at_once(mini, cuts):
    model, _ = mini
    ids = _ids(2, 40, seed=1)
    a, b = cuts
    with torch.no_grad():
        full = model(ids)
        cache = make_cache(model.config, 2, dtype=torch.float32)
        parts = torch.cat([model(ids[:, :a], cache), model(ids[:, a:b], cache), model(ids[:, b:], cache)], dim=1)
    assert_close(parts, full)


def test_left_padded_batch_equals_rows_alone(mini):
    model, _ = mini
    rows = [_ids(1, 23, seed=2)[0], _ids(1, 9, seed=3)[0], _ids(1, 16, seed=4)[0]]
    t = max(len(r) for r in rows)
    ids = torch.zeros(3, t, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        cache = make_cache(model.config, 3, dtype=torch.float32)
        model(ids, cache, attention_mask=mask)
        nxt = _ids(3, 4, seed=5)
        batch_next = torch.cat([model(nxt[:, j:j + 1], cache) for j in range(4)], dim=1)
        for i, r in enumerate(rows):
            alone_cache = make_cache(model.config, 1, dtype=torch.float32)
            alone = model(r[None], alone_cache)
            assert_close(batch[i, t - len(r):], alone[0])
            alone_next = torch.cat([model(nxt[i:i + 1, j:j + 1], alone_cache) for j in range(4)], dim=1)
            assert_close(batch_next[i], alone_next[0])
    assert torch.isfinite(batch).all()  # padding rows must not turn into NaN either


@pytest.mark.parametrize("static", [False, True])
def test_snapshot_restores_an_earlier_point(mini, static):
    model, _ = mini
    ids = _ids(1, 30, seed=6)
    with torch.no_grad():
        cache = make_cache(model.config, 1, dtype=torch.float32, capacity=64, static=static)
        model(ids[:, :20], cache)
        snapshot = cache.snapshot()
        first = model(ids[:, 20:], cache)
        model(_ids(1, 7, seed=7), cache)  # wander off
        kv = [layer.k for layer in cache.layers if isinstance(layer, AttnCache)]
        cache.restore(snapshot)
        again = model(ids[:, 20:], cache)
    assert torch.equal(first, again)
    # in place (a captured CUDA graph holds the buffers), from a snapshot of the 20 positions used
    assert all(a is b.k for a, b in zip(kv, (layer for layer in cache.layers if isinstance(layer, AttnCache))))
    assert snapshot.nbytes() < cache.nbytes()
    if static:
        assert cache.pos.item() == cache.offset == 30


def test_cache_grows_unless_static(mini):
    model, _ = mini
    ids = _ids(1, 300, seed=8)
    with torch.no_grad():
        full = model(ids)
        cache = make_cache(model.config, 1, dtype=torch.float32, capacity=4)
        out = torch.cat([model(ids[:, :250], cache), model(ids[:, 250:], cache)], dim=1)
        assert cache.capacity >= 300
        assert_close(out, full)
        static = make_cache(model.config, 1, dtype=torch.float32, capacity=8, static=True)
        with pytest.raises(ContextOverflowError, match="context is full"):
            model(ids[:, :9], static)
