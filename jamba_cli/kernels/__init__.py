"""The kernel seam: every operation the model calls that has more than one implementation.

The model (`model.py`) calls these functions with tensors and modules and never chooses an implementation;
each function here picks one from the active `KernelOptions`, the tensors' device and what is installed:

- our Triton kernels (`kernels/triton/`) on CUDA wherever Triton is installed: norms, SwiGLU, the MoE
  combine, the decode-step GEMVs (dense, fused SwiGLU, routed experts that read only the chosen ones), the
  Mamba decode step, the prompt's selective scan and causal conv, prompt and decode attention;
- mamba-ssm / causal-conv1d (`kernels/compiled.py`), each on its own, where installed and chosen, and for
  training (they have a backward pass);
- the PyTorch reference (`kernels/reference.py`) everywhere else: CPU, Apple GPUs, `backend="torch"`.

Modules declare which fused kernels may read their weights with an attribute `weight_format`: "dense"
means plain tensors in the model dtype (our Linear and Experts); "int8" and "fp8" our 8-bit layers
(quant8.py), whose weights come with float32 row scales. Modules without it (bitsandbytes ones) only ever
run their own forward.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import compiled, reference, scaled
from .options import KernelOptions, current, using
from .reference import ACT

__all__ = ["KernelOptions", "current", "using", "available", "ACT", "rms_norm", "add_rms_norm", "act_mul",
           "linear", "mlp", "moe", "grouped_experts", "moe_combine", "attention", "causal_conv1d",
           "causal_conv1d_update", "selective_scan", "selective_state_update", "mamba_step", "fp8_supported"]


@functools.cache
def _triton() -> SimpleNamespace | None:
    """Our Triton kernel modules, or None where Triton is missing (or fails to import)."""
    try:
        from .triton import attention, gemm8, gemv, mamba, ops, scan
    except Exception:
        return None
    return SimpleNamespace(attention=attention, gemm8=gemm8, gemv=gemv, mamba=mamba, ops=ops, scan=scan)


def available() -> dict[str, bool]:
    """Which kernel families this installation has: triton (ours), mamba_ssm, causal_conv1d."""
    return {"triton": _triton() is not None, "mamba_ssm": compiled.mamba_ssm() is not None,
            "causal_conv1d": compiled.causal_conv1d_lib() is not None}


def _recording(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _gpu(x: torch.Tensor) -> bool:
    """Whether x may take a GPU kernel at all under the active options."""
    return x.is_cuda and current().backend == "auto"


def _ours(x: torch.Tensor) -> SimpleNamespace | None:
    """Our Triton kernels for x, or None. They have no backward pass: never while autograd records."""
    return _triton() if _gpu(x) and not _recording(x) else None


def _dense(*modules) -> bool:
    return all(getattr(m, "weight_format", None) == "dense" for m in modules)


def _8bit(*modules) -> bool:
    """Whether all of `modules` are our 8-bit layers of one format."""
    formats = {getattr(m, "weight_format", None) for m in modules}
    return len(formats) == 1 and formats <= {"int8", "fp8"}


fp8_supported = scaled.supported


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ----------------------------------------------------------------------------------- norms, activations

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (rows of x may be strided)."""
    ops = _ours(x)
    return ops.ops.rms_norm(x, weight, eps) if ops else reference.rms_norm(x, weight, eps)


