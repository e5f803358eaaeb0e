"""Mamba-1 selective scan over a prompt, in Triton (forward only).

Same math and contract as `reference.selective_scan`, all in fp32: Δ = softplus(delta + bias);
h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t; y_t = C_t·h_t + D u_t; y_t *= silu(z_t); y cast to u's dtype.
A start state is taken natively (no correction pass) and the last state is copied back into it.

One pass: a program owns BLOCK_E channels × N states and walks all of T in tiles of BLOCK_T tokens, so
each element costs one exp, the minimum. Tiles are laid out (BLOCK_T, N, BLOCK_E): Triton spreads the
last axis over a warp's lanes and the next one over the lanes left, so with BLOCK_E = 16 and one warp a
lane holds one channel's half of the states, and the scan over a tile runs as a chain inside each thread
(no shuffles); only the sums over N cross the two lanes. Each tile's loads are issued a few tiles ahead
(software pipelining, `stages`), which is what a program walking T in sequence needs to not wait on memory.
On a GPU the per-token softplus and silu take the special-function unit's approximate log2 and reciprocal
(the precise routines are a quarter of the loop's instructions otherwise); their errors, ~1e-7, are far
below the bf16 outputs' rounding.

What bounds it: at batch 1 there are only E·N/8 lanes, one warp per scheduler, so nothing hides the
latency of one instruction behind another warp's (profile notes and timings against mamba-ssm:
benchmarks/bench_scan.py, results/scan_h200.json).

Also here: `add_initial_state`, the term a start state adds to the output of a scan run from zero (the
correction mamba-ssm's scan needs, since it takes no start state).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import current


@triton.jit
def _approx(x, op: tl.constexpr):
    # one special-function-unit instruction (lg2.approx: absolute error below 2^-22; rcp.approx: relative
    # error below 2^-23), where tl.log and "/" compile to a precise routine of ~20 instructions
    return tl.inline_asm_elementwise(op + ".approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    # torch's threshold: above 20 softplus(x) == x in fp32
    if FAST:
        sp = _approx(1.0 + tl.exp2(x * 1.4426950408889634), "lg2") * 0.6931471805599453
    else:
        sp = tl.log(1.0 + tl.exp(x))
    return tl.where(x > 20.0, x, sp)


@triton.jit
def _silu(z, FAST: tl.constexpr):
    if FAST:
        return z * _approx(1.0 + tl.exp2(z * -1.4426950408889634), "rcp")
    return z * tl.sigmoid(z)


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier step: h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _tile(h, t0, T, u_rows, dt_rows, z_rows, y_rows, b_rows, c_rows, su_t, sd_t, sz_t, sb_t, sc_t, sy_t,
          a2, d, bias, e_ok, BLOCK_T: tl.constexpr, HAS_Z: tl.constexpr, FAST: tl.constexpr,
          MASKED: tl.constexpr):
    # tokens t0 .. t0+BLOCK_T of the program's channels, from state h; returns the state after them.
    # Unmasked tiles (all but the last of a ragged T) skip the bounds checks: a fifth of the loop's
    # instructions by the sm_90 SASS.
    ts = t0 + tl.arange(0, BLOCK_T)
    first = (tl.arange(0, BLOCK_T) == 0)[:, None, None]
    last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None, None]
    if MASKED:
        t_ok = ts < T
        m = e_ok[:, None] & t_ok[None, :]  # (BLOCK_E, BLOCK_T), as the tiles are read
        u = tl.load(u_rows + ts[None, :] * su_t, mask=m, other=0.0).to(tl.float32)
        dt = tl.load(dt_rows + ts[None, :] * sd_t, mask=m, other=0.0).to(tl.float32)
        dt = tl.where(m, _softplus(dt + bias[:, None], FAST), 0.0)  # Δ = 0 past the end: the state passes through
        bt = tl.load(b_rows + ts[None, :] * sb_t, mask=t_ok[None, :], other=0.0)  # (N, BLOCK_T)
        ct = tl.load(c_rows + ts[None, :] * sc_t, mask=t_ok[None, :], other=0.0)
    else:
        u = tl.load(u_rows + ts[None, :] * su_t).to(tl.float32)
        dt = _softplus(tl.load(dt_rows + ts[None, :] * sd_t).to(tl.float32) + bias[:, None], FAST)
        bt = tl.load(b_rows + ts[None, :] * sb_t)
        ct = tl.load(c_rows + ts[None, :] * sc_t)
    dtt = tl.trans(dt)  # (BLOCK_T, BLOCK_E)
    decay = tl.exp2(dtt[:, None, :] * a2[None, :, :])  # (BLOCK_T, N, BLOCK_E)
    inp = tl.trans(dt * u)[:, None, :] * tl.trans(bt)[:, :, None]
    # the carried state enters as part of the first step's input: the scan's states are then the true
    # ones, and its running product of decays goes unused, so the compiler drops it
    inp = tl.where(first, decay * h[None, :, :] + inp, inp)
    _, hs = tl.associative_scan((decay, inp), axis=0, combine_fn=_combine)
    y = tl.trans(tl.sum(hs * tl.trans(ct)[:, :, None], axis=1)) + d[:, None] * u  # (BLOCK_E, BLOCK_T)
    h = tl.sum(tl.where(last, hs, 0.0), axis=0)  # padding steps keep the state: this is the last real one
    if HAS_Z:
        if MASKED:
            z = tl.load(z_rows + ts[None, :] * sz_t, mask=m, other=0.0)
        else:
            z = tl.load(z_rows + ts[None, :] * sz_t)
        y = y * _silu(z.to(tl.float32), FAST)
    if MASKED:
        tl.store(y_rows + ts[None, :] * sy_t, y.to(y_rows.dtype.element_ty), mask=m)
    else:
        tl.store(y_rows + ts[None, :] * sy_t, y.to(y_rows.dtype.element_ty))
    return h


@triton.jit
def _scan_kernel(u_ptr, dt_ptr, z_ptr, a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, h0_ptr, y_ptr, last_ptr, E, T,
                 su_b, su_e, su_t, sd_b, sd_e, sd_t, sz_b, sz_e, sz_t,
                 sb_b, sb_n, sb_t, sc_b, sc_n, sc_t, sy_b, sy_e, sy_t,
                 N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, RAGGED_E: tl.constexpr,
                 HAS_H0: tl.constexpr, HAS_Z: tl.constexpr, STAGES: tl.constexpr, FAST: tl.constexpr):
    # program: BLOCK_E channels of batch row b, over all T tokens
    pe, b = tl.program_id(0), tl.program_id(1)
    es = pe * BLOCK_E + tl.arange(0, BLOCK_E)
    ns = tl.arange(0, N)
    e_ok = es < E
    es64, b64 = es.to(tl.int64), b.to(tl.int64)
    # A and the state are read (BLOCK_E, N), as they lie in memory, and used transposed
    a2 = tl.load(a_ptr + es64[:, None] * N + ns[None, :], mask=e_ok[:, None], other=0.0) * 1.4426950408889634
    a2 = tl.trans(a2)  # (N, BLOCK_E), in log2 units
    d = tl.load(d_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
    state = (b64 * E + es64[:, None]) * N + ns[None, :]  # (BLOCK_E, N) into (B, E, N)
    if HAS_H0:
        h = tl.trans(tl.load(h0_ptr + state, mask=e_ok[:, None], other=0.0))
    else:
        h = tl.zeros((N, BLOCK_E), dtype=tl.float32)
    u_rows = u_ptr + b64 * su_b + es64[:, None] * su_e
    dt_rows = dt_ptr + b64 * sd_b + es64[:, None] * sd_e
    z_rows = z_ptr + b64 * sz_b + es64[:, None] * sz_e
    y_rows = y_ptr + b64 * sy_b + es64[:, None] * sy_e
    b_rows = b_ptr + b64 * sb_b + ns[:, None] * sb_n
    c_rows = c_ptr + b64 * sc_b + ns[:, None] * sc_n
    whole = T // BLOCK_T * BLOCK_T
    for t0 in tl.range(0, whole, BLOCK_T, num_stages=STAGES):
        h = _tile(h, t0, T, u_rows, dt_rows, z_rows, y_rows, b_rows, c_rows, su_t, sd_t, sz_t, sb_t, sc_t, sy_t,
                  a2, d, bias, e_ok, BLOCK_T, HAS_Z, FAST, RAGGED_E)
    if whole < T:
        h = _tile(h, whole, T, u_rows, dt_rows, z_rows, y_rows, b_rows, c_rows, su_t, sd_t, sz_t, sb_t, sc_t,
                  sy_t, a2, d, bias, e_ok, BLOCK_T, HAS_Z, FAST, True)
    tl.store(last_ptr + state, tl.trans(h), mask=e_ok[:, None])


# the fastest of benchmarks/bench_scan.py's sweep at 2K-64K tokens (results/scan_h200.json)
SCAN_TILE = dict(block_e=16, block_t=16, num_warps=1, stages=3)


def _rows(b: int, r: int, t: int, dtype: torch.dtype, device) -> torch.Tensor:
    # (b, r, t) whose rows start on 16-byte boundaries (stride a multiple of 8 elements): the kernel's row
    # loads and stores are then whole vectors; y's rows also suit the out_proj GEMM that reads them
    return torch.empty(b, r, -(-t // 8) * 8, dtype=dtype, device=device)[..., :t]


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                   state: torch.Tensor | None = None, resume: bool = True, out: torch.Tensor | None = None,
                   **tile) -> torch.Tensor:
    """y_t = C_t·h_t + D·u_t, h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, gated by silu(z) when z is given.

    Args:
        u, delta, z: (B, E, T); rows may be strided views (e.g. halves of one (B, 2E, T) tensor).
        A: (E, N) float32, N a power of two. Bm, Cm: (B, N, T), any strides. D, delta_bias: (E,).
        state: (B, E, N): h starts from it when `resume` (else from zero) and is left holding the last h.
        out: (B, E, T) for y, any strides, or None for a new tensor.
        **tile: block_e, block_t, num_warps, stages overrides (benchmarks); see SCAN_TILE.

    Returns:
        y (B, E, T) in u's dtype (a new tensor's rows are padded to a multiple of 8 elements).
    """
    cfg = {**current().tile("scan", SCAN_TILE), **tile}
    bsz, e, t = u.shape
    n = A.shape[-1]
    dev = u.device
    A = A.float().contiguous()
    D = D.float().contiguous()
    bias = torch.zeros(e, device=dev) if delta_bias is None else delta_bias.float().contiguous()
    y = _rows(bsz, e, t, u.dtype, dev) if out is None else out
    h0 = state.float().contiguous() if state is not None and resume else None
    last = torch.empty(bsz, e, n, dtype=torch.float32, device=dev)
    # B and C are small (N values per token): fp32 with T contiguous spares the kernel a conversion per
    # element and lets it read whole rows (a fifth fewer instructions in its loop)
    Bm, Cm = _rows(bsz, n, t, torch.float32, dev).copy_(Bm), _rows(bsz, n, t, torch.float32, dev).copy_(Cm)
    zz = u if z is None else z  # a placeholder pointer when there is no gate
    _scan_kernel[(triton.cdiv(e, cfg["block_e"]), bsz)](
        u, delta, zz, A, Bm, Cm, D, bias, h0, y, last, e, t,
        *u.stride(), *delta.stride(), *zz.stride(), *Bm.stride(), *Cm.stride(), *y.stride(),
        N=n, BLOCK_E=cfg["block_e"], BLOCK_T=cfg["block_t"], RAGGED_E=e % cfg["block_e"] != 0,
        HAS_H0=h0 is not None, HAS_Z=z is not None,
        STAGES=cfg["stages"], FAST=u.is_cuda,  # PTX where there is a GPU: Triton's interpreter runs tl.log
        num_warps=cfg["num_warps"])
    if state is not None:
        state.copy_(last)
    return y


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
