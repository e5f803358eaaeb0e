"""Triton kernels for the element-wise and per-row steps: RMSNorm (with the residual add), SwiGLU's
silu(gate) * up, and the MoE combine. Same names, same contracts as `kernels/reference.py`.

Each kernel mirrors the rounding of the PyTorch code it replaces: fp32 arithmetic, a cast to the model dtype
wherever the PyTorch version materialises a tensor in that dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pdl, pdl_enter


@triton.jit
def rms_row(x, w_ptr, n, eps, OK, dt):
    # RMSNorm of an fp32 vector whose masked-off entries are 0, rounded as the RMSNorm module rounds
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr, mask=OK, other=0.0).to(tl.float32)
    return (w * (x * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, x_row_stride, out_row_stride, eps,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = rms_row(x, w_ptr + cols, n_cols, eps, mask, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(h_ptr, y_ptr, w_ptr, sum_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt = out_ptr.dtype.element_ty
    h = tl.load(h_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = (h + y).to(dt)  # the residual stream, rounded as `h + y` is
    tl.store(sum_ptr + row * n_cols + cols, s, mask=mask)
    tl.store(out_ptr + row * n_cols + cols, rms_row(s.to(tl.float32), w_ptr + cols, n_cols, eps, mask, dt).to(dt),
             mask=mask)


def add_rms_norm(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(h + y, RMSNorm(h + y)) in one pass: a residual add and the next block's pre-norm."""
    d = h.shape[-1]
    h, y = h.contiguous(), y.contiguous()
    total, out = torch.empty_like(h), torch.empty_like(h)
    if h.numel():
        use_pdl = pdl() and h.numel() == d  # a decode step
        _add_rms_norm_kernel[(h.numel() // d,)](h, y, weight, total, out, d, eps, BLOCK=triton.next_power_of_2(d),
                                                USE_PDL=use_pdl, num_warps=4 if d <= 4096 else 8,
                                                launch_pdl=use_pdl)
    return total, out


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
def _moe_combine_kernel(y_ptr, slot_ptr, w_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    dt = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(slot_ptr + token * TOP_K + j).to(tl.int64)
        y = tl.load(y_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        total += (y * tl.load(w_ptr + token * TOP_K + j).to(tl.float32)).to(dt).to(tl.float32)
    tl.store(out_ptr + token * H + cols, total.to(dt), mask=mask)


def moe_combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs y (T·k, H), row i belonging to (token, slot) pair order[i], weighted by weights (T, k)
    and summed per token -> (T, H); each term is rounded to the model dtype before the sum."""
    t, k = weights.shape
    h = y.shape[1]
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.numel(), device=order.device)  # where each pair's row is in y
    out = torch.empty(t, h, dtype=y.dtype, device=y.device)
    block = 1024
    _moe_combine_kernel[(t, triton.cdiv(h, block))](y.contiguous(), slot, weights.contiguous(), out,
                                                     h, TOP_K=k, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, n_cols, x_row_stride, QMAX: tl.constexpr, BLOCK: tl.constexpr):
    # one row, whole: its absmax, then every value divided by absmax / QMAX (one read, one 1-byte write)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / QMAX
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, s), -QMAX), QMAX)  # IEEE division, as PyTorch's
    tl.store(q_ptr + row * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, s)


def quantize_tokens_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (e4m3 (M, K), scales (M, 1) float32), as `kernels.scaled.quantize_tokens` in one pass."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    if m:
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), QMAX=448.0, BLOCK=block,
                                    num_warps=4 if block <= 4096 else 8 if block <= 8192 else 16)
    return q, s
