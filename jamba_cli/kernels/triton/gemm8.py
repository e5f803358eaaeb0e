"""Triton GEMMs for prompts (many tokens) with 8-bit weights: weight-only int8 or float8 e4m3, one scale per
output row, activations in bf16, fp16 or fp32 (never quantized).

    out[m, n] = (sum_k x[m, k] * float(w[g(m), n, k])) * scale[g(m), n], rounded once to x's dtype

`linear8` is F.linear for one weight; `grouped_linear8` is the drop-in for `torch._grouped_mm` in
`grouped_experts` (rows sorted by expert, `offs` the end row of each expert's group). Each weight tile is
loaded as 8 bits and converted to the activations' dtype in registers (int8 and e4m3 values are exact in
bf16 and fp16), so a layer never exists dequantized in memory and the main loop reads half the weight bytes
of bf16; accumulation is fp32 and the row scale is applied once, in the epilogue.

No host synchronisation: each program finds its group from `offs` itself (a small vector load, a cumsum of
the groups' tile counts), and the grid is an upper bound on the tiles, the spare programs returning at once.
So the grouped GEMM is CUDA-graph capturable and never stalls the stream on the routing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..options import current

# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP_AB). SWAP_AB computes outᵀ = w·xᵀ: the
# converted weight tile is then the MMA's A operand, which Hopper's wgmma may take from registers, whereas
# B must come from shared memory (so the unswapped form round-trips the converted tile through it).
# The default: 128 x 128 tiles with two warpgroups are the usual Hopper bf16 GEMM shape; BLOCK_K 128 makes
# each weight row read a whole 128-byte line of 8-bit values; 3 stages of x and w tiles fit shared memory
# with room for the conversion. TILES: the candidates benchmarks/bench_gemm8.py sweeps.
DEFAULT_TILE = (128, 128, 128, 8, 3, True)
TILES = ((128, 128, 128, 8, 3, True), (128, 128, 64, 8, 4, True), (128, 256, 64, 8, 3, True),
         (64, 128, 128, 4, 4, True), (128, 128, 64, 8, 4, False), (128, 128, 128, 8, 3, False),
         (128, 256, 64, 8, 3, False))
GROUP_M = 8  # consecutive programs share GROUP_M row tiles (and so weight tiles) through L2
WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _gemm8_kernel(x_ptr, w_ptr, scale_ptr, offs_ptr, out_ptr, M, N, K, G,
                  stride_xm, stride_wg, stride_wn, stride_sg, stride_om,
                  GROUPED: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr,
                  PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # the program's (row tile, column tile), row tiles in bands of GROUP_M so that the programs running
    # together read the same weight tiles
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M) + (G if GROUPED else 0)  # the grid's bound: no group's count is known here
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * n_tiles_n)
    first = band * GROUP_M
    band_m = tl.minimum(n_tiles_m - first, GROUP_M)
    t = first + (pid % (GROUP_M * n_tiles_n)) % band_m
    pid_n = (pid % (GROUP_M * n_tiles_n)) // band_m

    if GROUPED:
        # group g holds rows [offs[g-1], offs[g]) and cdiv(count, BLOCK_M) row tiles; tile t belongs to the
        # first group whose tiles end after it. Ends are clamped to M so a bad offs cannot address past x.
        gs = tl.arange(0, BLOCK_G)
        ends = tl.minimum(tl.maximum(tl.load(offs_ptr + gs, mask=gs < G, other=0), 0), M)
        starts = tl.minimum(tl.maximum(tl.load(offs_ptr + gs - 1, mask=(gs > 0) & (gs < G), other=0), 0), M)
        tiles = tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M)
        tile_end = tl.cumsum(tiles, 0)
        if t >= tl.sum(tiles, 0):
            return
        g = tl.sum((tile_end <= t).to(tl.int32), 0)
        here = gs == g
        row0 = tl.sum(tl.where(here, starts, 0), 0) + (t - tl.sum(tl.where(here, tile_end - tiles, 0), 0)) * BLOCK_M
        row_end = tl.sum(tl.where(here, ends, 0), 0)
    else:
        g = pid * 0  # a tensor, as in the grouped case
        row0 = t * BLOCK_M
        row_end = M

    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    dt = x_ptr.dtype.element_ty
    # the interpreter's tl.dot on bf16 operands returns garbage: there it multiplies the same values in fp32
    cdt = tl.float32 if INTERPRETED else dt
    x_rows = x_ptr + rows.to(tl.int64) * stride_xm
    w_cols = w_ptr + g.to(tl.int64) * stride_wg + cols.to(tl.int64) * stride_wn
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        if SWAP_AB:
            if EVEN_K:
                xt = tl.load(x_rows[None, :] + k[:, None], mask=row_ok[None, :], other=0.0)
                w = tl.load(w_cols[:, None] + k[None, :], mask=col_ok[:, None], other=0.0)
            else:
                xt = tl.load(x_rows[None, :] + k[:, None], mask=row_ok[None, :] & k_ok[:, None], other=0.0)
                w = tl.load(w_cols[:, None] + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(w.to(cdt), xt.to(cdt), acc, input_precision=PRECISION)
        else:
            if EVEN_K:
                xk = tl.load(x_rows[:, None] + k[None, :], mask=row_ok[:, None], other=0.0)
                wt = tl.load(w_cols[None, :] + k[:, None], mask=col_ok[None, :], other=0.0)
            else:
                xk = tl.load(x_rows[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w_cols[None, :] + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(xk.to(cdt), wt.to(cdt), acc, input_precision=PRECISION)

    scale = tl.load(scale_ptr + g * stride_sg + cols, mask=col_ok, other=0.0)
    out_rows = out_ptr + rows.to(tl.int64) * stride_om
    if SWAP_AB:
        y = acc * scale[:, None]
        tl.store(out_rows[None, :] + cols[:, None], y.to(out_ptr.dtype.element_ty),
                 mask=row_ok[None, :] & col_ok[:, None])
    else:
        y = acc * scale[None, :]
        tl.store(out_rows[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def _check(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, grouped: bool) -> None:
    wdims = 3 if grouped else 2
    if x.dim() != 2 or w.dim() != wdims or scale.shape != w.shape[:-1]:
        raise ValueError(f"`x` (M, K), `w` {'(G, N, K)' if grouped else '(N, K)'} and `scale` "
                         f"{'(G, N)' if grouped else '(N,)'} expected, got {tuple(x.shape)}, {tuple(w.shape)}, "
                         f"{tuple(scale.shape)}")
    if x.shape[1] != w.shape[-1]:
        raise ValueError(f"`x` has {x.shape[1]} columns but `w` has {w.shape[-1]}")
    if x.shape[1] % 16:
        raise ValueError(f"K (the columns of `x` and `w`) must be a multiple of 16, not {x.shape[1]}")
    if w.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"`w` must be int8 or float8_e4m3fn, not {w.dtype}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"`x` must be bfloat16, float16 or float32, not {x.dtype}")
    if scale.dtype != torch.float32:
        raise ValueError(f"`scale` must be float32, not {scale.dtype}")


def _launch(x, w, scale, offs, grouped: bool, config) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[-2]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()  # an 8-bit copy: never a dequantized one
    if scale.stride(-1) != 1:
        scale = scale.contiguous()
    bm, bn, bk, warps, stages, swap = config or current().tile("gemm8", DEFAULT_TILE)
    n_groups = w.shape[0] if grouped else 1
    grid = ((triton.cdiv(m, bm) + (n_groups if grouped else 0)) * triton.cdiv(n, bn),)
    _gemm8_kernel[grid](
        x, w, scale, offs if grouped else scale, out, m, n, k, n_groups,
        x.stride(0), w.stride(0) if grouped else 0, w.stride(-2), scale.stride(0) if grouped else 0, out.stride(0),
        GROUPED=grouped, BLOCK_G=max(16, triton.next_power_of_2(n_groups)), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=GROUP_M, SWAP_AB=bool(swap), EVEN_K=k % bk == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else None,  # fp32 activations: fp32 products, not tf32
        INTERPRETED=_INTERPRETED,
        num_warps=warps, num_stages=stages)
    return out


def linear8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, config=None) -> torch.Tensor:
    """F.linear(x, float(w) * scale[:, None]) without the dequantized weight: x (M, K), w (N, K) int8 or
    float8_e4m3fn, scale (N,) float32 -> (M, N) in x's dtype. K must be a multiple of 16.

    `config`: a tile (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP_AB) for benchmarks; else the
    active options' `tiles["gemm8"]`, else DEFAULT_TILE.
    """
    _check(x, w, scale, grouped=False)
    return _launch(x, w, scale, None, False, config)


def grouped_linear8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor,
                    config=None) -> torch.Tensor:
    """torch._grouped_mm(x, (float(w) * scale[..., None]).transpose(1, 2), offs=offs) without the
    dequantized weights: x (M, K) rows sorted by group, w (G, N, K) int8 or float8_e4m3fn, scale (G, N)
    float32, offs (G,) int32 on x's device, the cumulative end row of each group -> (M, N) in x's dtype.

    Groups may be empty; rows at or past offs[-1] belong to none and their output rows are left unwritten
    (as torch._grouped_mm leaves them). offs is never read on the host: capturable in a CUDA graph, and
    a graph replays correctly with new offs. K must be a multiple of 16. `config` as for `linear8`.
    """
    _check(x, w, scale, grouped=True)
    if offs.shape != (w.shape[0],) or offs.dtype != torch.int32:
        raise ValueError(f"`offs` must be int32 of shape ({w.shape[0]},), got {offs.dtype} {tuple(offs.shape)}")
    return _launch(x, w, scale, offs, True, config)
