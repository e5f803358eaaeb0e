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

# (BLOCK_N, BLOCK_K, num_warps, num_stages), chosen by benchmarks/bench_kernels.py on an H200
GEMV_CONFIG = (8, 512, 4, 3)
SWIGLU_CONFIG = (8, 512, 4, 3)
DOWN_CONFIG = (4, 512, 4, 3)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_xt, stride_wn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    # out[t, rows] = W[rows] · x[t] for BLOCK_N rows of W (N, K)
    t = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    x = x_ptr + t * stride_xt
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            xk = tl.load(x + cols).to(tl.float32)
            wk = tl.load(w + cols[None, :], mask=row_ok[:, None], other=0.0)
        else:
            xk = tl.load(x + cols, mask=cols < K, other=0.0).to(tl.float32)
            wk = tl.load(w + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < K), other=0.0)
        acc += wk.to(tl.float32) * xk[None, :]
    tl.store(out_ptr + t * N + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, config=None) -> torch.Tensor:
    """x @ weight.T for a few rows of x (..., K), weight (N, K): F.linear without bias."""
    k = x.shape[-1]
    n = weight.shape[0]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = config or GEMV_CONFIG
    _gemv_kernel[(rows.shape[0], triton.cdiv(n, bn))](
        rows, weight, out, n, k, rows.stride(0), weight.stride(0),
        BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _swiglu_kernel(x_ptr, g_ptr, u_ptr, idx_ptr, out_ptr, H, I, stride_we, stride_wn,
                   TOP_K: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr):
    # one (token, slot) pair and BLOCK_N rows of its expert's gate and up projections -> silu(gate) * up
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < I
    expert = tl.load(idx_ptr + pair).to(tl.int64) if HAS_IDX else 0
    x_row = x_ptr + (pair // TOP_K) * H
    offs = expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
    gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok if EVEN_K else row_ok & (cols[None, :] < H)
        xk = tl.load(x_row + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(g_ptr + offs + cols[None, :], mask=ok, other=0.0).to(tl.float32) * xk
        up += tl.load(u_ptr + offs + cols[None, :], mask=ok, other=0.0).to(tl.float32) * xk
    dt = out_ptr.dtype.element_ty
    g = tl.sum(gate, axis=1).to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # silu in the model dtype
    out = act * tl.sum(up, axis=1).to(dt).to(tl.float32)
    tl.store(out_ptr + pair * I + rows, out.to(dt), mask=rows < I)


@triton.jit
def _down_kernel(h_ptr, w_ptr, idx_ptr, wt_ptr, out_ptr, H, I, stride_we, stride_wn,
                 TOP_K: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    # one token and BLOCK_N output features, summed over its TOP_K experts (no atomics: deterministic)
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < H
    dt = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        expert = tl.load(idx_ptr + pair).to(tl.int64) if HAS_IDX else 0
        w = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = row_ok if EVEN_K else row_ok & (cols[None, :] < I)
            hk = tl.load(h_ptr + pair * I + cols, mask=cols < I, other=0.0).to(tl.float32)[None, :]
            acc += tl.load(w + cols[None, :], mask=ok, other=0.0).to(tl.float32) * hk
        y = tl.sum(acc, axis=1).to(dt).to(tl.float32)
        if HAS_IDX:  # weighted in the model dtype, as the expert outputs are
            y = (y * tl.load(wt_ptr + pair).to(tl.float32)).to(dt).to(tl.float32)
        total += y
    tl.store(out_ptr + token * H + rows, total.to(dt), mask=rows < H)


def swiglu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               idx: torch.Tensor | None = None, weights: torch.Tensor | None = None,
               swiglu_config=None, down_config=None) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for a few tokens x (T, H), in two kernels.

    Dense: gate, up (I, H), down (H, I). Experts (`idx`, `weights`: (T, k)): gate, up (X, I, H) (views of
    the stacked gate_up), down (X, H, I); each chosen expert's rows are read in place (no gathered copy),
    so a step costs the bytes of k experts per token, and the k outputs are weighted and summed.
    """
    t, h = x.shape
    i = down.shape[-1]
    moe = idx is not None
    k = idx.shape[1] if moe else 1
    x = x.contiguous()
    idx = idx.contiguous() if moe else x  # an unused pointer when dense
    act = torch.empty(t * k, i, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = swiglu_config or SWIGLU_CONFIG
    _swiglu_kernel[(t * k, triton.cdiv(i, bn))](
        x, gate, up, idx, act, h, i, gate.stride(0) if moe else 0, gate.stride(-2),
        TOP_K=k, HAS_IDX=moe, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=h % bk == 0,
        num_warps=warps, num_stages=stages)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = down_config or DOWN_CONFIG
    _down_kernel[(t, triton.cdiv(h, bn))](
        act, down, idx, weights.contiguous() if moe else x, out, h, i, down.stride(0) if moe else 0,
        down.stride(-2), TOP_K=k, HAS_IDX=moe, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=i % bk == 0,
        num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _router_kernel(x_ptr, w_ptr, idx_ptr, wt_ptr, H, X, TOP_K: tl.constexpr, BLOCK_X: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    # one token: logits over X experts, softmax in fp32, then the TOP_K largest probabilities in order
    token = tl.program_id(0)
    experts = tl.arange(0, BLOCK_X)
    ok = experts < X
    acc = tl.zeros((BLOCK_X, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + token * H + cols, mask=cols < H, other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + experts[:, None] * H + cols[None, :], mask=ok[:, None] & (cols[None, :] < H), other=0.0)
        acc += wk.to(tl.float32) * xk[None, :]
    logits = tl.sum(acc, axis=1).to(x_ptr.dtype.element_ty).to(tl.float32)  # the router's output dtype
    logits = tl.where(ok, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        pick = tl.min(tl.where(p == best, experts, BLOCK_X), axis=0)  # the lowest index among ties
        tl.store(idx_ptr + token * TOP_K + j, pick.to(tl.int64))
        tl.store(wt_ptr + token * TOP_K + j, best.to(wt_ptr.dtype.element_ty))
        p = tl.where(experts == pick, -1.0, p)


def route(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of softmax(router(x)) for a few tokens x (T, H): (idx (T, k) int64, weights (T, k) x.dtype)."""
    t, h = x.shape
    n = router.shape[0]
    idx = torch.empty(t, k, dtype=torch.long, device=x.device)
    weights = torch.empty(t, k, dtype=x.dtype, device=x.device)
    _router_kernel[(t,)](x.contiguous(), router, idx, weights, h, n, TOP_K=k,
                         BLOCK_X=max(16, triton.next_power_of_2(n)), BLOCK_K=256, num_warps=4)
    return idx, weights
