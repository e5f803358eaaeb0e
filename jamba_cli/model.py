"""Jamba (AI21's hybrid Transformer-Mamba mixture-of-experts LM) in PyTorch.

Module names equal the checkpoint keys (`model.layers.3.mamba.in_proj.weight`, ...), except that the
experts of an MoE layer are stacked as transformers v5 keeps them in memory
(`feed_forward.experts.gate_up_proj` (X, 2I, H), `feed_forward.experts.down_proj` (X, H, I));
`loader.py` stacks the per-expert tensors found on disk. Numerics follow transformers'
JambaForCausalLM with its fast Mamba path (dt bias, softplus and the scan in fp32).

Operations with more than one implementation (norms, linears, attention, the scan, ...) are calls into
`kernels`, which picks one for the device and the installed kernels; this file is the math.

Glossary:
    B  batch                      T  tokens in this call        S  tokens in the cache after it
    H  hidden_size                A  query heads                G  key/value heads     Dh  head_dim
    E  d_inner = expand·H         N  mamba_d_state              K  mamba_d_conv        R   dt_rank
    X  experts                    k  experts per token          I  intermediate_size   V   vocab
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import AttnCache, HybridCache, MambaCache, Span
from .config import JambaConfig


class Linear(nn.Linear):
    """nn.Linear through the kernel seam. Its weight is a plain tensor the fused kernels may read."""

    weight_format = "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, over the last dim."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_norm(self, h: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + y, norm(h + y)); y None: (h, norm(h))."""
        if y is None:
            return h, self(h)
        return kernels.add_rms_norm(h, y, self.weight, self.eps)


class Attention(nn.Module):
    """Causal self-attention with grouped K/V heads and no positional encoding (Jamba uses NoPE)."""

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: AttnCache | None, at: Span) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, A, T, Dh)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, T, Dh)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        out = kernels.attention(q, k, v, cache, at)  # (B, T, A, Dh): softmax(q·kᵀ/√Dh, causal)·v over the cache
        return self.o_proj(out.reshape(b, t, -1))


