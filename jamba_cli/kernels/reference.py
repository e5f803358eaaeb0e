"""The PyTorch reference of every kernel: the definition the fast paths are tested against, and what runs
on a CPU, on Apple GPUs, and wherever `KernelOptions(backend="torch")` asks for it.

A function here and the one of the same name under `kernels/triton/` (or `kernels/compiled.py`) take the
same arguments and return the same thing. Layouts: x, u, delta, z: (B, E, T) channel-first; A: (E, N)
float32; Bm, Cm: (B, N, T); D, delta_bias: (E,); conv state (B, E, K-1) in the model dtype; SSM state
(B, E, N) float32. States passed in are updated in place.

Numerics are those of mamba-ssm's `selective_scan_ref`: delta + bias, softplus, exp and the recurrence in
float32; y = h·C + D·u; y *= silu(z); cast back to the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

ACT = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
       "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
       "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}

# The chunked scan works in blocks of about this many (token, channel, state) elements, bounding its memory;
# `KernelOptions.tiles["reference_scan_block"]` raises it where memory is plenty (training windows).
SCAN_BLOCK_ELEMS = 1 << 23


# ------------------------------------------------------------------------------------- norms, activations

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32, cast back before the weight (as LlamaRMSNorm does)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(h + y, RMSNorm(h + y)): a residual add and the next block's pre-norm."""
    total = h + y
    return total, rms_norm(total, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: SwiGLU's gating."""
    return F.silu(gate) * up


# -------------------------------------------------------------------------------------- feed-forward, MoE

def linear8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (weight · scale)ᵀ for an 8-bit weight (N, K) with row scales (N,): the weight is widened to x's
    dtype (int8 and e4m3 values are exact in bf16 and fp16) and the scale applied to the fp32 result."""
    return (F.linear(x, weight.to(x.dtype)).float() * scale).to(x.dtype)


def router_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """Router logits of tokens x (T, H) for router (X, H) -> (T, X) float32 holding x's-dtype values."""
    return F.linear(x, router).float()


def swiglu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               logits: torch.Tensor | None = None, top_k: int = 1) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for tokens x (T, H).

    Dense: gate, up (I, H), down (H, I). Experts: gate, up (X, I, H), down (X, H, I) and router `logits`
    (T, X): each token goes through its top_k experts by softmax probability, and their outputs are summed
    weighted by those probabilities (in the model dtype, not renormalised).
    """
    if logits is None:
        return F.linear(silu_mul(F.linear(x, gate), F.linear(x, up)), down)
    w, idx = torch.topk(F.softmax(logits.float(), dim=-1), top_k, dim=-1)
    w = w.to(x.dtype)
    return experts_loop(x, idx, w, lambda e, rows: F.linear(silu_mul(F.linear(rows, gate[e]), F.linear(rows, up[e])),
                                                            down[e]))


def experts_loop(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                 expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j w[t, j] · expert(idx[t, j], x[t]) for tokens x (T, H), idx/w (T, k): each expert runs once, on
    the tokens routed to it (a host sync to learn which experts are used)."""
    out = torch.zeros_like(x)
    for e in idx.unique().tolist():
        tok, slot = torch.where(idx == e)
        y = expert(e, x[tok])
        out.index_add_(0, tok, (y * w[tok, slot, None]).to(x.dtype))
    return out


