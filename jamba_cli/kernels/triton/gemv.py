"""Triton matrix-vector kernels for decode steps (a few tokens): where one step reads every weight once.

At batch 1 a decode step is a chain of GEMVs, so its speed is the bandwidth each GEMV reaches and the
number of kernels launched. These kernels accumulate a (rows, BLOCK_K) fp32 tile element-wise and reduce
it once at the end (a reduction per K-step costs shuffles that starve the loads), and fuse what follows a
GEMV where that saves a launch: SwiGLU after gate/up, the routing weights and the sum over experts after
down, softmax and top-k after the router. Rounding mirrors the PyTorch code they replace: fp32
accumulation, a cast to the model dtype wherever PyTorch materialises a tensor in it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import current
from .launch import pdl, pdl_enter

# Tiles (BLOCK_N, BLOCK_K, num_warps, num_stages). LINEAR_TILES: the one-token linears, keyed by weight
# shape (N, K), where our GEMV beat cuBLAS in benchmarks/bench_kernels.py's sweep (results/kernels_h200.json);
# other shapes stay on cuBLAS. The SwiGLU + down pairs, dense and experts: the best few of that sweep,
# then the fastest in whole decode steps (bench_generate.py's variants, results/generate_h200_tuning.json).
LINEAR_TILES = {(4096, 8192): (8, 1024, 4, 3),  # Jamba-Mini out_proj
                (4096, 4096): (8, 512, 8, 3),  # q_proj, o_proj
                (1024, 4096): (4, 1024, 8, 3),  # k_proj, v_proj
                (65536, 4096): (8, 256, 4, 3)}  # lm_head
DENSE_TILES = ((8, 512, 4, 3), (8, 1024, 4, 3))
MOE_TILES = ((8, 1024, 4, 3), (16, 1024, 4, 3))


def tiles8(tile: tuple) -> tuple:
    """The tile for 8-bit weights from a 16-bit one: twice the columns, so that each load moves the same
    bytes, and twice the warps, so that the fp32 accumulator keeps the same registers per thread."""
    bn, bk, warps, stages = tile
    return bn, 2 * bk, 2 * warps, stages


def has_linear_tile(n: int, k: int) -> bool:
    """Whether a one-token linear with an (N, K) weight should take our GEMV (tuned for that shape)."""
    return current().tile("linear", None, (n, k)) is not None or (n, k) in LINEAR_TILES


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, stride_xt, stride_wn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SCALED: tl.constexpr,
                 USE_PDL: tl.constexpr):
    # out[t, rows] = W[rows] · x[t] for BLOCK_N rows of W (N, K); an 8-bit W times its row scales s
    t = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    x = x_ptr + t * stride_xt
    cols = tl.arange(0, BLOCK_K)
    w0 = tl.load(w + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < K), other=0.0)
    pdl_enter(USE_PDL)  # the first weight tile is read before: weights are never written
    acc = w0.to(tl.float32) * tl.load(x + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            xk = tl.load(x + cols).to(tl.float32)
            wk = tl.load(w + cols[None, :], mask=row_ok[:, None], other=0.0)
        else:
            xk = tl.load(x + cols, mask=cols < K, other=0.0).to(tl.float32)
            wk = tl.load(w + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < K), other=0.0)
        acc += wk.to(tl.float32) * xk[None, :]
    y = tl.sum(acc, axis=1)
    if SCALED:
        y = y * tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    tl.store(out_ptr + t * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, config=None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T for a few rows of x (..., K), weight (N, K): F.linear without bias. An 8-bit weight
    comes with its row scales `scale` (N,) float32: (x @ weight.T) · scale."""
    k = x.shape[-1]
    n = weight.shape[0]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if scale is None:
        tile = current().tile("linear", LINEAR_TILES.get((n, k), (8, 512, 4, 3)), (n, k))
    else:
        tile = current().tile("linear8", tiles8(LINEAR_TILES.get((n, k), (8, 512, 4, 3))), (n, k))
    bn, bk, warps, stages = config or tile
    use_pdl = pdl()
    _gemv_kernel[(rows.shape[0], triton.cdiv(n, bn))](
        rows, weight, scale if scale is not None else weight, out, n, k, rows.stride(0), weight.stride(0),
        BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0, SCALED=scale is not None, USE_PDL=use_pdl,
        num_warps=warps, num_stages=stages, launch_pdl=use_pdl)
    return out


