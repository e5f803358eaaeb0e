"""Fused Triton kernels for the CUDA path: RMSNorm, and MoE decode GEMVs that read only the chosen experts.

Only imported when the model runs on CUDA and Triton is installed (`kernels.py` decides). Each kernel
mirrors the rounding of the PyTorch code it replaces: fp32 arithmetic, a cast to the model dtype wherever
the PyTorch version materialises a tensor in that dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, x_row_stride, out_row_stride, eps,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)  # cast back, then weight (LlamaRMSNorm)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (rows may be strided, e.g. slices of x_proj's output)."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)  # a view when the rows are evenly strided, else a copy
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, d, rows.stride(0), d, eps,
                                           BLOCK=triton.next_power_of_2(d), num_warps=4 if d <= 4096 else 8)
    return out


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n_cols, g_row_stride, u_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64K tokens x 2 experts x 28672 columns overflows int32
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt = out_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # rounded like F.silu's output
    tl.store(out_ptr + row * n_cols + cols, (act * u).to(dt), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over rows that may be strided (e.g. the two halves of one GEMM's output)."""
    d = gate.shape[-1]
    g, u = gate.reshape(-1, d), up.reshape(-1, d)
    g = g if g.stride(-1) == 1 else g.contiguous()
    u = u if u.stride(-1) == 1 else u.contiguous()
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    if g.shape[0]:
        _silu_mul_kernel[(g.shape[0], triton.cdiv(d, block))](g, u, out, d, g.stride(0), u.stride(0), BLOCK=block)
    return out


