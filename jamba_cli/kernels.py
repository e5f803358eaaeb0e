"""Kernel dispatch: Mamba's causal conv and selective scan (whole-prompt and one-step), RMSNorm with the
residual add, SwiGLU, the MoE combine, and which one-token linears take our GEMV.

Each function runs the CUDA kernels of mamba-ssm / causal-conv1d and our Triton ones (`cuda_ops()`) when
its input is on a GPU and they are installed, and plain PyTorch everywhere else; `use("torch")` forces the
latter. The model calls the decode-step Triton kernels through `cuda_ops()` directly.
Layouts follow those kernels: x, u, delta, z: (B, E, T); A: (E, N) float32; Bm, Cm: (B, N, T);
D, delta_bias: (E,); conv state: (B, E, K-1) model dtype; SSM state: (B, E, N) float32.
States passed in are updated in place.

Numerics are those of the kernels (`selective_scan_ref`): delta + bias, softplus, exp and the recurrence
in float32; y = h·C + D·u; y *= silu(z); cast back to the input dtype.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ACT = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
       "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
       "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}

# Scan work is split into blocks of about this many (token, channel, state) elements to bound memory.
_BLOCK_ELEMS = 1 << 23
_backend = "auto"


def use(backend: str) -> None:
    """'auto': CUDA kernels when the tensors are on a GPU and the kernels are installed; 'torch': never."""
    global _backend
    if backend not in ("auto", "torch"):
        raise ValueError(f"kernels must be 'auto' or 'torch', not {backend!r}")
    _backend = backend


@functools.cache
def cuda_ops() -> SimpleNamespace | None:
    """mamba-ssm, causal-conv1d and our Triton kernels, or None when any of them is missing."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        from . import triton_attention, triton_gemv, triton_ops, triton_scan
    except Exception:  # ImportError, or a build that does not match this torch/CUDA
        return None
    return SimpleNamespace(conv=causal_conv1d_fn, conv_update=causal_conv1d_update, scan=selective_scan_fn,
                           state_update=selective_state_update, triton=triton_ops, gemv=triton_gemv,
                           attention=triton_attention, tscan=triton_scan)


def on_cuda(x: torch.Tensor, differentiable: bool = False) -> SimpleNamespace | None:
    """The CUDA kernels to use for `x`, or None for the PyTorch path.

    Our Triton kernels have no backward: while autograd records (training), only the kernels that do
    (`differentiable`: mamba-ssm's scan, causal-conv1d's conv) are used.
    """
    if _backend != "auto" or not x.is_cuda:
        return None
    if not differentiable and torch.is_grad_enabled() and x.requires_grad:
        return None
    return cuda_ops()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    ops = on_cuda(x)
    if ops is not None:
        return ops.triton.rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)  # cast back before the weight, as LlamaRMSNorm does


# Prefill's scan: our one-pass Triton kernel instead of mamba-ssm's outside autograd (benchmarks/bench_scan.py
# on an H200: 2.3x at 16K tokens, 1.7x at 2K; it takes a start state natively, where mamba-ssm needs a
# correction pass: 6x)
TRITON_SCAN = True

# Prefill attention (more than one new token, causal, no padding mask): our Triton flash-attention kernel
# instead of torch's SDPA (benchmarks/bench_attention.py on an H200: 1.5x FlashAttention-2 at 16K tokens)
PREFILL_ATTENTION = True

# One-token linears of the shapes in triton_gemv.LINEAR_CONFIGS go through our GEMV (faster than cuBLAS
# there, measured); False keeps every linear on cuBLAS
GEMV_LINEARS = True


def gemv_ops(x: torch.Tensor, weight: torch.Tensor) -> SimpleNamespace | None:
    """The kernels to run a bias-free linear on `x` with our GEMV, or None for the layer's own forward."""
    if not GEMV_LINEARS or x.numel() != x.shape[-1]:
        return None
    ops = on_cuda(x)
    return ops if ops is not None and tuple(weight.shape) in ops.gemv.LINEAR_CONFIGS else None