@triton.jit
def _router_kernel(x_ptr, w_ptr, out_ptr, H, X, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    # one (token, expert) logit, rounded to the model dtype as the router's output is, kept as fp32
    pdl_enter(USE_PDL)
    token = tl.program_id(0)
    e = tl.program_id(1)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + token * H + cols, mask=cols < H, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + e * H + cols, mask=cols < H, other=0.0).to(tl.float32) * xk
    tl.store(out_ptr + token * X + e, tl.sum(acc, axis=0).to(x_ptr.dtype.element_ty).to(tl.float32))


def router_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """Router logits for a few tokens x (T, H), router (X, H) -> (T, X) float32 (values in x's dtype)."""
    t, h = x.shape
    out = torch.empty(t, router.shape[0], dtype=torch.float32, device=x.device)
    use_pdl = pdl()
    _router_kernel[(t, router.shape[0])](x.contiguous(), router, out, h, router.shape[0], BLOCK_K=1024,
                                         USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return out


@triton.jit
def _pick(logits_ptr, token, X, j_want, TOP_K: tl.constexpr, BLOCK_X: tl.constexpr):
    # softmax over one token's router logits (fp32), then its j_want-th largest: (expert, probability);
    # ties go to the lower expert index
    xs = tl.arange(0, BLOCK_X)
    logits = tl.load(logits_ptr + token * X + xs, mask=xs < X, other=float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    expert = tl.full((), 0, tl.int64)
    prob = tl.full((), 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        pick = tl.min(tl.where(p == best, xs, BLOCK_X), axis=0)
        expert = tl.where(j_want == j, pick.to(tl.int64), expert)
        prob = tl.where(j_want == j, best, prob)
        p = tl.where(xs == pick, -1.0, p)
    return expert, prob


@triton.jit
def _swiglu_kernel(x_ptr, g_ptr, u_ptr, gs_ptr, us_ptr, logits_ptr, out_ptr, H, I, X, stride_we, stride_wn,
                   stride_se, TOP_K: tl.constexpr, ROUTED: tl.constexpr, BLOCK_X: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SCALED: tl.constexpr,
                   USE_PDL: tl.constexpr):
    # one (token, slot) pair and BLOCK_N rows of its expert's gate and up projections -> silu(gate) * up
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < I
    if ROUTED:  # the router's logits come from the kernel just before
        pdl_enter(USE_PDL)
        expert, _ = _pick(logits_ptr, pair // TOP_K, X, pair % TOP_K, TOP_K, BLOCK_X)
    else:
        expert = 0
    x_row = x_ptr + (pair // TOP_K) * H
    offs = expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
    cols = tl.arange(0, BLOCK_K)
    g0 = tl.load(g_ptr + offs + cols[None, :], mask=row_ok & (cols[None, :] < H), other=0.0)
    u0 = tl.load(u_ptr + offs + cols[None, :], mask=row_ok & (cols[None, :] < H), other=0.0)
    if not ROUTED:  # dense: the first weight tiles are read before waiting
        pdl_enter(USE_PDL)
    xk = tl.load(x_row + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    gate = g0.to(tl.float32) * xk
    up = u0.to(tl.float32) * xk
    for k0 in range(BLOCK_K, H, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok if EVEN_K else row_ok & (cols[None, :] < H)
        xk = tl.load(x_row + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(g_ptr + offs + cols[None, :], mask=ok, other=0.0).to(tl.float32) * xk
        up += tl.load(u_ptr + offs + cols[None, :], mask=ok, other=0.0).to(tl.float32) * xk
    dt = out_ptr.dtype.element_ty
    g = tl.sum(gate, axis=1)
    u = tl.sum(up, axis=1)
    if SCALED:  # 8-bit weights: each output row times its scale, before anything is rounded
        g = g * tl.load(gs_ptr + expert * stride_se + rows, mask=rows < I, other=0.0)
        u = u * tl.load(us_ptr + expert * stride_se + rows, mask=rows < I, other=0.0)
    g = g.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # silu in the model dtype
    out = act * u.to(dt).to(tl.float32)
    tl.store(out_ptr + pair * I + rows, out.to(dt), mask=rows < I)


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, logits_ptr, out_ptr, H, I, X, stride_we, stride_wn, stride_se,
                 TOP_K: tl.constexpr, ROUTED: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SCALED: tl.constexpr, USE_PDL: tl.constexpr):
    # one token and BLOCK_N output features, summed over its TOP_K experts (no atomics: deterministic)
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < H
    dt = out_ptr.dtype.element_ty
    first = tl.arange(0, BLOCK_K)
    # the first expert's first weight tile is read before waiting: the logits are two kernels old, and
    # that kernel finished before the previous one passed its own wait
    expert = 0
    if ROUTED:
        expert, prob = _pick(logits_ptr, token, X, 0, TOP_K, BLOCK_X)
    w0 = tl.load(w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn + first[None, :],
                 mask=row_ok & (first[None, :] < I), other=0.0)
    pdl_enter(USE_PDL)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        if ROUTED:
            expert, prob = _pick(logits_ptr, token, X, j, TOP_K, BLOCK_X)
        w = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
        h0 = tl.load(h_ptr + pair * I + first, mask=first < I, other=0.0).to(tl.float32)[None, :]
        if j == 0:
            acc = w0.to(tl.float32) * h0
        else:
            acc = tl.load(w + first[None, :], mask=row_ok & (first[None, :] < I), other=0.0).to(tl.float32) * h0
        for k0 in range(BLOCK_K, I, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = row_ok if EVEN_K else row_ok & (cols[None, :] < I)
            hk = tl.load(h_ptr + pair * I + cols, mask=cols < I, other=0.0).to(tl.float32)[None, :]
            acc += tl.load(w + cols[None, :], mask=ok, other=0.0).to(tl.float32) * hk
        y = tl.sum(acc, axis=1)
        if SCALED:
            y = y * tl.load(s_ptr + expert * stride_se + rows, mask=rows < H, other=0.0)
        y = y.to(dt).to(tl.float32)
        if ROUTED:  # weighted in the model dtype, as the expert outputs are
            y = (y * prob.to(dt).to(tl.float32)).to(dt).to(tl.float32)
        total += y
    tl.store(out_ptr + token * H + rows, total.to(dt), mask=rows < H)


def swiglu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               logits: torch.Tensor | None = None, top_k: int = 1, configs=None,
               scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for a few tokens x (T, H), in two kernels.

    Dense: gate, up (I, H), down (H, I). Experts: gate, up (X, I, H) (views of the stacked gate_up), down
    (X, H, I), and `logits` (T, X) from `router_logits`: each kernel takes softmax and top-k itself and
    reads the chosen experts' rows in place (no gathered copy), so a step costs the bytes of k experts per
    token; the k outputs are weighted by their probabilities and summed.

    8-bit weights come with their row scales `scales` (gate, up, down): (I,), (I,), (H,) dense, (X, I),
    (X, I), (X, H) for experts (views with unit stride along the rows).
    """
    t, h = x.shape
    i = down.shape[-1]
    routed = logits is not None
    k = top_k if routed else 1
    n_exp = gate.shape[0] if routed else 1
    x = x.contiguous()
    logits = logits.contiguous() if routed else x  # an unused pointer when dense
    if scales is None:
        tiles = current().tile("moe", MOE_TILES) if routed else current().tile("dense", DENSE_TILES)
    else:
        tiles = current().tile("moe8", tuple(map(tiles8, MOE_TILES))) if routed else \
            current().tile("dense8", tuple(map(tiles8, DENSE_TILES)))
    (bn, bk, warps, stages), (dbn, dbk, dwarps, dstages) = configs or tiles
    gs, us, ds = scales if scales is not None else (x, x, x)  # unused pointers when 16-bit
    scaled = scales is not None
    stride_se = gs.stride(0) if scaled and routed else 0
    use_pdl = pdl()
    block_x = max(16, triton.next_power_of_2(n_exp))
    act = torch.empty(t * k, i, dtype=x.dtype, device=x.device)
    _swiglu_kernel[(t * k, triton.cdiv(i, bn))](
        x, gate, up, gs, us, logits, act, h, i, n_exp, gate.stride(0) if routed else 0, gate.stride(-2), stride_se,
        TOP_K=k, ROUTED=routed, BLOCK_X=block_x, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=h % bk == 0, SCALED=scaled,
        USE_PDL=use_pdl, num_warps=warps, num_stages=stages, launch_pdl=use_pdl)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    _down_kernel[(t, triton.cdiv(h, dbn))](
        act, down, ds, logits, out, h, i, n_exp, down.stride(0) if routed else 0, down.stride(-2),
        ds.stride(0) if scaled and routed else 0,
        TOP_K=k, ROUTED=routed, BLOCK_X=block_x, BLOCK_N=dbn, BLOCK_K=dbk, EVEN_K=i % dbk == 0, SCALED=scaled,
        USE_PDL=use_pdl, num_warps=dwarps, num_stages=dstages, launch_pdl=use_pdl)
    return out
