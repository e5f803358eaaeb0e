"""GPU fast path against the plain path (run on a CUDA machine; skipped elsewhere).

Kernel path (mamba-ssm, causal-conv1d, our Triton kernels, grouped GEMMs) vs the PyTorch path on the
same weights; chunked prefill and decode vs one whole-prompt pass on the kernel path; CUDA-graph decode
vs eager decode; and the kernel path against transformers' JambaForCausalLM on the GPU. The exactness
checks run in fp32 (all kernels support it), so a mistake cannot hide in bf16 rounding.
"""

import copy

import pytest
import torch

from jamba_cli import kernels
from jamba_cli.cache import make_cache
from jamba_cli.generation import CUDAGraphDecoder, generate_step
from jamba_cli.loader import load
from conftest import CONFIGS, make_hf_model, save_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or kernels.cuda_ops() is None,
                                 reason="needs CUDA with mamba-ssm, causal-conv1d and triton")]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def gpu_ckpt(tmp_path_factory, tokenizer_dir):
    # the Mini schedule with a realistic init scale, so bf16 rounding is not amplified layer after layer
    reference = make_hf_model(**{**CONFIGS["mini"], "initializer_range": 0.02})
    return save_checkpoint(reference, tmp_path_factory.mktemp("gpu"), tokenizer_dir), reference


@pytest.fixture(scope="module")
def fp32(gpu_ckpt):
    return load(gpu_ckpt[0], dtype="fp32", device="cuda")[0]


@pytest.fixture(scope="module")
def bf16(gpu_ckpt):
    return load(gpu_ckpt[0], dtype="bf16", device="cuda")[0]


@pytest.fixture
def torch_kernels():
    kernels.use("torch")
    yield
    kernels.use("auto")