def moe_combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs y (T·k, H), row i belonging to (token, slot) pair order[i], weighted by weights (T, k)
    and summed per token -> (T, H); each term is rounded to the model dtype before the sum."""
    t, k = weights.shape
    y = y * weights.flatten()[order, None]
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted.view(t, k, -1).sum(1)  # a sum per token, no atomics: deterministic


# ----------------------------------------------------------------------------------------------- attention

def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Causal attention of T new queries (B, A, T, Dh) to the S = offset + T keys k, v (B, G, S, Dh) before
    and including them (A a multiple of G) -> (B, T, A, Dh)."""
    t = q.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if offset == 0:
        with sdpa_backends():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
    elif t * (offset + t) <= 1 << 24:  # the queries sit at the end: query i sees keys 0 .. offset + i
        s = offset + t
        mask = torch.arange(s, device=q.device)[None] <= torch.arange(offset, s, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    else:  # a mask too large to materialise: torch's lower-right causal bias, computed blockwise
        # imported only here: the module pulls in torch._dynamo, seconds of start-up most runs never need
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, offset + t), enable_gqa=gqa)
    return out.transpose(1, 2)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q (B, A, T, Dh) to k, v (B, G, S, Dh) where `mask` (B, 1, T, S) is True -> (B, T, A, Dh)."""
    with sdpa_backends():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def sdpa_backends():
    # cuDNN's SDPA has failed (illegal memory access) on a 64K-token causal prompt, and builds a plan for
    # each new prompt length (a delay before the first token): FlashAttention-2 and the rest do neither
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """One query position against S cached ones, reading each K/V head once (no repeat for grouped heads).

    q: (B, A, 1, Dh), k/v: (B, G, S, Dh), valid: (S,) or (B, S) bool -> (B, A, 1, Dh)."""
    b, a, _, d = q.shape
    g = k.shape[1]
    qg = q.view(b, g, a // g, d)  # query heads j·A/G ... grouped under K/V head j
    scores = torch.matmul(qg, k.transpose(-1, -2)) * d ** -0.5  # (B, G, A/G, S)
    if valid is not None:
        valid = valid.view(-1, 1, 1, valid.shape[-1])
        scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v).view(b, a, 1, d)


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Write k_new/v_new (B, G, 1, Dh) into the static cache (B, G, capacity, Dh) at the device position
    `pos` (1,), then attend the queries q (B, A, 1, Dh) to positions 0..pos (and `key_mask` (B, capacity))
    -> (B, A, Dh). `pos` is never read on the host, so a CUDA graph can replay the step as it advances."""
    cache_k.index_copy_(2, pos, k_new.reshape(*k_new.shape[:2], 1, -1))
    cache_v.index_copy_(2, pos, v_new.reshape(*v_new.shape[:2], 1, -1))
    valid = torch.arange(cache_k.shape[2], device=q.device) <= pos  # (capacity,)
    out = attend_one(q.reshape(q.shape[0], q.shape[1], 1, -1), cache_k, cache_v,
                     valid if key_mask is None else valid & key_mask)
    return out.view(q.shape[0], q.shape[1], -1)


# ------------------------------------------------------------------------------------------------- Mamba

def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
                  activation: str = "silu", resume: bool = True, length: int | None = None) -> torch.Tensor:
    """Depthwise causal conv over time, then the activation. x: (B, E, T), weight: (E, K) -> (B, E, T).

    With a `state`, the conv continues from the K-1 inputs it holds (when `resume`; else from zeros)
    and is left holding the last K-1 inputs of the first `length` (default: all T), the real ones when x
    is padded at the end.
    """
    k = weight.shape[-1]
    history = F.pad(x, (k - 1, 0)) if state is None or not resume else torch.cat([state.to(x.dtype), x], -1)
    y = ACT[activation](F.conv1d(history, weight.unsqueeze(1), bias, groups=x.shape[1]))
    if state is not None:
        keep_conv_state(x, state, resume, length)
    return y