@triton.jit
def _moe_gate_up_kernel(x_ptr, w_ptr, idx_ptr, out_ptr, H, I, stride_we, stride_wn,
                        TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one (token, slot) pair and BLOCK_N rows of its expert's gate and up projections
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.load(idx_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // TOP_K) * H
    w = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
    row_ok = rows[:, None] < I
    gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok & (cols[None, :] < H)
        xk = tl.load(x_row + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        gate += tl.sum(tl.load(w + cols[None, :], mask=ok, other=0.0).to(tl.float32) * xk, axis=1)
        up += tl.sum(tl.load(w + I * stride_wn + cols[None, :], mask=ok, other=0.0).to(tl.float32) * xk, axis=1)
    dt = out_ptr.dtype.element_ty
    gate = gate.to(dt).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)  # silu in the model dtype
    tl.store(out_ptr + pair * I + rows, (act * up.to(dt).to(tl.float32)).to(dt), mask=rows < I)


@triton.jit
def _moe_down_kernel(h_ptr, w_ptr, idx_ptr, wt_ptr, out_ptr, H, I, stride_we, stride_wn,
                     TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one token and BLOCK_N output features, summed over its TOP_K experts (no atomics: deterministic)
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dt = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        expert = tl.load(idx_ptr + pair).to(tl.int64)
        weight = tl.load(wt_ptr + pair).to(tl.float32)
        w = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = (rows[:, None] < H) & (cols[None, :] < I)
            hk = tl.load(h_ptr + pair * I + cols, mask=cols < I, other=0.0).to(tl.float32)[None, :]
            acc += tl.sum(tl.load(w + cols[None, :], mask=ok, other=0.0).to(tl.float32) * hk, axis=1)
        total += (acc.to(dt).to(tl.float32) * weight).to(dt).to(tl.float32)
    tl.store(out_ptr + token * H + rows, total.to(dt), mask=rows < H)


# (BLOCK_N, BLOCK_K, num_warps, num_stages), chosen by benchmarks/bench_kernels.py on an H200:
# 3.56 and 3.34 TB/s of expert weights read at batch 1 (GEMV ceiling there: 4.08 TB/s)
GATE_UP_CONFIG = (8, 128, 4, 4)
DOWN_CONFIG = (8, 512, 4, 4)


def moe_decode(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, idx: torch.Tensor,
               weights: torch.Tensor, gate_up_config=None, down_config=None) -> torch.Tensor:
    """SwiGLU experts for a few tokens: x (T, H), gate_up (X, 2I, H), down (X, H, I), idx/weights (T, k).

    Reads each chosen expert's rows in place (no gathered copy of expert weights), so a decode step
    costs the bytes of k experts per token and nothing else.
    """
    t, h = x.shape
    k = idx.shape[1]
    i = down.shape[2]
    x = x.contiguous()
    act = torch.empty(t * k, i, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = gate_up_config or GATE_UP_CONFIG
    _moe_gate_up_kernel[(t * k, triton.cdiv(i, bn))](
        x, gate_up, idx.contiguous(), act, h, i, gate_up.stride(0), gate_up.stride(1),
        TOP_K=k, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = down_config or DOWN_CONFIG
    _moe_down_kernel[(t, triton.cdiv(h, bn))](
        act, down, idx.contiguous(), weights.contiguous(), out, h, i, down.stride(0), down.stride(1),
        TOP_K=k, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _initial_state_kernel(y_ptr, z_ptr, cum_ptr, a_ptr, c_ptr, h0_ptr, out_ptr, E, T,
                          sy_b, sy_e, sy_t, sz_b, sz_e, sz_t, sc_b, sc_n, sc_t,
                          N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(2).to(tl.int64)
    ns = tl.arange(0, N)
    e_ok, t_ok = es < E, ts < T
    et_ok = e_ok[:, None] & t_ok[None, :]
    a = tl.load(a_ptr + es[:, None] * N + ns[None, :], mask=e_ok[:, None], other=0.0)  # (E, N)
    h0 = tl.load(h0_ptr + b * E * N + es[:, None] * N + ns[None, :], mask=e_ok[:, None], other=0.0)
    cum = tl.load(cum_ptr + b * E * T + es[:, None] * T + ts[None, :], mask=et_ok, other=0.0)  # (E, T)
    c = tl.load(c_ptr + b * sc_b + ns[:, None] * sc_n + ts[None, :] * sc_t, mask=t_ok[None, :],
                other=0.0).to(tl.float32)  # (N, T)
    decay = tl.exp(a[:, :, None] * cum[:, None, :])  # (E, N, T)
    corr = tl.sum(decay * (h0[:, :, None] * c[None, :, :]), axis=1)  # (E, T)
    y = tl.load(y_ptr + b * sy_b + es[:, None] * sy_e + ts[None, :] * sy_t, mask=et_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * sz_b + es[:, None] * sz_e + ts[None, :] * sz_t, mask=et_ok, other=0.0).to(tl.float32)
    out = (y + corr) * (z / (1.0 + tl.exp(-z)))
    tl.store(out_ptr + b * sy_b + es[:, None] * sy_e + ts[None, :] * sy_t, out.to(out_ptr.dtype.element_ty),
             mask=et_ok)


def add_initial_state(y0: torch.Tensor, z: torch.Tensor, cum: torch.Tensor, A: torch.Tensor, Cm: torch.Tensor,
                      h0: torch.Tensor) -> torch.Tensor:
    """(y0 + C_t·(exp(A·cum_t) ⊙ h0)) · silu(z): what a start state h0 adds to an ungated scan output y0.

    y0, z: (B, E, T); cum: (B, E, T) float32 running sum of Δ; A: (E, N) fp32; Cm: (B, N, T); h0: (B, E, N).
    """
    b, e, t = y0.shape
    n = A.shape[-1]
    y0 = y0.contiguous()
    out = torch.empty_like(y0)
    block_e, block_t = 16, 64
    grid = (triton.cdiv(e, block_e), triton.cdiv(t, block_t), b)
    _initial_state_kernel[grid](y0, z, cum.contiguous(), A.contiguous(), Cm, h0.float().contiguous(), out, e, t,
                                *y0.stride(), *z.stride(), *Cm.stride(), N=n, BLOCK_E=block_e, BLOCK_T=block_t,
                                num_warps=4)
    return out
