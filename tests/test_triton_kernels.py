"""Each of our Triton kernels against the PyTorch reference of the same name (`jamba_cli/kernels/reference.py`).

On a machine without a GPU they run on the CPU in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1
before anything imports Triton); on a GPU they run compiled. Sizes are small and odd so that masks, tails
and partly empty blocks are exercised. The checks use fp32: the interpreter truncates fp32 -> bf16 casts
instead of rounding them, so the model dtype's roundings are compared on a GPU (tests/test_gpu.py).
(Speeds: benchmarks/bench_kernels.py, bench_scan.py, bench_attention.py.)
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, assert_close

pytest.importorskip("triton")

from jamba_cli.kernels import reference as R  # noqa: E402
from jamba_cli.kernels.triton import attention, gemv, mamba, ops, scan  # noqa: E402


@pytest.fixture
def randn():
    g = torch.Generator().manual_seed(0)
    return lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)


def test_rms_norm_of_strided_rows(randn):
    x = randn(3, 5, 40)
    rows, w = x[..., 8:32], randn(24)  # rows of a wider tensor, as the dt/B/C slices of x_proj's output
    assert_close(ops.rms_norm(rows, w, 1e-6), R.rms_norm(rows, w, 1e-6))


def test_add_rms_norm(randn):
    h, y, w = randn(7, 40), randn(7, 40), randn(40)
    total, normed = ops.add_rms_norm(h, y, w, 1e-6)
    want_total, want_normed = R.add_rms_norm(h, y, w, 1e-6)
    assert_close(total, want_total)
    assert_close(normed, want_normed)


def test_silu_mul_of_the_halves_of_one_product(randn):
    gate, up = randn(7, 2, 50).unbind(1)
    assert_close(ops.silu_mul(gate, up), R.silu_mul(gate, up))


def test_moe_combine(randn):
    t, k, h = 9, 2, 40
    idx = torch.randint(0, 4, (t, k), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    order = idx.flatten().argsort(stable=True)
    y, w = randn(t * k, h), randn(t, k).softmax(-1)
    assert_close(ops.moe_combine(y, order, w), R.moe_combine(y, order, w))


@pytest.mark.parametrize("k", [40, 64])  # a tail after the last whole K block, and none
def test_gemv(randn, k):
    x, w = randn(3, k), randn(37, k)
    assert_close(gemv.gemv(x, w, config=(8, 32, 1, 1)), F.linear(x, w))


def _8bit(w, fmt="int8"):
    from jamba_cli.quant8 import quantize_rows

    return quantize_rows(w, fmt)


@pytest.mark.parametrize("k", [40, 64])
def test_gemv_of_int8_weights_scales_in_the_epilogue(randn, k):
    x = randn(3, k)
    q, s = _8bit(randn(37, k))
    assert_close(gemv.gemv(x, q, config=(8, 32, 1, 1), scale=s), R.linear8(x, q, s))


def test_swiglu_of_routed_int8_experts(randn):
    t, h, i, x_, k = 3, 40, 24, 5, 2
    x, logits = randn(t, h), randn(t, x_)
    (gate_up, gu_s), (down, d_s) = _8bit(randn(x_, 2 * i, h)), _8bit(randn(x_, h, i))
    scales = (gu_s[:, :i], gu_s[:, i:], d_s)
    got = gemv.swiglu_mlp(x, gate_up[:, :i], gate_up[:, i:], down, logits, k,
                          configs=((16, 16, 1, 1), (16, 32, 1, 1)), scales=scales)
    want = R.swiglu_mlp(x, gate_up[:, :i].float() * scales[0][..., None], gate_up[:, i:].float() * scales[1][..., None],
                        down.float() * d_s[..., None], logits, k)
    assert_close(got, want)


def test_swiglu_dense_int8(randn):
    x = randn(1, 40)
    (gate, gs), (up, us), (down, ds) = _8bit(randn(24, 40)), _8bit(randn(24, 40)), _8bit(randn(40, 24))
    got = gemv.swiglu_mlp(x, gate, up, down, configs=((8, 16, 1, 1), (8, 16, 1, 1)), scales=(gs, us, ds))
    want = R.swiglu_mlp(x, gate.float() * gs[:, None], up.float() * us[:, None], down.float() * ds[:, None])
    assert_close(got, want)


def test_router_logits(randn):
    x, router = randn(3, 32), randn(5, 32)
    assert_close(gemv.router_logits(x, router), R.router_logits(x, router))


def test_swiglu_of_routed_experts_reads_the_chosen_ones(randn):
    n_exp, i, h, t, k = 5, 48, 32, 3, 2
    gate_up, down, x, router = randn(n_exp, 2 * i, h), randn(n_exp, h, i), randn(t, h), randn(n_exp, h)
    logits = R.router_logits(x, router)
    got = gemv.swiglu_mlp(x, gate_up[:, :i], gate_up[:, i:], down, logits, k, configs=((16, 16, 1, 1), (16, 32, 1, 1)))
    assert_close(got, R.swiglu_mlp(x, gate_up[:, :i], gate_up[:, i:], down, logits, k))


@pytest.mark.parametrize("i, h", [(48, 40), (64, 32)])  # K tails, and K a multiple of BLOCK_K
def test_swiglu_dense(randn, i, h):
    gate, up, down, x = randn(i, h), randn(i, h), randn(h, i), randn(1, h)
    got = gemv.swiglu_mlp(x, gate, up, down, configs=((8, 16, 1, 1), (8, 16, 1, 1)))
    assert_close(got, R.swiglu_mlp(x, gate, up, down))


@pytest.mark.parametrize("tile", [(16, (8, 16, 1, 1), 8), (64, (4, 64, 1, 1), 64)])  # many programs, one
def test_mamba_step(randn, tile):
    b, e, n, r, k = 2, 40, 8, 7, 4
    xz = randn(b, 2 * e)
    conv_w, conv_b = randn(e, k), randn(e)
    x_proj, dt_proj, dt_bias = randn(r + 2 * n, e) * 0.2, randn(e, r) * 0.3, randn(e)
    norms = [1 + 0.1 * randn(m) for m in (r, n, n)]
    A, D = -torch.exp(randn(e, n)), randn(e)
    conv0, ssm0 = randn(b, e, k - 1), randn(b, e, n)
    conv, ssm = conv0.clone(), ssm0.clone()
    want = R.mamba_step(xz, conv, conv_w, conv_b, x_proj, *norms, 1e-6, dt_proj, dt_bias, A, D, ssm)
    conv2, ssm2 = conv0.clone(), ssm0.clone()
    got = mamba.mamba_step(xz, conv2, conv_w, conv_b, x_proj, *norms, 1e-6, dt_proj, dt_bias, A, D, ssm2, config=tile)
    assert_close(got, want)
    assert_close(ssm2, ssm)
    assert torch.equal(conv2, conv)


@pytest.mark.parametrize("t, with_state, resume, length, bias", [
    (37, False, True, None, True),  # no cache
    (37, True, True, None, False),  # continues from the cached inputs
    (2, True, True, None, True),  # shorter than the kernel: the new state reaches into the old one
    (40, True, False, 33, True),  # a padded prompt into a fresh state: the state keeps the real tail
])
def test_causal_conv1d(randn, t, with_state, resume, length, bias):
    b, e, k = 2, 12, 4
    xz = randn(b, 2 * e, t)
    x = xz[:, :e]  # a row-strided half, as the model passes u
    w, bias_ = randn(e, k), (randn(e) if bias else None)
    state0 = randn(b, e, k - 1) if with_state else None
    want_state = None if state0 is None else state0.clone()
    want = R.causal_conv1d(x, w, bias_, want_state, "silu", resume, length)
    state = None if state0 is None else state0.clone()
    assert_close(mamba.causal_conv1d(x, w, bias_, state, "silu", resume, length, tile=(4, 16, 1)), want)
    if state is not None:
        assert torch.equal(state, want_state)


def _scan_inputs(randn, b, e, t, n):
    xz = randn(b, 2 * e, t)  # u and z are row-strided halves, as in the model
    bc = randn(b, t, 2 * n + 3)  # B and C: (B, N, T) views with stride(-1) = 2N + 3
    return (xz[:, :e], randn(b, e, t) * 0.5, -torch.exp(randn(e, n)), bc[..., 3:3 + n].transpose(1, 2),
            bc[..., 3 + n:].transpose(1, 2), randn(e), xz[:, e:], randn(e) * 0.5 - 1)


@pytest.mark.parametrize("b, e, t, n, with_state, gated, tile", [
    (2, 12, 100, 4, False, True, dict(block_e=8, block_t=32)),  # T no multiple of the tile, E of the block
    (1, 12, 100, 16, True, True, {}),  # the GPU's tile and the model's N
    (2, 12, 100, 4, True, False, dict(block_e=16, block_t=8, num_warps=1, stages=1)),  # no gate
    (1, 16, 48, 16, True, True, {}),  # whole tiles and channel blocks only: no bounds checks anywhere
])
def test_selective_scan(randn, b, e, t, n, with_state, gated, tile):
    u, delta, A, Bm, Cm, D, z, bias = _scan_inputs(randn, b, e, t, n)
    h0 = randn(b, e, n) if with_state else torch.zeros(b, e, n, device=DEVICE)
    want_state = h0.clone()
    want = R.selective_scan(u, delta, A, Bm, Cm, D, z, bias, want_state, resume=True)
    state = h0.clone()
    got = scan.selective_scan(u, delta, A, Bm, Cm, D, z if gated else None, bias, state, resume=True, **tile)
    if not gated:
        got = got * F.silu(z)
    assert_close(got, want)
    assert_close(state, want_state)


def test_initial_state_term(randn):
    # what a start state h0 adds to the output of a scan run from zero (mamba-ssm's scan takes none)
    b, e, n, t = 2, 24, 16, 100
    y0, zf, h0 = randn(b, e, t), randn(b, t, 2 * e), randn(b, e, n)
    cum = torch.rand(b, e, t, generator=torch.Generator().manual_seed(2)).to(DEVICE).cumsum(-1) * 0.1
    A, Cf = -torch.exp(randn(e, n)), randn(b, t, 5 + 2 * n)
    z, Cm = zf[..., e:].transpose(1, 2), Cf[..., 5 + n:].transpose(1, 2)  # strided, as the model passes them
    want = (y0 + torch.einsum("betn,ben,bnt->bet", torch.exp(cum[..., None] * A[:, None]), h0, Cm)) * F.silu(z)
    assert_close(scan.add_initial_state(y0, z, cum, A, Cm, h0), want)


@pytest.mark.parametrize("p", [0, 17, 49])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n_splits", [None, 1, 3, 7])  # 7 splits of 16-position blocks: some get no positions
def test_decode_attention(randn, p, masked, n_splits):
    b, a, g, d, cap = 2, 8, 2, 32, 50
    ck, cv = randn(2, b, g, cap, d)
    k_new, v_new = randn(2, b, g, 1, d)
    q = randn(b, 1, a, d).transpose(1, 2)  # as the model makes it: a (B, A, 1, Dh) view of (B, 1, A, Dh)
    key_mask = None
    if masked:
        key_mask = torch.rand(b, cap, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.3
        key_mask[1, :16] = False  # whole blocks of padding: splits that see no position at all
        key_mask[:, p] = True  # the token being decoded is real
    pos = torch.tensor([p], device=DEVICE)
    want_k, want_v = ck.clone(), cv.clone()
    want = R.decode_attention(q, k_new, v_new, want_k, want_v, pos, key_mask)
    # 16 positions a block: the smallest a GPU's dot product takes
    got = attention.decode_attention(q, k_new, v_new, ck, cv, pos, key_mask, config=(16, 1, 1, 2), n_splits=n_splits)
    assert got.shape == (b, a, d) and got.dtype == q.dtype
    assert_close(got, want)
    assert torch.equal(ck, want_k) and torch.equal(cv, want_v)  # written at pos, untouched elsewhere


def test_decode_attention_follows_a_position_advanced_in_place():
    # one pos tensor advanced between calls, as a replayed CUDA graph sees it
    d = 32
    ck, cv = torch.zeros(2, 1, 1, 50, d, device=DEVICE)
    pos = torch.tensor([0], device=DEVICE)
    for step in range(3):
        v_new = torch.full((1, 1, d), step + 1.0, device=DEVICE)
        out = attention.decode_attention(torch.ones(1, 2, d, device=DEVICE), torch.zeros(1, 1, d, device=DEVICE),
                                         v_new, ck, cv, pos, config=(16, 1, 1, 1))
        assert_close(out, torch.full((1, 2, d), (step + 2) / 2))  # equal scores: the mean of 1..step+1
        pos.add_(1)
    assert torch.equal(cv[0, 0, :4, 0].cpu(), torch.tensor([1.0, 2.0, 3.0, 0.0]))


# (B, A, G, T, offset, Dh): T and the key count no multiple of the blocks; GQA, MQA and MHA; a cached prefix
@pytest.mark.parametrize("b, a, g, t, offset, d", [(2, 4, 2, 37, 0, 16), (1, 4, 1, 21, 13, 32), (1, 2, 2, 16, 0, 16),
                                                   (1, 4, 2, 9, 40, 16)])
def test_prefill_attention(randn, b, a, g, t, offset, d):
    s = offset + t
    q = randn(b, t, a, d).transpose(1, 2)  # as the model makes them: (B, T, heads, Dh) seen as (B, heads, T, Dh)
    k, v = randn(2, b, s, g, d).transpose(2, 3)
    got = attention.prefill_attention(q, k, v, offset, config=(16, 16, 1, 1))  # a GPU dot takes K >= 16
    assert got.shape == (b, t, a, d)
    assert_close(got, R.prefill_attention(q, k, v, offset))


@pytest.mark.skipif(DEVICE != "cuda", reason="float8 stores need a GPU (the interpreter has no float8)")
def test_quantize_tokens_fp8_equals_the_pytorch_steps(randn):
    x = randn(37, 1000) * torch.logspace(-2, 2, 37, device=DEVICE)[:, None]
    x[3] = 0
    q, s = ops.quantize_tokens_fp8(x)
    s_ref = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 448.0
    q_ref = (x.float() / s_ref).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert_close(s, s_ref, 1e-6)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
