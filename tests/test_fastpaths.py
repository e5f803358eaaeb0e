"""The pieces of the GPU fast path that run on any device: the static cache's device-position decode
step, and the grouped-GEMM experts. (The kernels themselves are checked in test_gpu.py.)"""

import os

import pytest
import torch

from jamba_cli.cache import make_cache
from conftest import interpret


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
    assert (torch.cat(out, 1) - full).abs().max() <= 1e-4


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
    assert (torch.cat(a, 1) - torch.cat(b, 1)).abs().max() <= 1e-5


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
            grouped = experts._grouped(x, idx, w.to(torch.bfloat16))
        except RuntimeError as e:  # CPU grouped GEMM is recent; the GPU test covers it regardless
            pytest.skip(f"grouped GEMM unavailable on this CPU build: {e}")
        loop = experts(x, idx, w.to(torch.bfloat16))
    assert torch.allclose(grouped.float(), loop.float(), atol=0.02, rtol=0.02)


CHECKS = ["check_rms_norm", "check_silu_mul", "check_gemv", "check_swiglu_experts", "check_swiglu_dense",
          "check_mamba_step", "check_moe_combine", "check_initial_state"]


def test_triton_kernels_in_the_interpreter():
    # Triton's interpreter runs kernels on the CPU; the checks (tests/triton_checks.py) run in a fresh one
    script = os.path.join(os.path.dirname(__file__), "triton_checks.py")
    assert interpret(script, *CHECKS).split() == [w for c in CHECKS for w in ("ok", c)]