def add_rms_norm(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(h + y, RMSNorm(h + y)): a residual add and the next block's pre-norm, one pass on a GPU."""
    ops = _ours(h)
    return ops.ops.add_rms_norm(h, y, weight, eps) if ops else reference.add_rms_norm(h, y, weight, eps)


def act_mul(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up (the gating of every SwiGLU), one pass on a GPU for silu."""
    ops = _ours(gate) if act is F.silu else None
    return ops.ops.silu_mul(gate, up) if ops else act(gate) * up


# ------------------------------------------------------------------------------------------------ linears

# Up to this many tokens a linear with 8-bit weights is our GEMV (it reads the weight once per token);
# beyond, a GEMM
GEMV8_MAX_TOKENS = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias). One token on a GPU takes our GEMV where it was tuned for the weight's shape.

    An 8-bit weight (int8 or float8 e4m3, quant8.py) comes with its row scales `scale` (N,) float32:
    x @ (weight · scale)ᵀ. On a GPU: our GEMV for a few tokens, a float8 GEMM with per-token activation
    scales for a prompt where the GPU has float8, else our GEMM that dequantizes tile by tile; on the CPU,
    the weight dequantized in x's dtype."""
    if scale is not None:
        y = _linear8(x, weight, scale)
        return y if bias is None else y + bias
    if bias is None and x.numel() == x.shape[-1] and current().gemv_linears:
        ops = _ours(x)
        if ops and ops.gemv.has_linear_tile(*weight.shape):
            return ops.gemv.gemv(x, weight)
    return F.linear(x, weight, bias)


def _linear8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    ops = _ours(x)
    if ops is None:
        return reference.linear8(x, weight, scale)
    if rows.shape[0] <= GEMV8_MAX_TOKENS:
        return ops.gemv.gemv(x, weight, scale=scale)
    if weight.dtype == torch.float8_e4m3fn and scaled.supported(x.device) and scaled.shapes_ok(k, weight.shape[0]):
        return scaled.linear(rows, weight, scale).view(*x.shape[:-1], -1)
    return ops.gemm8.linear8(rows, weight, scale).view(*x.shape[:-1], -1)


def mlp(x: torch.Tensor, gate_proj, up_proj, down_proj, act) -> torch.Tensor:
    """down(act(gate(x)) * up(x)); one token on a GPU: gate, up and SwiGLU in one GEMV kernel, down in another."""
    projs = (gate_proj, up_proj, down_proj)
    eight = _8bit(*projs)
    if act is F.silu and x.numel() == x.shape[-1] and (_dense(*projs) or eight) \
            and all(p.bias is None for p in projs):
        ops = _ours(x)
        if ops:  # 8-bit weights: their row scales applied in the kernels' epilogues
            scales = tuple(p.weight_scale for p in projs) if eight else None
            return ops.gemv.swiglu_mlp(x.reshape(1, -1), *(p.weight for p in projs), scales=scales).view_as(x)
    return down_proj(act_mul(act, gate_proj(x), up_proj(x)))


# Up to this many tokens the routed-expert GEMVs beat the grouped GEMM (benchmarks/bench_kernels.py,
# results/kernels_h200.json): a decode step, or a batch of up to 8 sequences
MOE_GEMV_MAX_TOKENS = 8


def moe(x: torch.Tensor, router, experts, top_k: int) -> torch.Tensor:
    """Tokens x (T, H) through their top_k experts -> (T, H).

    The router's logits go through a softmax over all X experts in fp32; each token's top_k probabilities
    weight the outputs of its top_k experts (not renormalised: Jamba is not Mixtral). `experts` is a module
    with `expert(e, x)`, and stacked `gate_up_proj` (X, 2I, H), `down_proj` (X, H, I) when dense or 8-bit
    (quant8.Experts8, with their row scales).
    """
    routable = router.bias is None and (_dense(router) or _8bit(router)) and experts.act is F.silu
    eight = routable and _8bit(experts)
    fused = routable and _dense(experts)
    ops = _ours(x) if fused or eight else None
    if ops and x.shape[0] <= MOE_GEMV_MAX_TOKENS:  # routing (softmax, top-k) inside the expert kernels
        i = experts.down_proj.shape[-1]
        return ops.gemv.swiglu_mlp(x, experts.gate_up_proj[:, :i], experts.gate_up_proj[:, i:], experts.down_proj,
                                   _router_logits(ops, x, router), top_k, scales=experts.scales() if eight else None)
    probs = F.softmax(router(x), dim=-1, dtype=torch.float32)  # (T, X)
    w, idx = torch.topk(probs, top_k, dim=-1)  # (T, k)
    w = w.to(x.dtype)
    if ops and eight:  # no host sync: float8 grouped GEMMs where the GPU has them, else ours
        fp8 = experts.weight_format == "fp8" and scaled.supported(x.device) \
            and scaled.shapes_ok(x.shape[-1], experts.down_proj.shape[-1])
        return grouped_experts(x, idx, w, experts.gate_up_proj, experts.down_proj,
                               mm=scaled.grouped_linear if fp8 else ops.gemm8.grouped_linear8,
                               scales=(experts.gate_up_scale, experts.down_scale))
    if fused and x.dtype == torch.bfloat16 and _gpu(x) and not _recording(x) and hasattr(torch, "_grouped_mm"):
        return grouped_experts(x, idx, w, experts.gate_up_proj, experts.down_proj)  # no host sync
    return reference.experts_loop(x, idx, w, experts.expert)


def _router_logits(ops, x: torch.Tensor, router) -> torch.Tensor:
    """(T, X) float32 router logits (values in x's dtype): our router GEMV, or an 8-bit router's own forward."""
    return ops.gemv.router_logits(x, router.weight) if _dense(router) else router(x).float()


def grouped_experts(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, mm=None, scales=None) -> torch.Tensor:
    """SwiGLU experts over the (token, slot) pairs sorted by expert, in two grouped GEMMs (bf16):
    x (T, H), idx/w (T, k), gate_up (X, 2I, H), down (X, H, I) -> (T, H). 8-bit weights come with the
    grouped product `mm(rows, weight, scale, offs)` and their row `scales` (gate_up (X, 2I), down (X, H))."""
    t, k = idx.shape
    flat = idx.flatten()  # (T·k,)
    order = flat.argsort(stable=True)
    counts = torch.zeros(gate_up.shape[0], dtype=torch.long, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
    rows = x.index_select(0, order // k)  # (T·k, H)
    if mm is None:
        gate, up = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(act_mul(F.silu, gate, up), down.transpose(1, 2), offs=offs)
    else:
        gate, up = mm(rows, gate_up, scales[0], offs).chunk(2, dim=-1)
        y = mm(act_mul(F.silu, gate, up), down, scales[1], offs)
    return moe_combine(y, order, w)


def moe_combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs y (T·k, H), row i belonging to (token, slot) pair order[i], weighted by weights (T, k)
    and summed per token -> (T, H)."""
    ops = _ours(y)
    return ops.ops.moe_combine(y, order, weights) if ops else reference.moe_combine(y, order, weights)


# ---------------------------------------------------------------------------------------------- attention

PREFILL_HEAD_DIMS = (16, 32, 64, 128)  # the head sizes our prompt-attention kernel is built for


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, at) -> torch.Tensor:
    """softmax(q·kᵀ/√Dh + mask)·v for the T new queries, causal, padding masked -> (B, T, A, Dh).

    q: (B, A, T, Dh); k, v: (B, G, T, Dh) of the new tokens, appended to `cache` (an AttnCache, or None)
    first. `at` (cache.Span) says where the tokens sit: `offset`, `pos` (a static cache's device position),
    `key_mask` and `attention_mask()` (padding).
    """
    b, a, t, d = q.shape
    if cache is not None and at.pos is not None and t == 1:  # a static cache's decode step: graph-replayable
        ops = _ours(q)
        step = ops.attention.decode_attention if ops else reference.decode_attention
        return step(q, k, v, cache.k, cache.v, at.pos, at.key_mask).view(b, 1, a, d)
    if cache is not None:
        k, v = cache.append(k, v, at.offset)  # (B, G, S, Dh): all the sequence's keys so far
        if t == 1:
            return reference.attend_one(q, k, v, at.key_mask).transpose(1, 2)
    mask = at.attention_mask()
    if mask is not None:
        return reference.masked_attention(q, k, v, mask)
    if t > 1 and current().attention == "triton" and d in PREFILL_HEAD_DIMS:
        ops = _ours(q)
        if ops:  # grouped query heads read their K/V head in place
            return ops.attention.prefill_attention(q, k, v, at.offset)
    return reference.prefill_attention(q, k, v, at.offset)


# -------------------------------------------------------------------------------------------------- Mamba

def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
                  activation: str, resume: bool = True, length: int | None = None) -> torch.Tensor:
    """Depthwise causal conv over time, then the activation: x (B, E, T), weight (E, K) -> (B, E, T); see
    `reference.causal_conv1d` for the state."""
    if activation in ("silu", "swish") and _gpu(x):
        lib = compiled.causal_conv1d_lib()
        ours = _ours(x)
        if lib and (current().conv == "causal_conv1d" or not ours) and (state is None or not _recording(x)):
            return compiled.causal_conv1d(x, weight, bias, state, activation, resume, length)
        if ours:
            return ours.mamba.causal_conv1d(x, weight, bias, state, activation, resume, length)
    return reference.causal_conv1d(x, weight, bias, state, activation, resume, length)


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                         activation: str) -> torch.Tensor:
    """One decode step of the conv: x (B, E) -> (B, E); `state` (B, E, K-1) shifts left by one."""
    if activation in ("silu", "swish") and _gpu(x) and compiled.causal_conv1d_lib():
        return compiled.causal_conv1d_update(x, weight, bias, state, activation)
    return reference.causal_conv1d_update(x, weight, bias, state, activation)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, state: torch.Tensor | None = None,
                   resume: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = C_t·h_t + D·u_t, h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, gated by silu(z); see
    `reference.selective_scan` for the state and `out`."""
    options = current()
    if _gpu(u):
        ours = _ours(u) if _power_of_two(A.shape[-1]) else None
        lib = compiled.mamba_ssm()
        if ours and (options.scan == "triton" or not lib):
            return ours.scan.selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, state, resume, out)
        if lib and (not _recording(u) or state is None or not resume):
            return compiled.selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, state, resume, out)
    return reference.selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, state, resume, out,
                                    block_elems=options.tile("reference_scan_block", reference.SCAN_BLOCK_ELEMS))


def selective_state_update(state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                           Bm: torch.Tensor, Cm: torch.Tensor, D: torch.Tensor, z: torch.Tensor,
                           delta_bias: torch.Tensor) -> torch.Tensor:
    """One decode step of the scan: u, delta, z (B, E); Bm, Cm (B, N); state (B, E, N) in place -> (B, E)."""
    if _gpu(u) and compiled.mamba_ssm():
        return compiled.selective_state_update(state, u, delta, A, Bm, Cm, D, z, delta_bias)
    return reference.selective_state_update(state, u, delta, A, Bm, Cm, D, z, delta_bias)


def mamba_step(xz: torch.Tensor, cache, mixer) -> torch.Tensor:
    """Mamba's decode step between in_proj and out_proj, xz (B, 2E) -> y (B, E), as `reference.mamba_step`.

    `cache` is the layer's MambaCache (conv and SSM states, advanced in place); `mixer` the MambaMixer whose
    conv1d, x_proj, dt/b/c layernorms, dt_proj, A and D the step reads. On a GPU with a dense x_proj, silu
    and a power-of-two state size the whole step is three of our kernels (always at batch 1; at larger
    batches unless `KernelOptions.step` prefers mamba-ssm's and it is installed).
    """
    conv_w, conv_b = mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias
    norms = (mixer.dt_layernorm.weight, mixer.b_layernorm.weight, mixer.c_layernorm.weight, mixer.dt_layernorm.eps)
    tail = (mixer.dt_proj.weight, mixer.dt_proj.bias, mixer.neg_A(), mixer.D, cache.ssm)
    silu = mixer.act in ("silu", "swish")
    ours = _ours(xz) if silu and _dense(mixer.x_proj) and _power_of_two(mixer.d_state) else None
    lib = compiled.mamba_ssm() is not None and compiled.causal_conv1d_lib() is not None
    if ours and (xz.shape[0] == 1 or current().step == "triton" or not lib):
        return ours.mamba.mamba_step(xz, cache.conv, conv_w, conv_b, mixer.x_proj.weight, *norms, *tail)
    primitives = {}
    if silu and _gpu(xz) and lib:
        primitives = dict(conv_update=compiled.causal_conv1d_update, state_update=compiled.selective_state_update)
    return reference.mamba_step(xz, cache.conv, conv_w, conv_b, mixer.x_proj, *norms, *tail, mixer.act,
                                norm=rms_norm, **primitives)
