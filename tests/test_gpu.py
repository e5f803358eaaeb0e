"""GPU fast path against the plain path (run on a CUDA machine; skipped elsewhere).

Kernel path (our Triton kernels, grouped GEMMs, and mamba-ssm / causal-conv1d where installed) vs the
PyTorch path on the same weights; our kernels vs mamba-ssm's and causal-conv1d's; chunked prefill and
decode vs one whole-prompt pass on the kernel path; CUDA-graph decode vs eager decode; and the kernel
path against transformers' JambaForCausalLM on the GPU. The exactness checks run in fp32 (all kernels
support it), so a mistake cannot hide in bf16 rounding. Errors are relative to the norm of the reference
(`assert_close(..., norm=True)`): bf16 roundings differ element by element between paths.
"""

import copy

import pytest
import torch

from jamba_cli import kernels
from jamba_cli.cache import make_cache
from jamba_cli.generation import CUDAGraphDecoder, generate_step
from jamba_cli.kernels import KernelOptions, reference
from jamba_cli.loader import load
from conftest import CONFIGS, assert_close, make_hf_model, save_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or not kernels.available()["triton"],
                                 reason="needs CUDA and triton")]
TORCH = KernelOptions(backend="torch")
COMPILED = KernelOptions(scan="mamba_ssm", conv="causal_conv1d", step="mamba_ssm")  # where installed
OURS = KernelOptions(scan="triton", conv="triton", step="triton")
needs_compiled = pytest.mark.skipif(not (kernels.available()["mamba_ssm"] and kernels.available()["causal_conv1d"]),
                                    reason="needs mamba-ssm and causal-conv1d")


def _close(got, want, tol, msg=""):
    assert_close(got, want, tol, norm=True, msg=msg)


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


