"""Mamba kernels in plain PyTorch: depthwise causal conv and the selective scan, whole-prompt and one-step.

Layouts follow mamba-ssm / causal-conv1d so the CUDA kernels drop in behind the same calls:
x, u, delta, z: (B, E, T); A: (E, N) float32; Bm, Cm: (B, N, T); D, delta_bias: (E,) float32;
conv state: (B, E, K-1) model dtype; SSM state: (B, E, N) float32. States passed in are updated in place.

Numerics are those of the kernels (`selective_scan_ref`): delta + bias, softplus, exp and the recurrence
in float32; y = h·C + D·u; y *= silu(z); cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACT = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
       "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
       "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}

# Scan work is split into blocks of about this many (token, channel, state) elements to bound memory.
_BLOCK_ELEMS = 1 << 23


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  state: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Depthwise causal conv over time, continuing from `state` (the K-1 inputs before x) when given.

    x: (B, E, T), weight: (E, K) -> (B, E, T). `state` is replaced by the last K-1 inputs.
    """
    k = weight.shape[-1]
    if state is None:
        xp = F.pad(x, (k - 1, 0))
    else:
        xp = torch.cat([state.to(x.dtype), x], dim=-1)
        state.copy_(xp[..., xp.shape[-1] - (k - 1):])
    y = F.conv1d(xp, weight.unsqueeze(1), bias, groups=x.shape[1])
    return ACT[activation](y)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor,
                   state: torch.Tensor | None) -> torch.Tensor:
    """y_t = C_t·h_t + D·u_t, h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, gated by silu(z); starts from `state`.

    Chunked so the Python loop runs about 2·sqrt(T) steps, not T: inside blocks of c tokens every
    chunk first scans from zero (all chunks at once), the chunk-start states are then carried across
    chunks, and a second pass re-runs each chunk from its true start state to produce y.
    """
    b, e, t = u.shape
    n = A.shape[-1]
    h = torch.zeros(b, e, n, dtype=torch.float32, device=u.device) if state is None else state.float()
    dt = F.softplus(delta.float() + delta_bias.float()[:, None])  # (B, E, T)
    uf = u.float()
    y = torch.empty(b, e, t, dtype=torch.float32, device=u.device)
    c = max(8, min(64, 1 << max(0, math.ceil(math.log2(max(t, 1)) / 2))))  # chunk length ~ sqrt(T)
    block = max(c, (_BLOCK_ELEMS // max(1, b * e * n)) // c * c)
    for t0 in range(0, t, block):
        t1 = min(t, t0 + block)
        y[..., t0:t1], h = _scan_block(dt[..., t0:t1], uf[..., t0:t1], A, Bm[..., t0:t1].float(),
                                       Cm[..., t0:t1].float(), h, c)
    if state is not None:
        state.copy_(h)
    y = y + uf * D.float()[:, None]
    return (y * F.silu(z.float())).to(u.dtype)


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
    dt = F.softplus(delta.float() + delta_bias.float())  # (B, E)
    uf = u.float()
    dA = torch.exp(dt.unsqueeze(-1) * A)  # (B, E, N)
    h = torch.addcmul((dt * uf).unsqueeze(-1) * Bm.float().unsqueeze(1), dA, state.float())
    state.copy_(h)
    y = torch.matmul(h, Cm.float().unsqueeze(-1)).squeeze(-1) + uf * D.float()
    return (y * F.silu(z.float())).to(u.dtype)