def keep_conv_state(x: torch.Tensor, state: torch.Tensor, resume: bool, length: int | None) -> None:
    """Leave in `state` (B, E, K-1) the last K-1 inputs of x's first `length` tokens, reaching into the old
    state (or zeros, without `resume`) when there are fewer."""
    k1 = state.shape[-1]
    real = x if length is None else x[..., :length]
    tail = real[..., -k1:]
    if tail.shape[-1] < k1:
        old = state if resume else torch.zeros_like(state)
        tail = torch.cat([old.to(x.dtype), real], dim=-1)[..., -k1:]
    state.copy_(tail)


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                         activation: str = "silu") -> torch.Tensor:
    """One decode step of the conv: x (B, E) -> (B, E); `state` (B, E, K-1) shifts left by one."""
    xp = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (B, E, K)
    state.copy_(xp[..., 1:])
    y = (xp.float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return ACT[activation](y).to(x.dtype)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, state: torch.Tensor | None = None,
                   resume: bool = True, out: torch.Tensor | None = None, block_elems: int = SCAN_BLOCK_ELEMS
                   ) -> torch.Tensor:
    """y_t = C_t·h_t + D·u_t, h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, gated by silu(z).

    h starts from `state` when `resume` (else from zero) and `state` is left holding the last h.
    y is written into `out` (B, E, T), any strides, when given, and returned. Differentiable (training).
    """
    b, e, t = u.shape
    n = A.shape[-1]
    h = torch.zeros(b, e, n, dtype=torch.float32, device=u.device) if state is None or not resume \
        else state.float()
    dt = F.softplus(delta.float() + delta_bias.float()[:, None])  # (B, E, T)
    uf = u.float()
    y = torch.empty(b, e, t, dtype=torch.float32, device=u.device)
    # Chunked so the Python loop runs about 2·sqrt(T) steps, not T: inside blocks of c tokens every
    # chunk first scans from zero (all chunks at once), the chunk-start states are then carried across
    # chunks, and a second pass re-runs each chunk from its true start state to produce y.
    c = min(64, 1 << math.ceil(math.log2(max(t, 1)) / 2))
    block = max(c, (block_elems // max(1, b * e * n)) // c * c)
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
    dt = F.softplus(delta.float() + delta_bias.float())  # (B, E)
    uf = u.float()
    dA = torch.exp(dt.unsqueeze(-1) * A)  # (B, E, N)
    h = torch.addcmul((dt * uf).unsqueeze(-1) * Bm.float().unsqueeze(1), dA, state.float())
    state.copy_(h)
    y = torch.matmul(h, Cm.float().unsqueeze(-1)).squeeze(-1) + uf * D.float()
    return (y * F.silu(z.float())).to(u.dtype)


def mamba_step(xz: torch.Tensor, conv_state: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor | None,
               x_proj, dt_norm: torch.Tensor, b_norm: torch.Tensor, c_norm: torch.Tensor, eps: float,
               dt_proj: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
               ssm_state: torch.Tensor, activation: str = "silu", *, norm=rms_norm,
               conv_update=causal_conv1d_update, state_update=selective_state_update) -> torch.Tensor:
    """Mamba's decode step between in_proj and out_proj: xz (B, 2E) -> y (B, E).

    u, z = xz; u = act(conv(u)) one step on; dt, B, C = x_proj(u); Δ = dt_proj(RMSNorm(dt)) (its bias is
    added in fp32 with the softplus); the selective state update with RMSNorm(B), RMSNorm(C); gated by
    silu(z). The conv state (B, E, K-1) and SSM state (B, E, N) float32 advance in place. `x_proj` is its
    weight (R + 2N, E) or a module computing it; `norm`, `conv_update`, `state_update` are the primitives
    (these by default; the dispatcher passes faster ones of the same contract).
    """
    u, z = xz.chunk(2, dim=-1)  # (B, E) each
    u = conv_update(u, conv_w, conv_b, conv_state, activation)
    xdbc = x_proj(u) if callable(x_proj) else F.linear(u, x_proj)
    n = A.shape[-1]
    dt, Bm, Cm = xdbc.split([xdbc.shape[-1] - 2 * n, n, n], dim=-1)
    delta = F.linear(norm(dt, dt_norm, eps), dt_proj)  # (B, E); the bias is added in fp32
    return state_update(ssm_state, u, delta, A, norm(Bm, b_norm, eps), norm(Cm, c_norm, eps), D, z, dt_bias)