def _ids(b, t, seed):
    return torch.randint(3, 300, (b, t), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("options", [OURS, COMPILED], ids=["ours", "compiled"])
@pytest.mark.parametrize("dtype, tol", [("fp32", 2e-3), ("bf16", 3e-2)])
def test_kernel_path_equals_torch_path(fp32, bf16, dtype, tol, options):
    model = fp32 if dtype == "fp32" else bf16
    ids = _ids(2, 300, 0)  # 600 (token, slot) pairs: the grouped-GEMM experts in bf16
    with torch.no_grad():
        with kernels.using(TORCH):
            plain = model(ids)
        with kernels.using(options):
            fast = model(ids)
    _close(fast, plain, tol)


@pytest.mark.parametrize("cuts", [(100, 250), (1, 2), (7, 300), (2, 3)])
def test_chunked_prompt_equals_whole_on_kernel_path(fp32, cuts):
    ids = _ids(2, 333, 2)
    a, b = cuts
    with torch.no_grad():
        whole = fp32(ids)
        cache = make_cache(fp32.config, 2, dtype=torch.float32, device="cuda")
        parts = torch.cat([fp32(ids[:, :a], cache), fp32(ids[:, a:b], cache), fp32(ids[:, b:], cache)], 1)
    _close(parts, whole, 1e-4)


def test_long_prompt_on_the_triton_kernels(fp32):
    # 9000 tokens at once, and in chunks of 3000 (our scan from a start state, attention after cached keys)
    ids = _ids(1, 9000, 8)
    with torch.no_grad():
        whole = fp32(ids)
        cache = make_cache(fp32.config, 1, dtype=torch.float32, device="cuda")
        parts = torch.cat([fp32(ids[:, a:a + 3000], cache) for a in (0, 3000, 6000)], 1)
        with kernels.using(TORCH):
            plain = fp32(ids)
    _close(parts, whole, 1e-4)
    _close(whole, plain, 2e-3)


@pytest.mark.parametrize("batch, options", [(2, KernelOptions(gemv_linears=False)), (2, OURS), (2, COMPILED),
                                           (1, KernelOptions(gemv_linears=False)), (1, KernelOptions())])
def test_decode_equals_whole_prompt_on_kernel_path(fp32, batch, options):
    # batch 1 takes the one-token kernels (fused dense MLP, optionally our GEMV for every linear); batch 2
    # our fused Mamba step or mamba-ssm's
    ids = _ids(batch, 40, 1)
    with torch.no_grad(), kernels.using(options):
        whole = fp32(ids)
        cache = make_cache(fp32.config, batch, dtype=torch.float32, device="cuda")
        steps = [fp32(ids[:, :20], cache)] + [fp32(ids[:, t:t + 1], cache) for t in range(20, 40)]
    _close(torch.cat(steps, 1), whole, 1e-4)


@pytest.mark.parametrize("batch, pdl", [(2, False), (1, False), (1, True)])
def test_graph_decode_equals_eager_decode(bf16, batch, pdl):
    # with programmatic dependent launch the kernels overlap their starts, never their arithmetic
    ids = _ids(batch, 50, 3)
    with torch.no_grad():
        caches = [make_cache(bf16.config, batch, dtype=torch.bfloat16, device="cuda", capacity=64, static=True)
                  for _ in range(2)]
        for cache in caches:
            bf16(ids[:, :30], cache)
        with kernels.using(KernelOptions(pdl=pdl)):  # the graph keeps the launches it was captured with
            step = CUDAGraphDecoder(bf16, caches[1])
        for t in range(30, 50):
            got = step(ids[:, t])
            with kernels.using(KernelOptions(pdl=False)):
                want = bf16(ids[:, t:t + 1], caches[0])[:, -1]
            assert torch.equal(got, want), t
    assert caches[1].offset == caches[0].offset == 50 and caches[1].pos.item() == 50


def test_greedy_generation_with_graphs_matches_without(bf16):
    prompt = _ids(1, 16, 4)[0]
    with_graph = [int(t) for t in generate_step(bf16, prompt, max_tokens=24)]
    without = [int(t) for t in generate_step(bf16, prompt, max_tokens=24, cuda_graph=False)]
    assert with_graph == without


def test_moe_kernels_agree(bf16):
    from jamba_cli.kernels.triton import gemv

    experts = bf16.model.layers[1].feed_forward.experts
    g = torch.Generator(device="cuda").manual_seed(5)
    for t in (1, 3, 8, 40):
        x = torch.randn(t, bf16.config.hidden_size, device="cuda", generator=g).bfloat16()
        logits = torch.randn(t, 4, device="cuda", generator=g).bfloat16().float()
        w, idx = logits.softmax(-1).topk(2)
        w = w.bfloat16()
        loop = reference.experts_loop(x, idx, w, experts.expert)
        _close(kernels.grouped_experts(x, idx, w, experts.gate_up_proj, experts.down_proj), loop, 1e-2)
        if t <= 8:  # the decode kernels, routing from the logits themselves
            i = experts.down_proj.shape[-1]
            fused = gemv.swiglu_mlp(x, experts.gate_up_proj[:, :i], experts.gate_up_proj[:, i:],
                                    experts.down_proj, logits, 2)
            _close(fused, loop, 1e-2)


def test_kernel_path_close_to_transformers_on_gpu(gpu_ckpt, bf16, fp32):
    reference = gpu_ckpt[1]
    ids = _ids(1, 64, 6)
    with torch.no_grad():
        want32 = copy.deepcopy(reference).to("cuda")(ids).logits
        want16 = copy.deepcopy(reference).to("cuda", torch.bfloat16)(ids).logits
        got32, got16 = fp32(ids), bf16(ids)
    _close(got32, want32, 2e-3)
    hf_bf16_error = ((want16.float() - want32).norm() / want32.norm()).item()
    _close(got16, want32, 1.5 * hf_bf16_error + 1e-2)


def test_decode_kernels_at_tile_multiples():
    # model sizes that fill whole tiles take the kernels' unmasked (EVEN_K) paths, which tiny models miss
    from jamba_cli.kernels.triton import gemv, ops

    g = torch.Generator(device="cuda").manual_seed(7)
    h, i, x_n = 2048, 3072, 8

    def randn(*shape):
        return (torch.randn(*shape, device="cuda", generator=g) * 0.05).bfloat16()

    x, gate, up, down = randn(1, h), randn(i, h), randn(i, h), randn(h, i)
    want = torch.nn.functional.linear(ops.silu_mul(x @ gate.T, x @ up.T), down)
    _close(gemv.swiglu_mlp(x, gate, up, down), want, 1e-2)
    gu, dn = randn(x_n, 2 * i, h), randn(x_n, h, i)
    logits = torch.randn(1, x_n, device="cuda", generator=g).bfloat16().float()
    w, idx = logits.softmax(-1).topk(2)
    want = sum(w[0, j] * torch.nn.functional.linear(
        ops.silu_mul(x @ gu[idx[0, j], :i].T, x @ gu[idx[0, j], i:].T), dn[idx[0, j]]) for j in range(2))
    got = gemv.swiglu_mlp(x, gu[:, :i], gu[:, i:], dn, logits, 2)
    _close(got, want, 1e-2)
    for n, k in ((4096, 8192), (1024, 4096), (300, 2048)):
        wt, xv = randn(n, k), randn(1, k)
        _close(gemv.gemv(xv, wt, (8, 1024, 4, 3)), xv @ wt.T, 1e-2)


@pytest.mark.parametrize("t, offset", [(5000, 0), (700, 3000), (3, 90)])
def test_prefill_attention_matches_sdpa(t, offset):
    # Jamba-Mini's heads (32 query over 8 K/V, Dh 128), each config: bf16 against torch's FlashAttention on
    # the same inputs, fp32 exactly against the math path
    from torch.nn.attention.bias import causal_lower_right

    from jamba_cli.kernels.triton import attention

    g = torch.Generator(device="cuda").manual_seed(9)
    s = offset + t
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        q = torch.randn(1, t, 32, 128, device="cuda", generator=g).to(dtype).transpose(1, 2)
        k, v = torch.randn(2, 1, s, 8, 128, device="cuda", generator=g).to(dtype).transpose(2, 3)
        mask = causal_lower_right(t, s) if offset else None
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double().repeat_interleave(4, 1), v.double().repeat_interleave(4, 1),
            attn_mask=mask, is_causal=mask is None)
        got = attention.prefill_attention(q, k, v, offset).transpose(1, 2)
        _close(got, ref, tol, str(dtype))


