"""Attention kernels: a fused decode step over a static K/V cache, and causal prefill (flash attention).

One decode step of an attention layer becomes two kernels: the first writes the new K/V row at the
device position `pos` and computes, per (sequence, K/V head, split of positions), a partial softmax for
all A/G query heads of that group, reading each K/V row once; the second merges the splits. `pos` is
read inside the kernels and the grid depends only on shapes, so a CUDA graph can capture a step and
replay it as `pos` advances.

Rounding mirrors `reference.decode_attention`: q·k accumulates in fp32 and is rounded to the model dtype,
scaled by 1/sqrt(Dh) and rounded again; softmax runs in fp32; the probabilities are rounded to the model
dtype before the product with V, which accumulates in fp32. One difference: a split rounds
exp(score - its running max) rather than the normalised probability (the normaliser is only known after
the combine), a relative rounding of the same size, so results agree to the model dtype's precision.

Prefill (T > 1 new tokens, causal, after `offset` cached ones) is FlashAttention's online softmax in one
kernel: a program takes BLOCK_M queries of one head and walks the key blocks up to its diagonal, the
blocks wholly below it without a mask; grouped query heads read their K/V head in place (no repeat).
Scores and the running softmax are fp32, the probabilities meet V in the model dtype, as in
FlashAttention-2. The output is written (B, T, A, Dh), the layout o_proj reads with no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import current
from .launch import pdl, pdl_enter, sm_count


@triton.jit
def _split_kernel(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, pos_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
                  G, D, n_splits, scale, sq_b, sq_a, skn_b, skn_g, svn_b, svn_g,
                  sk_b, sk_g, sk_s, sv_b, sv_g, sv_s, smask_b,
                  HPG: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = (bg // G).to(tl.int64)
    g = (bg % G).to(tl.int64)
    dt = k_ptr.dtype.element_ty
    pos = tl.load(pos_ptr).to(tl.int64)
    hs = tl.arange(0, BLOCK_H)  # query heads g·HPG ... of this group, padded to a dot-friendly size
    ds = tl.arange(0, BLOCK_D)
    h_ok, d_ok = hs < HPG, ds < D
    q = tl.load(q_ptr + b * sq_b + (g * HPG + hs)[:, None] * sq_a + ds[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    kn = tl.load(kn_ptr + b * skn_b + g * skn_g + ds, mask=d_ok, other=0.0)
    vn = tl.load(vn_ptr + b * svn_b + g * svn_g + ds, mask=d_ok, other=0.0)
    k_row = k_ptr + b * sk_b + g * sk_g
    v_row = v_ptr + b * sv_b + g * sv_g
    if split == 0:
        tl.store(k_row + pos * sk_s + ds, kn, mask=d_ok)
        tl.store(v_row + pos * sv_s + ds, vn, mask=d_ok)
    # positions 0..pos, cut into n_splits runs of whole blocks; trailing splits may get none
    n = pos + 1
    chunk = tl.cdiv(tl.cdiv(n, n_splits), BLOCK_S) * BLOCK_S
    start = split * chunk
    end = tl.minimum(start + chunk, n)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for s0 in range(start, end, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < end
        kv_ok = s_ok[:, None] & d_ok[None, :]
        k = tl.load(k_row + ss[:, None] * sk_s + ds[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_row + ss[:, None] * sv_s + ds[None, :], mask=kv_ok, other=0.0)
        # the row at pos comes from registers: split 0's store need not be visible to this program
        new = (ss == pos)[:, None]
        k = tl.where(new, kn[None, :], k)
        v = tl.where(new, vn[None, :], v)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BLOCK_H, BLOCK_S), fp32
        s = (s.to(dt).to(tl.float32) * scale).to(dt).to(tl.float32)
        ok = s_ok
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * smask_b + ss, mask=s_ok, other=0) != 0)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp() finite
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC)
        m_i = m_new
    rows = (b * G + g) * HPG + hs  # query head index over (B, A)
    tl.store(m_ptr + rows * n_splits + split, m_i, mask=h_ok)
    tl.store(l_ptr + rows * n_splits + split, l_i, mask=h_ok)
    tl.store(acc_ptr + (rows * n_splits + split)[:, None] * D + ds[None, :], acc,
             mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, D, n_splits,
                    BLOCK_SPLITS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)  # one (sequence, query head)
    sp = tl.arange(0, BLOCK_SPLITS)
    m = tl.load(m_ptr + row * n_splits + sp, mask=sp < n_splits, other=float("-inf"))
    m_max = tl.max(m, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    l = tl.load(l_ptr + row * n_splits + sp, mask=sp < n_splits, other=0.0)
    total = tl.sum(l * tl.exp(m - m_ref), 0)  # 0 only if every position is masked: NaN, as torch gives
    ds = tl.arange(0, BLOCK_D)
    out = tl.zeros((BLOCK_D,), tl.float32)
    for c0 in range(0, n_splits, CHUNK):  # bounded register tile however many splits there are
        cs = c0 + tl.arange(0, CHUNK)
        c_ok = cs < n_splits
        w = tl.exp(tl.load(m_ptr + row * n_splits + cs, mask=c_ok, other=float("-inf")) - m_ref)
        a = tl.load(acc_ptr + (row * n_splits + cs)[:, None] * D + ds[None, :],
                    mask=c_ok[:, None] & (ds < D)[None, :], other=0.0)
        out += tl.sum(a * w[:, None], 0)
    tl.store(out_ptr + row * D + ds, (out / total).to(out_ptr.dtype.element_ty), mask=ds < D)


# (BLOCK_S, num_warps, num_stages, programs per SM): the fastest in benchmarks/bench_attention.py's sweep
# (results/attention_h200.json)
DECODE_TILE = (64, 4, 2, 4)


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor | None = None,
                     config: tuple[int, int, int, int] | None = None, n_splits: int | None = None) -> torch.Tensor:
    """Write k_new/v_new into the cache at `pos`, then attend the queries to positions 0..pos.

    Args:
        q: (B, A, Dh) queries of one decode step (a (B, A, 1, Dh) view is accepted too).
        k_new, v_new: (B, G, Dh) (or (B, G, 1, Dh)) this step's keys and values; A must be a multiple of G.
        cache_k, cache_v: (B, G, capacity, Dh) static cache buffers, updated in place.
        pos: (1,) integer device tensor, the position being written; never read on the host.
        key_mask: optional (B, capacity) bool, False at padding positions.
        config: (BLOCK_S, num_warps, num_stages, programs per SM) override, for benchmarks.
        n_splits: number of position splits per (sequence, K/V head), overriding the config's choice.

    Returns:
        (B, A, Dh) attention output in q's dtype (not yet through o_proj).
    """
    b, g, cap, d = cache_k.shape
    a = q.shape[1]
    q, k_new, v_new = q.reshape(b, a, d), k_new.reshape(b, g, d), v_new.reshape(b, g, d)
    if a % g:
        raise ValueError(f"{a} query heads do not split into {g} K/V groups")
    if cache_k.stride(-1) != 1 or cache_v.stride(-1) != 1:
        raise ValueError("cache_k and cache_v need a contiguous last dim")
    q, k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_new, v_new))
    hpg = a // g
    block_s, warps, stages, per_sm = config or current().tile("attention_decode", DECODE_TILE)
    if n_splits is None:
        n_splits = triton.cdiv(per_sm * sm_count(q.device), b * g)
    n_splits = max(1, min(n_splits, triton.cdiv(cap, block_s)))
    m = torch.empty(b * a, n_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(b * a, n_splits, d, dtype=torch.float32, device=q.device)
    if key_mask is not None and key_mask.stride(-1) != 1:
        key_mask = key_mask.contiguous()
    mask = key_mask.view(torch.uint8) if key_mask is not None else pos  # pos: an unread placeholder
    block_d = max(16, triton.next_power_of_2(d))
    use_pdl = pdl() and b == 1
    _split_kernel[(b * g, n_splits)](
        q, k_new, v_new, cache_k, cache_v, pos, mask, m, l, acc, g, d, n_splits, d ** -0.5,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        key_mask.stride(0) if key_mask is not None else 0,
        HPG=hpg, HAS_MASK=key_mask is not None,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 dots exact, as torch's matmul is
        BLOCK_H=max(16, triton.next_power_of_2(hpg)), BLOCK_S=block_s, BLOCK_D=block_d, USE_PDL=use_pdl,
        num_warps=warps, num_stages=stages, launch_pdl=use_pdl)
    out = torch.empty(b, a, d, dtype=q.dtype, device=q.device)
    _combine_kernel[(b * a,)](m, l, acc, out, d, n_splits, BLOCK_SPLITS=triton.next_power_of_2(n_splits),
                              CHUNK=16, BLOCK_D=block_d, USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return out


# ------------------------------------------------------------------------------------------ prefill

@triton.jit
def _prefill_block(q, acc, m_i, l_i, k_rows, v_rows, rows, ds, s0, S, OFFSET, qk_scale, sk_s, sv_s,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    # one block of keys s0..s0+BLOCK_N for BLOCK_M query rows: the online-softmax update
    ss = s0 + tl.arange(0, BLOCK_N)
    if MASKED:  # the diagonal: causal (key <= the query's position) and the end of the keys
        k = tl.load(k_rows + ss[:, None] * sk_s + ds[None, :], mask=(ss < S)[:, None], other=0.0)
        v = tl.load(v_rows + ss[:, None] * sv_s + ds[None, :], mask=(ss < S)[:, None], other=0.0)
    else:
        k = tl.load(k_rows + ss[:, None] * sk_s + ds[None, :])
        v = tl.load(v_rows + ss[:, None] * sv_s + ds[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, in log2 units
    if MASKED:
        s = tl.where((ss[None, :] <= OFFSET + rows[:, None]) & (ss < S)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, T, S, OFFSET, A, HPG, qk_scale,
                    sq_b, sq_a, sq_t, sk_b, sk_g, sk_s, sv_b, sv_g, sv_s, so_b, so_a, so_t,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    # program: BLOCK_M queries of one (sequence, head); the last blocks (the longest rows) start first
    blk = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b, a = (bh // A).to(tl.int64), bh % A
    g = (a // HPG).to(tl.int64)
    a = a.to(tl.int64)
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows; their positions are OFFSET + rows
    ds = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + a * sq_a + rows[:, None] * sq_t + ds[None, :], mask=(rows < T)[:, None],
                other=0.0)
    k_rows = k_ptr + b * sk_b + g * sk_g
    v_rows = v_ptr + b * sv_b + g * sv_g
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    # keys every row of the block sees, in whole blocks, then the blocks that straddle the diagonal
    full = (OFFSET + blk * BLOCK_M) // BLOCK_N * BLOCK_N
    end = tl.minimum(OFFSET + (blk + 1) * BLOCK_M, S)
    for s0 in range(0, full, BLOCK_N):
        acc, m_i, l_i = _prefill_block(q, acc, m_i, l_i, k_rows, v_rows, rows, ds, s0, S, OFFSET, qk_scale,
                                       sk_s, sv_s, BLOCK_N, False, PREC)
    for s0 in range(full, end, BLOCK_N):
        acc, m_i, l_i = _prefill_block(q, acc, m_i, l_i, k_rows, v_rows, rows, ds, s0, S, OFFSET, qk_scale,
                                       sk_s, sv_s, BLOCK_N, True, PREC)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + a * so_a + rows[:, None] * so_t + ds[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rows < T)[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for short and long prompts: the fastest in
# benchmarks/bench_attention.py's sweep (results/attention_prefill_h200.json), long from PREFILL_LONG queries
PREFILL_TILES = {"short": (64, 64, 4, 3), "long": (128, 128, 8, 3), "fp32": (32, 32, 4, 2)}
PREFILL_LONG = 4096


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0,
                      config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Causal attention of T new queries to the S = offset + T keys before and including them.

    Args:
        q: (B, A, T, Dh); k, v: (B, G, S, Dh) with A a multiple of G (grouped query heads read each K/V
            head in place, no repeat). Any strides with a contiguous last dim.
        offset: the position of the first query (the keys before it are cached ones).
        config: (BLOCK_M, BLOCK_N, num_warps, num_stages) override, for benchmarks.

    Returns:
        (B, T, A, Dh) in q's dtype: the layout o_proj reads as (B, T, A·Dh) with no copy.
    """
    b, a, t, d = q.shape
    g, s = k.shape[1], k.shape[2]
    if a % g or s != offset + t:
        raise ValueError(f"prefill_attention: {a} heads over {g} groups, {s} keys for {offset} + {t}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    fp32 = q.dtype == torch.float32
    block_m, block_n, warps, stages = config or current().tile("attention_prefill", PREFILL_TILES)[
        "fp32" if fp32 else "long" if t >= PREFILL_LONG else "short"]
    out = torch.empty(b, t, a, d, dtype=q.dtype, device=q.device)
    _prefill_kernel[(triton.cdiv(t, block_m), b * a)](
        q, k, v, out, t, s, offset, a, a // g, d ** -0.5 * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(2), out.stride(1),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, PREC="ieee" if fp32 else "tf32", num_warps=warps,
        num_stages=stages)
    return out