def _ids(b, t, seed):
    return torch.randint(3, 300, (b, t), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("dtype, tol", [("fp32", 2e-3), ("bf16", 3e-2)])
def test_kernel_path_equals_torch_path(fp32, bf16, torch_kernels, dtype, tol):
    model = fp32 if dtype == "fp32" else bf16
    ids = _ids(2, 300, 0)  # 600 (token, slot) pairs: the grouped-GEMM experts in bf16
    with torch.no_grad():
        plain = model(ids)
        kernels.use("auto")
        fast = model(ids)
    assert _rel(fast, plain) < tol


@pytest.mark.parametrize("cuts", [(100, 250), (1, 2), (7, 300), (2, 3)])
def test_chunked_prompt_equals_whole_on_kernel_path(fp32, cuts):
    ids = _ids(2, 333, 2)
    a, b = cuts
    with torch.no_grad():
        whole = fp32(ids)
        cache = make_cache(fp32.config, 2, dtype=torch.float32, device="cuda")
        parts = torch.cat([fp32(ids[:, :a], cache), fp32(ids[:, a:b], cache), fp32(ids[:, b:], cache)], 1)
    assert _rel(parts, whole) < 1e-4


def test_long_prompt_on_the_triton_kernels(fp32):
    # 9000 tokens at once, and in chunks of 3000 (our scan from a start state, attention after cached keys)
    ids = _ids(1, 9000, 8)
    with torch.no_grad():
        whole = fp32(ids)
        cache = make_cache(fp32.config, 1, dtype=torch.float32, device="cuda")
        parts = torch.cat([fp32(ids[:, a:a + 3000], cache) for a in (0, 3000, 6000)], 1)
        kernels.use("torch")
        try:
            plain = fp32(ids)
        finally:
            kernels.use("auto")
    assert _rel(parts, whole) < 1e-4
    assert _rel(whole, plain) < 2e-3


@pytest.mark.parametrize("batch, gemv_linears", [(2, False), (1, False), (1, True)])
def test_decode_equals_whole_prompt_on_kernel_path(fp32, batch, gemv_linears, monkeypatch):
    # batch 1 takes the one-token kernels (fused dense MLP, optionally our GEMV for every linear)
    monkeypatch.setattr(kernels, "GEMV_LINEARS", gemv_linears)
    ids = _ids(batch, 40, 1)
    with torch.no_grad():
        whole = fp32(ids)
        cache = make_cache(fp32.config, batch, dtype=torch.float32, device="cuda")
        steps = [fp32(ids[:, :20], cache)] + [fp32(ids[:, t:t + 1], cache) for t in range(20, 40)]
    assert _rel(torch.cat(steps, 1), whole) < 1e-4


@pytest.mark.parametrize("batch, pdl", [(2, False), (1, False), (1, True)])
def test_graph_decode_equals_eager_decode(bf16, batch, pdl, monkeypatch):
    # with programmatic dependent launch the kernels overlap their starts, never their arithmetic
    monkeypatch.setattr(kernels.cuda_ops().triton.PDL, "on", pdl)
    ids = _ids(batch, 50, 3)
    with torch.no_grad():
        caches = [make_cache(bf16.config, batch, dtype=torch.bfloat16, device="cuda", capacity=64, static=True)
                  for _ in range(2)]
        for cache in caches:
            bf16(ids[:, :30], cache)
        step = CUDAGraphDecoder(bf16, caches[1])
        for t in range(30, 50):
            got = step(ids[:, t])
            kernels.cuda_ops().triton.PDL.on = False
            want = bf16(ids[:, t:t + 1], caches[0])[:, -1]
            kernels.cuda_ops().triton.PDL.on = pdl
            assert torch.equal(got, want), t
    assert caches[1].offset == caches[0].offset == 50 and caches[1].pos.item() == 50


def test_greedy_generation_with_graphs_matches_without(bf16):
    prompt = _ids(1, 16, 4)[0]
    with_graph = [int(t) for t in generate_step(bf16, prompt, max_tokens=24)]
    without = [int(t) for t in generate_step(bf16, prompt, max_tokens=24, cuda_graph=False)]
    assert with_graph == without


def test_moe_kernels_agree(bf16):
    experts = bf16.model.layers[1].feed_forward.experts
    g = torch.Generator(device="cuda").manual_seed(5)
    ops = kernels.cuda_ops()
    for t in (1, 3, 8, 40):
        x = torch.randn(t, bf16.config.hidden_size, device="cuda", generator=g).bfloat16()
        logits = torch.randn(t, 4, device="cuda", generator=g).bfloat16().float()
        w, idx = logits.softmax(-1).topk(2)
        w = w.bfloat16()
        kernels.use("torch")
        try:
            loop = experts(x, idx, w)
        finally:
            kernels.use("auto")
        assert _rel(experts._grouped(x, idx, w), loop) < 1e-2
        if t <= 8:  # the decode kernels, routing from the logits themselves
            i = experts.down_proj.shape[-1]
            fused = ops.gemv.swiglu_mlp(x, experts.gate_up_proj[:, :i], experts.gate_up_proj[:, i:],
                                        experts.down_proj, logits, 2)
            assert _rel(fused, loop) < 1e-2


def test_kernel_path_close_to_transformers_on_gpu(gpu_ckpt, bf16, fp32):
    reference = gpu_ckpt[1]
    ids = _ids(1, 64, 6)
    with torch.no_grad():
        want32 = copy.deepcopy(reference).to("cuda")(ids).logits
        want16 = copy.deepcopy(reference).to("cuda", torch.bfloat16)(ids).logits
        got32, got16 = fp32(ids), bf16(ids)
    assert _rel(got32, want32) < 2e-3
    assert _rel(got16, want32) < 1.5 * _rel(want16, want32) + 1e-2


def test_decode_kernels_at_tile_multiples():
    # model sizes that fill whole tiles take the kernels' unmasked (EVEN_K) paths, which tiny models miss
    ops = kernels.cuda_ops()
    g = torch.Generator(device="cuda").manual_seed(7)
    h, i, x_n = 2048, 3072, 8

    def randn(*shape):
        return (torch.randn(*shape, device="cuda", generator=g) * 0.05).bfloat16()

    x, gate, up, down = randn(1, h), randn(i, h), randn(i, h), randn(h, i)
    want = torch.nn.functional.linear(ops.triton.silu_mul(x @ gate.T, x @ up.T), down)
    assert _rel(ops.gemv.swiglu_mlp(x, gate, up, down), want) < 1e-2
    gu, dn = randn(x_n, 2 * i, h), randn(x_n, h, i)
    logits = torch.randn(1, x_n, device="cuda", generator=g).bfloat16().float()
    w, idx = logits.softmax(-1).topk(2)
    want = sum(w[0, j] * torch.nn.functional.linear(
        ops.triton.silu_mul(x @ gu[idx[0, j], :i].T, x @ gu[idx[0, j], i:].T), dn[idx[0, j]]) for j in range(2))
    got = ops.gemv.swiglu_mlp(x, gu[:, :i], gu[:, i:], dn, logits, 2)
    assert _rel(got, want) < 1e-2
    for n, k in ((4096, 8192), (1024, 4096), (300, 2048)):
        wt, xv = randn(n, k), randn(1, k)
        assert _rel(ops.gemv.gemv(xv, wt, (8, 1024, 4, 3)), xv @ wt.T) < 1e-2


@pytest.mark.parametrize("t, offset", [(5000, 0), (700, 3000), (3, 90)])
def test_prefill_attention_matches_sdpa(t, offset):
    # Jamba-Mini's heads (32 query over 8 K/V, Dh 128), each config: bf16 against torch's FlashAttention on
    # the same inputs, fp32 exactly against the math path
    from torch.nn.attention.bias import causal_lower_right

    ops = kernels.cuda_ops()
    g = torch.Generator(device="cuda").manual_seed(9)
    s = offset + t
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        q = torch.randn(1, t, 32, 128, device="cuda", generator=g).to(dtype).transpose(1, 2)
        k, v = torch.randn(2, 1, s, 8, 128, device="cuda", generator=g).to(dtype).transpose(2, 3)
        mask = causal_lower_right(t, s) if offset else None
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double().repeat_interleave(4, 1), v.double().repeat_interleave(4, 1),
            attn_mask=mask, is_causal=mask is None)
        got = ops.attention.prefill_attention(q, k, v, offset).transpose(1, 2)
        assert _rel(got, ref) < tol, dtype


