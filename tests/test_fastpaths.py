"""The pieces of the GPU fast path that run on any device: the static cache's device-position decode
step, the position the cache owns, and the grouped-GEMM experts. (The Triton kernels are checked in
test_triton_kernels.py, the whole GPU path in test_gpu.py.)"""

import pytest
import torch

from conftest import assert_close
from jamba_cli import kernels
from jamba_cli.cache import make_cache


def test_static_cache_decode_equals_dynamic(mini):
    model, _ = mini
    ids = torch.randint(3, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        static = make_cache(model.config, 2, dtype=torch.float32, capacity=40, static=True)
        out = [model(ids[:, :12], static)]
        for t in range(12, 30):
            out.append(model(ids[:, t:t + 1], static))
        assert static.pos.item() == static.offset == 30
    assert_close(torch.cat(out, 1), full)


def test_static_cache_with_left_padding(mini):
    model, _ = mini
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        dyn, sta = make_cache(model.config, 2, dtype=torch.float32), \
            make_cache(model.config, 2, dtype=torch.float32, capacity=20, static=True)
        a = [model(ids, dyn, attention_mask=mask)]
        b = [model(ids, sta, attention_mask=mask)]
        nxt = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(2))
        for j in range(5):
            a.append(model(nxt[:, j:j + 1], dyn))
            b.append(model(nxt[:, j:j + 1], sta))
    assert_close(torch.cat(b, 1), torch.cat(a, 1))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without grouped GEMM")
def test_grouped_experts_equal_the_loop(checkpoints):
    from jamba_cli.loader import load

    model, _ = load(checkpoints["mini"][0], dtype="bf16", device="cpu")
    experts = model.model.layers[1].feed_forward.experts
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, model.config.hidden_size, generator=g).to(torch.bfloat16)
    probs = torch.randn(37, 4, generator=g).softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    with torch.no_grad():
        try:
            grouped = kernels.grouped_experts(x, idx, w.to(torch.bfloat16), experts.gate_up_proj, experts.down_proj)
        except RuntimeError as e:  # CPU grouped GEMM is recent; the GPU test covers it regardless
            pytest.skip(f"grouped GEMM unavailable on this CPU build: {e}")
        loop = kernels.reference.experts_loop(x, idx, w.to(torch.bfloat16), experts.expert)
    assert_close(grouped, loop)


def test_compute_leaves_the_position_to_the_cache(mini):
    # what a CUDA graph replays (model.compute) writes the state at the cache's position without moving it;
    # advance() then moves the host offset and the device position together
    model, _ = mini
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = make_cache(model.config, 1, dtype=torch.float32, capacity=16, static=True)
        model(ids[:, :8], cache)
        snapshot = cache.snapshot()
        stepped = model.compute(ids[:, 8:], cache)
        assert cache.offset == cache.pos.item() == 8
        cache.advance(1)
        assert cache.offset == cache.pos.item() == 9
        cache.restore(snapshot)
        assert cache.offset == cache.pos.item() == 8
        assert_close(model(ids[:, 8:], cache), stepped)
        cache.seek(3)
        assert cache.offset == cache.pos.item() == 3
        cache.reset()
        assert cache.offset == cache.pos.item() == 0


def test_kernel_options_are_scoped():
    default = kernels.current()
    torch_only = kernels.KernelOptions(backend="torch", pdl=False)
    with kernels.using(torch_only):
        assert kernels.current() is torch_only
        with kernels.using(kernels.KernelOptions()):
            assert kernels.current().backend == "auto"
        assert kernels.current() is torch_only
    assert kernels.current() is default
    with pytest.raises(ValueError, match="scan"):
        kernels.KernelOptions(scan="cuda")