class MambaMixer(nn.Module):
    """Mamba-1 selective SSM with Jamba's extra RMSNorms on dt, B and C.

    u, z = in_proj(x); u = silu(causal_conv1d(u)); dt, B, C = x_proj(u); Δ = softplus(dt_proj(norm(dt)));
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t; y_t = (C_t·h_t + D u_t) · silu(z_t); out_proj(y).
    """

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        h, e, n, r, k = cfg.hidden_size, cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv
        self.d_inner, self.d_state, self.dt_rank, self.act = e, n, r, cfg.hidden_act
        self.in_proj = Linear(h, 2 * e, bias=cfg.mamba_proj_bias)  # rows [0:E] = u, [E:2E] = z (gate)
        self.conv1d = nn.Conv1d(e, e, k, groups=e, padding=k - 1, bias=cfg.mamba_conv_bias)  # (E, 1, K)
        self.x_proj = Linear(e, r + 2 * n, bias=False)  # columns [dt | B | C]
        self.dt_proj = Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))  # (E, N)
        if self.A_log.device.type != "meta":  # arithmetic on meta tensors imports torch's decompositions: slow
            with torch.no_grad():
                self.A_log.copy_(torch.arange(1, n + 1, dtype=torch.float32).log())  # S4D-real: A = -(1..N)
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = Linear(e, h, bias=cfg.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(r, cfg.rms_norm_eps)
        self.b_layernorm = RMSNorm(n, cfg.rms_norm_eps)
        self.c_layernorm = RMSNorm(n, cfg.rms_norm_eps)
        self._A, self._A_key = None, None

    def neg_A(self) -> torch.Tensor:
        """A = -exp(A_log) in fp32 (E, N); kept between calls while A_log is unchanged, since a decode step
        would otherwise spend three kernel launches per layer recomputing it."""
        if torch.is_grad_enabled() and self.A_log.requires_grad:
            return -torch.exp(self.A_log.float())
        key = (self.A_log.data_ptr(), self.A_log._version)
        if key != self._A_key:
            self._A, self._A_key = -torch.exp(self.A_log.float()), key
        return self._A

    def forward(self, x: torch.Tensor, cache: MambaCache | None, at: Span) -> torch.Tensor:
        if cache is not None and at.length == 1 and at.offset > 0:  # one token: the states advance by one
            y = kernels.mamba_step(self.in_proj(x[:, 0]), cache, self)  # (B, E), the same math with T = 1
            return self.out_proj(y).unsqueeze(1)  # (B, 1, H)
        # channel-first (B, E, T) throughout: the layout the scan wants, with no transposing copies. Rows are
        # a multiple of 8 tokens long, zeros after the prompt, so each starts on a 16-byte boundary: matrix
        # products, the conv and the scan then read whole vectors (unaligned rows made a prompt twice as
        # slow; README, "Benchmarks"). The conv never looks ahead, so the zeros change nothing before them;
        # the scan, whose state must stop at the last real token, runs without them.
        t = x.shape[1]
        tp = -(-t // 8) * 8
        pad_mask = at.pad_mask
        if tp != t:
            x = F.pad(x, (0, 0, 0, tp - t))
            pad_mask = None if pad_mask is None else F.pad(pad_mask, (0, tp - t))
        xz = torch.matmul(self.in_proj.weight, x.transpose(1, 2))  # (B, 2E, Tp)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        u, z = xz.chunk(2, dim=1)  # (B, E, Tp) each
        if pad_mask is not None:  # zero padding so left-padded rows see exactly what unpadded ones see
            u = u * pad_mask.unsqueeze(1)
        resume = at.offset > 0
        u = kernels.causal_conv1d(u, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                  None if cache is None else cache.conv, self.act, resume, length=t)  # (B, E, Tp)
        if pad_mask is not None:
            u = u * pad_mask.unsqueeze(1)
        dt, Bm, Cm = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.matmul(self.dt_proj.weight, self.dt_layernorm(dt).transpose(1, 2))  # (B, E, Tp), no bias
        # out_proj reads y's rows whole, zero padding included, and its extra outputs are cut off: y stays
        # aligned for it as for in_proj
        y = u.new_empty(u.shape)  # (B, E, Tp)
        y[..., t:] = 0
        kernels.selective_scan(u[..., :t], delta[..., :t], self.neg_A(), self.b_layernorm(Bm[:, :t]).transpose(1, 2),
                               self.c_layernorm(Cm[:, :t]).transpose(1, 2), self.D, z[..., :t], self.dt_proj.bias,
                               None if cache is None else cache.ssm, resume, out=y[..., :t])
        return self.out_proj(y.transpose(1, 2))[:, :t]  # (B, T, H)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = kernels.ACT[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.mlp(x, self.gate_proj, self.up_proj, self.down_proj, self.act)


class Experts(nn.Module):
    """X SwiGLU experts with stacked weights: expert e maps x to down_e(act(gate_e(x)) * up_e(x))."""

    weight_format = "dense"

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        x, i, h = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(x, 2 * i, h))  # rows [0:I] gate, [I:2I] up
        self.down_proj = nn.Parameter(torch.empty(x, h, i))
        self.act = kernels.ACT[cfg.hidden_act]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (T, H) -> (T, H)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # (T, I) each
        return F.linear(self.act(gate) * up, self.down_proj[e])


class SparseMoE(nn.Module):
    """Each token through the top-k of X experts by router probability (a softmax over all X, in fp32); the
    k outputs are summed weighted by those probabilities, not renormalised (unlike Mixtral)."""

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        return kernels.moe(x.reshape(-1, h), self.router, self.experts, self.top_k).view(b, t, h)


class DecoderLayer(nn.Module):
    """Pre-norm block: (attention or Mamba) then (MoE or dense MLP), each with a residual.

    A layer hands its feed-forward output on un-added: the next layer adds it to the residual stream and
    normalises in one pass (`RMSNorm.add_norm`), which saves a kernel per block in a decode step.
    """

    def __init__(self, cfg: JambaConfig, i: int):
        super().__init__()
        self.is_attn = cfg.is_attention(i)
        if self.is_attn:
            self.self_attn = Attention(cfg)
        else:
            self.mamba = MambaMixer(cfg)
        self.feed_forward = SparseMoE(cfg) if cfg.is_moe(i) else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, pending: torch.Tensor | None, cache: AttnCache | MambaCache | None,
                at: Span) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, pending) -> (h', pending'): the residual stream is h + pending before and h' + pending' after."""
        h, x = self.input_layernorm.add_norm(h, pending)
        x = self.self_attn(x, cache, at) if self.is_attn else self.mamba(x, cache, at)
        h, x = self.pre_ff_layernorm.add_norm(h, x)
        return h, self.feed_forward(x)


class JambaModel(nn.Module):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class JambaForCausalLM(nn.Module):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.config = cfg
        self.model = JambaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.kernel_options = None  # the kernels.KernelOptions this model runs with; None: the active ones

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def layer_devices(self) -> list[torch.device]:
        return [layer.input_layernorm.weight.device for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits for `input_ids` (B, T) -> (B, T, V), or (B, 1, V) with `last_only`.

        With a cache, the tokens continue the sequences it holds and are appended to it.
        `attention_mask` (B, T) marks real tokens with 1 and padding with 0; pad on the left.
        """
        logits = self.compute(input_ids, cache, attention_mask, last_only)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return logits

    def compute(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """`forward` without moving the cache's position: the tokens' state is written at the position the
        cache holds, and the caller then calls `cache.advance(T)`. A captured decode step (a graph that is
        replayed) holds this, so that each replay runs at the position the cache says."""
        with kernels.using(self.kernel_options):
            return self._compute(input_ids, cache, attention_mask, last_only)

    def _compute(self, input_ids, cache, attention_mask, last_only):
        t = input_ids.shape[1]
        caller_device = input_ids.device
        input_ids = _on(input_ids, self.device)  # the logits go back to where the ids came from
        pad_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            pad_mask = attention_mask.bool().to(self.device)
        at = cache.span(t, pad_mask) if cache is not None else Span(0, t, pad_mask, pad_mask)
        h, pending = self.model.embed_tokens(input_ids), None  # (B, T, H); no position embedding
        for i, layer in enumerate(self.model.layers):
            dev = layer.input_layernorm.weight.device  # a model split over devices
            h, pending = layer(_on(h, dev), _on(pending, dev), cache.layers[i] if cache is not None else None,
                               at.to(dev))
        if last_only:
            h, pending = h[:, -1:], pending[:, -1:]
        dev = self.model.final_layernorm.weight.device
        h = self.model.final_layernorm.add_norm(_on(h, dev), _on(pending, dev))[1]
        return _on(self.lm_head(_on(h, self.lm_head.weight.device)), caller_device)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t if t is None or t.device == device else t.to(device)
