"""Fused Triton kernels for the CUDA path: RMSNorm (with the residual add), SwiGLU, and Mamba's decode step
and resumed-prefill correction. The decode-step GEMVs are in `triton_gemv.py`.

Only imported when the model runs on CUDA and Triton is installed (`kernels.py` decides). Each kernel
mirrors the rounding of the PyTorch code it replaces: fp32 arithmetic, a cast to the model dtype wherever
the PyTorch version materialises a tensor in that dtype.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

# Programmatic dependent launch (Hopper and later) for the decode-step kernels: each may be launched while
# the kernel before it finishes, reads its first weights, then waits for that kernel's results
PDL = SimpleNamespace(on=gdc_wait is not None and os.environ.get("TRITON_INTERPRET") != "1"
                      and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    # first thing in a kernel launched with launch_pdl: wait for the previous kernel's results, then let
    # the next kernel start launching
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _rms(x, w_ptr, n, eps, OK, dt):
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
    y = _rms(x, w_ptr + cols, n_cols, eps, mask, out_ptr.dtype.element_ty)
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
    tl.store(out_ptr + row * n_cols + cols, _rms(s.to(tl.float32), w_ptr + cols, n_cols, eps, mask, dt).to(dt),
             mask=mask)


def add_rms_norm(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(h + y, RMSNorm(h + y)) in one pass: a residual add and the next block's pre-norm."""
    d = h.shape[-1]
    h, y = h.contiguous(), y.contiguous()
    total, out = torch.empty_like(h), torch.empty_like(h)
    if h.numel():
        pdl = PDL.on and h.numel() == d  # a decode step
        _add_rms_norm_kernel[(h.numel() // d,)](h, y, weight, total, out, d, eps, BLOCK=triton.next_power_of_2(d),
                                                USE_PDL=pdl, num_warps=4 if d <= 4096 else 8, launch_pdl=pdl)
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


def moe_combine(y: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y[slot[t, j]]: expert outputs y (T·k, H) in expert order back to
    tokens (T, H), each term rounded to the model dtype before the sum, as the unfused ops round."""
    t, k = slot.shape
    h = y.shape[1]
    out = torch.empty(t, h, dtype=y.dtype, device=y.device)
    block = 1024
    _moe_combine_kernel[(t, triton.cdiv(h, block))](y.contiguous(), slot.contiguous(), weights.contiguous(), out,
                                                     h, TOP_K=k, BLOCK=block, num_warps=4)
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


@triton.jit
def _mamba_conv_kernel(xz_ptr, state_ptr, cw_ptr, cb_ptr, u_ptr, E, stride_xz,
                       K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr,
                       USE_PDL: tl.constexpr):
    # the conv's output for BLOCK_E channels at this token, from the K-1 inputs in the state and this
    # token's: silu in fp32, stored in the model dtype (the state is shifted later, by the SSM kernel)
    pdl_enter(USE_PDL)
    b = tl.program_id(1).to(tl.int64)
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = es < E
    js = tl.arange(0, KP)
    new = tl.load(xz_ptr + b * stride_xz + es, mask=e_ok, other=0.0)
    window = tl.load(state_ptr + b * E * (K - 1) + es[:, None] * (K - 1) + js[None, :],
                     mask=e_ok[:, None] & (js[None, :] < K - 1), other=0.0)  # (BLOCK_E, KP)
    window = tl.where(js[None, :] == K - 1, new[:, None].to(window.dtype), window)
    w = tl.load(cw_ptr + es[:, None] * K + js[None, :], mask=e_ok[:, None] & (js[None, :] < K), other=0.0)
    y = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        y += tl.load(cb_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
    tl.store(u_ptr + b * E + es, (y / (1.0 + tl.exp(-y))).to(u_ptr.dtype.element_ty), mask=e_ok)


@triton.jit
def _mamba_ssm_step_kernel(xdbc_ptr, dtn_ptr, bn_ptr, cn_ptr, eps, dtw_ptr, dtb_ptr, a_ptr, d_ptr,
                           xz_ptr, u_ptr, conv_ptr, h_ptr, y_ptr, E, stride_xz,
                           R: tl.constexpr, N: tl.constexpr, BLOCK_R: tl.constexpr, K: tl.constexpr,
                           KP: tl.constexpr, BLOCK_E: tl.constexpr, USE_PDL: tl.constexpr):
    # BLOCK_E channels of one sequence: dt/B/C norms -> dt_proj -> softplus -> state update; and the conv
    # state's shift by one token (the conv kernel has read it by now)
    pdl_enter(USE_PDL)
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    dt = y_ptr.dtype.element_ty
    rs = tl.arange(0, BLOCK_R)
    ns = tl.arange(0, N)
    es = blk * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = es < E
    js = tl.arange(0, KP)
    st = conv_ptr + b * E * (K - 1) + es[:, None] * (K - 1) + js[None, :]
    shifted = tl.load(st + 1, mask=e_ok[:, None] & (js[None, :] < K - 2), other=0.0)
    new = tl.load(xz_ptr + b * stride_xz + es, mask=e_ok, other=0.0)
    tl.store(st, tl.where(js[None, :] == K - 2, new[:, None].to(shifted.dtype), shifted),
             mask=e_ok[:, None] & (js[None, :] < K - 1))
    row = xdbc_ptr + b * (R + 2 * N)
    x_dt = _rms(tl.load(row + rs, mask=rs < R, other=0.0).to(tl.float32), dtn_ptr + rs, R, eps, rs < R, dt)
    x_b = _rms(tl.load(row + R + ns).to(tl.float32), bn_ptr + ns, N, eps, ns < N, dt)
    x_c = _rms(tl.load(row + R + N + ns).to(tl.float32), cn_ptr + ns, N, eps, ns < N, dt)
    wdt = tl.load(dtw_ptr + es[:, None] * R + rs[None, :], mask=e_ok[:, None] & (rs[None, :] < R), other=0.0)
    delta = tl.sum(wdt.to(tl.float32) * x_dt[None, :], axis=1).to(dt).to(tl.float32)  # dt_proj, bias apart
    delta += tl.load(dtb_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
    delta = tl.where(delta <= 20.0, tl.log(1.0 + tl.exp(delta)), delta)  # softplus
    u = tl.load(u_ptr + b * E + es, mask=e_ok, other=0.0).to(tl.float32)
    z = tl.load(xz_ptr + b * stride_xz + E + es, mask=e_ok, other=0.0).to(tl.float32)
    en = es[:, None] * N + ns[None, :]
    a = tl.load(a_ptr + en, mask=e_ok[:, None], other=0.0)
    h = tl.load(h_ptr + b * E * N + en, mask=e_ok[:, None], other=0.0)
    h = h * tl.exp(a * delta[:, None]) + x_b[None, :] * delta[:, None] * u[:, None]
    tl.store(h_ptr + b * E * N + en, h, mask=e_ok[:, None])
    y = tl.sum(h * x_c[None, :], axis=1) + u * tl.load(d_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
    y = y * (z / (1.0 + tl.exp(-z)))
    tl.store(y_ptr + b * E + es, y.to(dt), mask=e_ok)


# (conv channels per program, x_proj GEMV config, state-update channels per program), from
# benchmarks/bench_kernels.py
MAMBA_STEP_CONFIG = (128, (2, 1024, 4, 3), 16)  # 10.6 us against 16.3 for the unfused chain


def mamba_step(xz: torch.Tensor, conv_state: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor | None,
               x_proj: torch.Tensor, dt_norm: torch.Tensor, b_norm: torch.Tensor, c_norm: torch.Tensor, eps: float,
               dt_proj: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
               ssm_state: torch.Tensor, config=None) -> torch.Tensor:
    """Mamba's decode step between in_proj and out_proj in three kernels: xz (B, 2E) -> y (B, E).

    Conv (silu); x_proj; the dt/B/C RMSNorms, dt_proj, softplus and the selective state update. The conv
    state (B, E, K-1) and SSM state (B, E, N) fp32 advance in place. Equal to that chain of PyTorch ops up
    to fp32 summation order. N must be a power of two.
    """
    from .triton_gemv import gemv  # that module imports this one

    b, e = xz.shape[0], xz.shape[1] // 2
    k, rt, n = conv_w.shape[-1], x_proj.shape[0], A.shape[1]
    block_e, xproj_config, block_e2 = config or MAMBA_STEP_CONFIG
    pdl = PDL.on and b == 1
    u = torch.empty(b, e, dtype=xz.dtype, device=xz.device)
    _mamba_conv_kernel[(triton.cdiv(e, block_e), b)](
        xz, conv_state, conv_w, conv_b if conv_b is not None else conv_w, u, e, xz.stride(0), K=k,
        KP=triton.next_power_of_2(k), HAS_BIAS=conv_b is not None, BLOCK_E=block_e, USE_PDL=pdl, num_warps=4,
        launch_pdl=pdl)
    xdbc = gemv(u, x_proj, xproj_config)  # (B, R + 2N)
    y = torch.empty(b, e, dtype=xz.dtype, device=xz.device)
    r = rt - 2 * n
    _mamba_ssm_step_kernel[(triton.cdiv(e, block_e2), b)](
        xdbc, dt_norm, b_norm, c_norm, eps, dt_proj, dt_bias, A, D, xz, u, conv_state, ssm_state, y, e,
        xz.stride(0), R=r, N=n, BLOCK_R=triton.next_power_of_2(r), K=k, KP=triton.next_power_of_2(k),
        BLOCK_E=block_e2, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return y