def test_chat_replies_replay_one_graph_and_equal_eager_replies():
    # jamba chat on one GPU: a static cache sized by the context, every reply decoded by replaying the
    # one CUDA graph captured over it (kept across turns, /regen and /clear), the same tokens as a chat
    # on a growing cache decoded eagerly
    from jamba_cli.chat import ChatSession
    from jamba_cli.loader import bundled_model_dir
    from jamba_cli.sample import SamplingParams

    model, tokenizer = load(bundled_model_dir(), dtype="fp32", device="cuda")

    def chat(static):
        s = ChatSession(model, tokenizer, name="bundled", context_size=512,
                        sampling=SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
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


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_mamba_kernels_equal_mamba_ssm_and_causal_conv1d(dtype):
    # Jamba-Mini's channels (E = 8192, N = 16, K = 4) on a prompt that is no multiple of any tile: our conv,
    # scan and decode step against the compiled kernels they replace, from a start state and without
    from jamba_cli.kernels import compiled
    from jamba_cli.kernels.triton import mamba, scan

    g = torch.Generator(device="cuda").manual_seed(11)
    b, e, n, k, t = 2, 8192, 16, 4, 1037

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    tol = 1e-4 if dtype == torch.float32 else 1e-2
    xz = randn(b, 2 * e, t)
    w, bias = randn(e, k, scale=0.5), randn(e, scale=0.1)
    for resume in (False, True):
        s1 = randn(b, e, k - 1)
        s2 = s1.clone()
        _close(mamba.causal_conv1d(xz[:, :e], w, bias, s1, "silu", resume), compiled.causal_conv1d(
            xz[:, :e], w, bias, s2, "silu", resume), tol, "conv")
        assert torch.equal(s1, s2)
    u, z = xz[:, :e] * 0.5, xz[:, e:]
    delta, A = randn(b, e, t, scale=0.5), -torch.exp(torch.randn(e, n, device="cuda", generator=g))
    Bm, Cm, D = randn(b, n, t), randn(b, n, t), randn(e)
    dt_bias = randn(e, scale=0.5) - 2
    for resume in (False, True):
        h1 = torch.randn(b, e, n, device="cuda", generator=g)
        h2 = h1.clone()
        _close(scan.selective_scan(u, delta, A, Bm, Cm, D, z, dt_bias, h1, resume),
               compiled.selective_scan(u, delta, A, Bm, Cm, D, z, dt_bias, h2, resume), tol, "scan")
        _close(h1, h2, 1e-4, "scan state")
    r = 256
    x_proj, dt_proj = randn(r + 2 * n, e, scale=0.02), randn(e, r, scale=0.05)
    norms = [1 + randn(m, scale=0.1) for m in (r, n, n)]
    conv1, ssm1 = randn(b, e, k - 1), torch.randn(b, e, n, device="cuda", generator=g)
    conv2, ssm2 = conv1.clone(), ssm1.clone()
    xz1 = randn(b, 2 * e)
    ours = mamba.mamba_step(xz1, conv1, w, bias, x_proj, *norms, 1e-6, dt_proj, dt_bias, A, D, ssm1)
    theirs = reference.mamba_step(xz1, conv2, w, bias, x_proj, *norms, 1e-6, dt_proj, dt_bias, A, D, ssm2,
                                  norm=kernels.rms_norm, conv_update=compiled.causal_conv1d_update,
                                  state_update=compiled.selective_state_update)
    _close(ours, theirs, tol, "step")
    _close(ssm1, ssm2, 1e-4 if dtype == torch.float32 else 1e-3, "step state")
    assert torch.equal(conv1, conv2)


def test_model_without_the_compiled_kernels_equals_with_them(bf16):
    # what `pip install jamba-cli` runs on a GPU box without the [kernels] extra: our kernels everywhere
    ids = _ids(2, 60, 12)

    def run(options):
        with torch.no_grad(), kernels.using(options):
            cache = make_cache(bf16.config, 2, dtype=torch.bfloat16, device="cuda")
            out = [bf16(ids[:, :40], cache)] + [bf16(ids[:, t:t + 1], cache) for t in range(40, 60)]
        return torch.cat(out, 1)

    _close(run(OURS), run(COMPILED), 1e-2)


# -- our 8-bit layers (quant8.py) on the GPU: the kernels that read them against the dequantized weights --

FP8 = kernels.fp8_supported("cuda") if torch.cuda.is_available() else False
FORMATS = ["int8", pytest.param("fp8", marks=pytest.mark.skipif(not FP8, reason="needs float8 (sm89+)"))]


@pytest.fixture(scope="module")
def eight_bit(gpu_ckpt):
    return {fmt: load(gpu_ckpt[0], dtype="bf16", device="cuda", quant=fmt)[0]
            for fmt in ("int8", "fp8") if fmt == "int8" or FP8}


def _dequantized(model):
    """A bf16 copy of `model` whose 8-bit layers are plain layers holding the dequantized weights."""
    from jamba_cli.model import Experts, Linear
    from jamba_cli.quant8 import Experts8, Linear8, dequantize

    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        parent, _, attr = name.rpartition(".")
        if isinstance(module, Linear8):
            new = Linear(module.in_features, module.out_features, bias=False, device="cuda", dtype=torch.bfloat16)
            new.weight.data = dequantize(module.weight, module.weight_scale, torch.bfloat16)
        elif isinstance(module, Experts8):
            new = Experts(plain.config).to(device="cuda", dtype=torch.bfloat16)
            new.gate_up_proj.data = dequantize(module.gate_up_proj, module.gate_up_scale, torch.bfloat16)
            new.down_proj.data = dequantize(module.down_proj, module.down_scale, torch.bfloat16)
        else:
            continue
        setattr(plain.get_submodule(parent), attr, new)
    return plain


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("t", [1, 5, 300])  # the GEMVs (decode, a few tokens), the GEMMs (a prompt)
def test_8bit_kernels_equal_the_dequantized_weights(eight_bit, fmt, t):
    model = eight_bit[fmt]
    plain = _dequantized(model)
    ids = _ids(2, t, 11)
    with torch.no_grad():
        got = model(ids)
        with kernels.using(TORCH):
            want = plain(ids)
    # fp8 prompts also round the activations to e4m3 (per token): a coarser match there
    _close(got, want, 0.1 if fmt == "fp8" and t > 8 else 3e-2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_8bit_close_to_bf16(eight_bit, bf16, fmt):
    ids = _ids(1, 200, 12)
    with torch.no_grad():
        got, want = eight_bit[fmt](ids)[0, -1].float(), bf16(ids)[0, -1].float()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99


@pytest.mark.parametrize("fmt", FORMATS)
def test_8bit_graph_decode_equals_eager(eight_bit, fmt):
    model = eight_bit[fmt]
    ids = _ids(1, 50, 13)
    with torch.no_grad():
        caches = [make_cache(model.config, 1, dtype=torch.bfloat16, device="cuda", capacity=64, static=True)
                  for _ in range(2)]
        for cache in caches:
            model(ids[:, :30], cache)
        step = CUDAGraphDecoder(model, caches[1])
        for t in range(30, 50):
            got = step(ids[:, t])
            want = model(ids[:, t:t + 1], caches[0])[:, -1]
            assert torch.equal(got, want), t


@pytest.mark.parametrize("fmt", FORMATS)
def test_8bit_chunked_prefill_equals_whole(eight_bit, fmt):
    model = eight_bit[fmt]
    ids = _ids(2, 333, 14)
    with torch.no_grad():
        whole = model(ids)
        cache = make_cache(model.config, 2, dtype=torch.bfloat16, device="cuda")
        parts = torch.cat([model(ids[:, :100], cache), model(ids[:, 100:250], cache), model(ids[:, 250:], cache)], 1)
    # fp8 scales each token's activations alone, so chunking changes nothing there either
    _close(parts, whole, 3e-2)


def test_8bit_generation_uses_the_graph_and_matches_eager(eight_bit):
    model = eight_bit["int8"]
    prompt = _ids(1, 16, 15)[0]
    with_graph = [int(t) for t in generate_step(model, prompt, max_tokens=24)]
    without = [int(t) for t in generate_step(model, prompt, max_tokens=24, cuda_graph=False)]
    assert with_graph == without
