"""The attention kernels (jamba_cli/triton_attention.py) against the model's PyTorch paths, run on the CPU
through Triton's interpreter: the fused decode step, and causal prefill.

The interpreter must be chosen before triton compiles anything, so the checks run in a fresh process.
They use fp32: the interpreter truncates fp32 -> bf16 casts instead of rounding them, so the model
dtype's roundings can only be compared on a GPU (benchmarks/bench_attention.py does).
"""

from conftest import interpret

CODE = r'''
import torch
from jamba_cli.model import _decode_attention
from jamba_cli.triton_attention import decode_attention

def reference(q, k_new, v_new, cache_k, cache_v, pos, key_mask):
    # the static-cache decode branch of model.Attention.forward
    cache_k.index_copy_(2, pos, k_new[:, :, None])
    cache_v.index_copy_(2, pos, v_new[:, :, None])
    valid = torch.arange(cache_k.shape[2]) <= pos
    return _decode_attention(q[:, :, None], cache_k, cache_v, valid if key_mask is None else valid & key_mask)[:, :, 0]

g = torch.Generator().manual_seed(0)
B, A, G, D, C = 2, 8, 2, 32, 50
cases = 0
for p in (0, 17, C - 1):
    for masked in (False, True):
        for n_splits in (None, 1, 3, 7):  # 7 splits of 8-position blocks: some get no positions
            ck, cv = torch.randn(2, B, G, C, D, generator=g)
            k_new, v_new = torch.randn(2, B, G, D, generator=g)
            # q as the model makes it: a (B, A, 1, Dh) view of a (B, 1, A, Dh) projection
            q = torch.randn(B, 1, A, D, generator=g).transpose(1, 2)
            key_mask = None
            if masked:
                key_mask = torch.rand(B, C, generator=g) > 0.3
                key_mask[1, :16] = False  # whole blocks of padding: splits that see no position at all
                key_mask[:, p] = True  # the token being decoded is real
            pos = torch.tensor([p])
            ref_k, ref_v = ck.clone(), cv.clone()
            ref = reference(q[:, :, 0], k_new, v_new, ref_k, ref_v, pos, key_mask)
            out = decode_attention(q, k_new, v_new, ck, cv, pos, key_mask, config=(8, 1, 1, 2), n_splits=n_splits)
            assert out.shape == (B, A, D) and out.dtype == q.dtype
            err = (out - ref).abs().max().item()
            assert err < 1e-5, (p, masked, n_splits, err)
            # written at pos, untouched elsewhere
            assert torch.equal(ck, ref_k) and torch.equal(cv, ref_v), (p, masked, n_splits)
            cases += 1

# one pos tensor advanced in place between calls, as a replayed CUDA graph sees it
ck, cv = torch.zeros(2, 1, 1, C, D)
pos = torch.tensor([0])
for step in range(3):
    v_new = torch.full((1, 1, D), step + 1.0)
    out = decode_attention(torch.ones(1, 2, D), torch.zeros(1, 1, D), v_new, ck, cv, pos, config=(16, 1, 1, 1))
    assert torch.allclose(out, torch.full((1, 2, D), (step + 2) / 2))  # equal scores: the mean of 1..step+1
    pos.add_(1)
assert (cv[0, 0, :3, 0] == torch.tensor([1.0, 2.0, 3.0])).all() and (cv[0, 0, 3:] == 0).all()
print("ok", cases)
'''


def test_decode_attention_matches_the_torch_path_in_the_interpreter():
    assert interpret("-c", CODE) == "ok 24"


PREFILL = r'''
import torch, torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from jamba_cli.triton_attention import prefill_attention

g = torch.Generator().manual_seed(1)
cases = 0
# (B, A, G, T, offset, Dh): T and the key count no multiple of the blocks; GQA, MQA and MHA; a cached prefix
for b, a, g_, t, offset, d in [(2, 4, 2, 37, 0, 16), (1, 4, 1, 21, 13, 32), (1, 2, 2, 16, 0, 16), (1, 4, 2, 9, 40, 16)]:
    s = offset + t
    # q, k, v as the model makes them: (B, T, heads, Dh) projections seen as (B, heads, T, Dh)
    q = torch.randn(b, t, a, d, generator=g).transpose(1, 2)
    k, v = torch.randn(2, b, s, g_, d, generator=g).transpose(2, 3)
    out = prefill_attention(q, k, v, offset, config=(16, 8, 1, 1))
    assert out.shape == (b, t, a, d)
    mask = causal_lower_right(t, s) if offset else None
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(a // g_, 1), v.repeat_interleave(a // g_, 1),
                                         attn_mask=mask, is_causal=mask is None)
    err = (out.transpose(1, 2) - ref).abs().max().item()
    assert err < 1e-5, (b, a, g_, t, offset, err)
    cases += 1
print("ok", cases)
'''


def test_prefill_attention_matches_sdpa_in_the_interpreter():
    assert interpret("-c", PREFILL) == "ok 4"