def add_rms_norm(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(h + y, RMSNorm(h + y)): a residual add and the next block's pre-norm, in one kernel on CUDA."""
    ops = on_cuda(h)
    if ops is not None:
        return ops.triton.add_rms_norm(h, y, weight, eps)
    total = h + y
    return total, rms_norm(total, weight, eps)


def moe_combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs y (T·k, H), row i belonging to (token, slot) pair order[i], weighted by weights (T, k)
    and summed per token -> (T, H); each term is rounded to the model dtype before the sum."""
    t, k = weights.shape
    ops = on_cuda(y)
    if ops is not None:
        slot = torch.empty_like(order)
        slot[order] = torch.arange(order.numel(), device=order.device)  # where each pair's row is in y
        return ops.triton.moe_combine(y, slot.view(t, k), weights)
    y = y * weights.flatten()[order, None]
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted.view(t, k, -1).sum(1)  # a sum per token, no atomics: deterministic


def act_mul(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up, in one pass on CUDA for silu (the SwiGLU of every MLP and expert)."""
    ops = on_cuda(gate) if act is F.silu else None
    if ops is not None:
        return ops.triton.silu_mul(gate, up)
    return act(gate) * up


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  state: torch.Tensor | None, activation: str, resume: bool = True,
                  length: int | None = None) -> torch.Tensor:
    """Depthwise causal conv over time. x: (B, E, T), weight: (E, K) -> (B, E, T).

    With a `state`, the conv continues from the K-1 inputs it holds (when `resume`; else from zeros)
    and is left holding the last K-1 inputs of the first `length` (default: all T), the real ones when x
    is padded at the end.
    """
    k = weight.shape[-1]
    ops = on_cuda(x, differentiable=state is None) if activation in ("silu", "swish") else None
    if ops is not None:
        # The kernel takes a start state only in the channel-last layout, so it runs from zeros and the
        # first K-1 outputs, the only ones the state reaches, are recomputed from it.
        y = ops.conv(x, weight, bias, activation="silu")
        if state is not None and resume:
            head = torch.cat([state.to(x.dtype), x[..., :k - 1]], dim=-1)  # (B, E, <= 2K-2)
            y[..., :k - 1] = F.silu(F.conv1d(head, weight.unsqueeze(1), bias, groups=x.shape[1]))
    else:
        history = F.pad(x, (k - 1, 0)) if state is None or not resume else torch.cat([state.to(x.dtype), x], -1)
        y = ACT[activation](F.conv1d(history, weight.unsqueeze(1), bias, groups=x.shape[1]))
    if state is not None:  # the last K-1 inputs, reaching into the old state for short chunks
        real = x if length is None else x[..., :length]
        tail = real[..., -(k - 1):]
        if tail.shape[-1] < k - 1:
            old = state if resume else torch.zeros_like(state)
            tail = torch.cat([old.to(x.dtype), real], dim=-1)[..., -(k - 1):]
        state.copy_(tail)
    return y


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                         activation: str) -> torch.Tensor:
    """One decode step of the conv: x (B, E) -> (B, E); `state` (B, E, K-1) shifts left by one."""
    ops = on_cuda(x) if activation in ("silu", "swish") else None
    if ops is not None:
        return ops.conv_update(x, state, weight, bias, activation="silu")
    xp = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (B, E, K)
    state.copy_(xp[..., 1:])
    y = (xp.float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return ACT[activation](y).to(x.dtype)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor,
                   state: torch.Tensor | None, resume: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = C_t·h_t + D·u_t, h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, gated by silu(z).

    h starts from `state` when `resume` (else from zero) and `state` is left holding the last h.
    y is written into `out` (B, E, T), any strides, when given, and returned.
    """
    h0 = state if resume else None
    ops = on_cuda(u, differentiable=h0 is None)
    n = A.shape[-1]
    triton_ok = TRITON_SCAN and n & (n - 1) == 0 and not (torch.is_grad_enabled() and u.requires_grad)
    if ops is not None and triton_ok:
        y, last = ops.tscan.selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, h0=h0, out=out)
        if state is not None:
            state.copy_(last)
        return y
    if ops is not None:
        # the kernel wants one dtype for u, Δ, B, C and z (under autocast the norms hand back fp32)
        delta, Bm, Cm, z = (t.to(u.dtype) for t in (delta, Bm, Cm, z))
        y, last = ops.scan(u, delta, A, Bm, Cm, D.float(), z if h0 is None else None, delta_bias.float(),
                           delta_softplus=True, return_last_state=True)
        if h0 is not None:  # selective_scan_fn always starts from h = 0: add h0's share, by linearity
            cum = F.softplus(delta.float() + delta_bias.float()[:, None]).cumsum(-1)  # (B, E, T)
            y = ops.triton.add_initial_state(y, z, cum, A, Cm, h0)
            last = last + torch.exp(cum[..., -1:] * A) * h0.float()
        if state is not None:
            state.copy_(last)
        return y if out is None else out.copy_(y)
    b, e, t = u.shape
    h = torch.zeros(b, e, n, dtype=torch.float32, device=u.device) if h0 is None else h0.float()
    dt = F.softplus(delta.float() + delta_bias.float()[:, None])  # (B, E, T)
    uf = u.float()
    y = torch.empty(b, e, t, dtype=torch.float32, device=u.device)
    # Chunked so the Python loop runs about 2·sqrt(T) steps, not T: inside blocks of c tokens every
    # chunk first scans from zero (all chunks at once), the chunk-start states are then carried across
    # chunks, and a second pass re-runs each chunk from its true start state to produce y.
    c = min(64, 1 << math.ceil(math.log2(max(t, 1)) / 2))
    block = max(c, (_BLOCK_ELEMS // max(1, b * e * n)) // c * c)
    for t0 in range(0, t, block):
        t1 = min(t, t0 + block)
        y[..., t0:t1], h = _scan_block(dt[..., t0:t1], uf[..., t0:t1], A, Bm[..., t0:t1].float(),
                                       Cm[..., t0:t1].float(), h, c)
    if state is not None:
        state.copy_(h)
    y = y + uf * D.float()[:, None]
    y = (y * F.silu(z.float())).to(u.dtype)
    return y if out is None else out.copy_(y)


def _scan_block(dt, u, A, Bm, Cm, h0, c):
    b, e, t = u.shape
    n = A.shape[-1]
    nc = -(-t // c)
    pad = nc * c - t
    if pad:  # Δ = 0 on padding: decay 1 and no input, so the state passes through unchanged
        dt, u, Bm, Cm = (F.pad(x, (0, pad)) for x in (dt, u, Bm, Cm))
    # (nc, c, B, E, N) so that step j of every chunk is one contiguous slice
    dt_ = dt.view(b, e, nc, c).permute(2, 3, 0, 1)  # (nc, c, B, E)
    dA = torch.exp(dt_.unsqueeze(-1) * A)  # (nc, c, B, E, N)
    dBu = (dt_ * u.view(b, e, nc, c).permute(2, 3, 0, 1)).unsqueeze(-1) \
        * Bm.view(b, n, nc, c).permute(2, 3, 0, 1).unsqueeze(-2)  # (nc, c, B, E, N)
    C_ = Cm.view(b, n, nc, c).permute(2, 3, 0, 1).unsqueeze(-1)  # (nc, c, B, N, 1)

    # per-step views through unbind, not indexing: the backward then gathers each gradient once
    # instead of once per step (linear in T, which training needs)
    dA_j, dBu_j, C_j = dA.unbind(1), dBu.unbind(1), C_.unbind(1)

    # pass 1: every chunk from a zero state
    hl = torch.zeros(nc, b, e, n, dtype=torch.float32, device=u.device)
    for j in range(c):
        hl = torch.addcmul(dBu_j[j], dA_j[j], hl)
    decay = torch.exp(dt_.sum(1).unsqueeze(-1) * A)  # (nc, B, E, N): product of dA over each chunk
    # pass 2: the true state at the start of each chunk
    starts = []
    h = h0
    for hl_i, decay_i in zip(hl.unbind(0), decay.unbind(0)):
        starts.append(h)
        h = torch.addcmul(hl_i, decay_i, h)
    # pass 3: rerun each chunk from its start state, reading y out
    hs = torch.stack(starts)
    ys = []
    for j in range(c):
        hs = torch.addcmul(dBu_j[j], dA_j[j], hs)
        ys.append(torch.matmul(hs, C_j[j]).squeeze(-1))
    ys = torch.stack(ys)  # (c, nc, B, E)
    y = ys.permute(2, 3, 1, 0).reshape(b, e, nc * c)[..., :t]
    return y, hs[-1]


def selective_state_update(state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                           Bm: torch.Tensor, Cm: torch.Tensor, D: torch.Tensor, z: torch.Tensor,
                           delta_bias: torch.Tensor) -> torch.Tensor:
    """One decode step. u, delta, z: (B, E); Bm, Cm: (B, N); state (B, E, N) updated in place -> (B, E)."""
    ops = on_cuda(u)
    if ops is not None:
        return ops.state_update(state, u, delta, A, Bm, Cm, D, z, delta_bias, dt_softplus=True)
    dt = F.softplus(delta.float() + delta_bias.float())  # (B, E)
    uf = u.float()
    dA = torch.exp(dt.unsqueeze(-1) * A)  # (B, E, N)
    h = torch.addcmul((dt * uf).unsqueeze(-1) * Bm.float().unsqueeze(1), dA, state.float())
    state.copy_(h)
    y = torch.matmul(h, Cm.float().unsqueeze(-1)).squeeze(-1) + uf * D.float()
    return (y * F.silu(z.float())).to(u.dtype)