def test_chat_replies_replay_one_graph_and_equal_eager_replies():
    # jamba chat on one GPU: a static cache sized by the context, every reply decoded by replaying the
    # one CUDA graph captured over it (kept across turns, /regen and /clear), the same tokens as a chat
    # on a growing cache decoded eagerly
    from jamba_cli.chat import ChatSession, ChatSettings
    from jamba_cli.loader import bundled_model_dir

    model, tokenizer = load(bundled_model_dir(), dtype="fp32", device="cuda")

    def chat(static):
        s = ChatSession(model, tokenizer, name="bundled", context_size=512,
                        settings=ChatSettings(max_tokens=24, temperature=0.0, ignore_eos=True))
        if not static:
            s.cache = make_cache(model.config, 1, dtype=model.dtype, device="cuda")
        assert s.cache.static is static
        return s

    replies, decoders = {}, []
    for static in (True, False):
        s = chat(static)
        said = lambda chunks: "".join(c.text for c in chunks)
        replies[static] = [said(s.ask("ROMEO: speak.", lambda: False)), said(s.ask("And then?", lambda: False)),
                           said(s.regenerate(lambda: False))]
        decoders.append(s.cache.decoder)
        s.clear()
        replies[static].append(said(s.ask("JULIET: well?", lambda: False)))
        decoders.append(s.cache.decoder)
    assert replies[True] == replies[False]
    assert len(set(replies[True])) > 1 and all(replies[True])
    assert decoders[0] is not None and decoders[0] is decoders[1]  # captured once, replayed every turn
    assert decoders[2] is decoders[3] is None  # the growing cache decodes eagerly
