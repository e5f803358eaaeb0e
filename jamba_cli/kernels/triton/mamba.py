"""Mamba in Triton: the causal conv over a prompt, and the whole decode step between in_proj and out_proj.

Layouts as in `kernels/reference.py`: x, u: (B, E, T) channel-first; conv weight (E, K); conv state
(B, E, K-1), the last K-1 inputs, oldest first; SSM state (B, E, N) float32. States are updated in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import current
from ..reference import keep_conv_state
from .gemv import gemv
from .launch import pdl, pdl_enter
from .ops import rms_row


@triton.jit
def _conv_kernel(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, E, T, sx_b, sx_e, sy_b, sy_e, ss_b, ss_e,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    # y[e, t] = silu(bias[e] + sum_j w[e, j] · x[e, t - (K-1) + j]) for a (BLOCK_E, BLOCK_T) tile, the
    # positions before the prompt read from the state (the last K-1 inputs of the cached tokens) or zero
    b = tl.program_id(2).to(tl.int64)
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    e_ok = es < E
    es64 = es.to(tl.int64)
    x_rows = x_ptr + b * sx_b + es64[:, None] * sx_e
    acc = tl.zeros((BLOCK_E, BLOCK_T), dtype=tl.float32)
    for j in tl.static_range(K):
        p = ts - (K - 1) + j  # the input position tap j reads
        xv = tl.load(x_rows + p[None, :], mask=e_ok[:, None] & ((p >= 0) & (p < T))[None, :], other=0.0)
        if HAS_STATE:
            sv = tl.load(s_ptr + b * ss_b + es64[:, None] * ss_e + (K - 1 + p)[None, :],
                         mask=e_ok[:, None] & (p < 0)[None, :], other=0.0)
            xv = tl.where((p < 0)[None, :], sv.to(xv.dtype), xv)
        w = tl.load(w_ptr + es64 * K + j, mask=e_ok, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * w[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + es, mask=e_ok, other=0.0).to(tl.float32)[:, None]
    y = acc / (1.0 + tl.exp(-acc))  # silu in fp32, rounded once
    tl.store(y_ptr + b * sy_b + es64[:, None] * sy_e + ts[None, :], y.to(y_ptr.dtype.element_ty),
             mask=e_ok[:, None] & (ts < T)[None, :])


# (BLOCK_E, BLOCK_T, num_warps): rows of T are contiguous, so a wide BLOCK_T keeps loads coalesced
CONV_TILE = (8, 256, 4)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
                  activation: str = "silu", resume: bool = True, length: int | None = None,
                  tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Depthwise causal conv over time with silu, as `reference.causal_conv1d`: x (B, E, T) with
    contiguous rows (any row stride), weight (E, K) -> y (B, E, T).

    With a `state` (B, E, K-1), the conv continues from the inputs it holds (when `resume`; else from
    zeros), and it is left holding the last K-1 inputs of the first `length` tokens (default: all T).
    `tile`: (BLOCK_E, BLOCK_T, num_warps) override, for tests and benchmarks.
    """
    if activation not in ("silu", "swish"):
        raise ValueError(f"the Triton conv applies silu, not {activation}")
    bsz, e, t = x.shape
    k = weight.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    y = torch.empty(bsz, e, t, dtype=x.dtype, device=x.device)
    block_e, block_t, warps = tile or current().tile("conv", CONV_TILE)
    with_state = state is not None and resume
    s = state if with_state else x  # a placeholder pointer without one
    if x.numel():
        _conv_kernel[(triton.cdiv(e, block_e), triton.cdiv(t, block_t), bsz)](
            x, weight, bias if bias is not None else weight, s, y, e, t, x.stride(0), x.stride(1),
            y.stride(0), y.stride(1), s.stride(0), s.stride(1), K=k, HAS_BIAS=bias is not None,
            HAS_STATE=with_state, BLOCK_E=block_e, BLOCK_T=block_t, num_warps=warps)
    if state is not None:
        keep_conv_state(x, state, resume, length)
    return y


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
    x_dt = rms_row(tl.load(row + rs, mask=rs < R, other=0.0).to(tl.float32), dtn_ptr + rs, R, eps, rs < R, dt)
    x_b = rms_row(tl.load(row + R + ns).to(tl.float32), bn_ptr + ns, N, eps, ns < N, dt)
    x_c = rms_row(tl.load(row + R + N + ns).to(tl.float32), cn_ptr + ns, N, eps, ns < N, dt)
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


# (conv channels per program, x_proj GEMV tile, state-update channels per program): the fastest in
# benchmarks/bench_kernels.py's sweep (results/kernels_h200.json, "mamba_step")
MAMBA_STEP_TILE = (128, (2, 1024, 4, 3), 16)


def mamba_step(xz: torch.Tensor, conv_state: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor | None,
               x_proj: torch.Tensor, dt_norm: torch.Tensor, b_norm: torch.Tensor, c_norm: torch.Tensor, eps: float,
               dt_proj: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
               ssm_state: torch.Tensor, config=None) -> torch.Tensor:
    """Mamba's decode step between in_proj and out_proj in three kernels: xz (B, 2E) -> y (B, E).

    Conv (silu); x_proj; the dt/B/C RMSNorms, dt_proj, softplus and the selective state update. The conv
    state (B, E, K-1) and SSM state (B, E, N) fp32 advance in place. Equal to that chain of PyTorch ops up
    to fp32 summation order. N must be a power of two.
    """
    b, e = xz.shape[0], xz.shape[1] // 2
    k, rt, n = conv_w.shape[-1], x_proj.shape[0], A.shape[1]
    block_e, xproj_config, block_e2 = config or current().tile("mamba_step", MAMBA_STEP_TILE)
    use_pdl = pdl() and b == 1
    u = torch.empty(b, e, dtype=xz.dtype, device=xz.device)
    _mamba_conv_kernel[(triton.cdiv(e, block_e), b)](
        xz, conv_state, conv_w, conv_b if conv_b is not None else conv_w, u, e, xz.stride(0), K=k,
        KP=triton.next_power_of_2(k), HAS_BIAS=conv_b is not None, BLOCK_E=block_e, USE_PDL=use_pdl, num_warps=4,
        launch_pdl=use_pdl)
    xdbc = gemv(u, x_proj, xproj_config)  # (B, R + 2N)
    y = torch.empty(b, e, dtype=xz.dtype, device=xz.device)
    r = rt - 2 * n
    _mamba_ssm_step_kernel[(triton.cdiv(e, block_e2), b)](
        xdbc, dt_norm, b_norm, c_norm, eps, dt_proj, dt_bias, A, D, xz, u, conv_state, ssm_state, y, e,
        xz.stride(0), R=r, N=n, BLOCK_R=triton.next_power_of_2(r), K=k, KP=triton.next_power_of_2(k),
        BLOCK_E=block_e2, USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return y
