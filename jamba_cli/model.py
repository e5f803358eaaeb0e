"""Jamba (AI21's hybrid Transformer-Mamba mixture-of-experts LM) in plain PyTorch.

Module names equal the checkpoint keys (`model.layers.3.mamba.in_proj.weight`, ...), except that the
experts of an MoE layer are stacked as transformers v5 keeps them in memory
(`feed_forward.experts.gate_up_proj` (X, 2I, H), `feed_forward.experts.down_proj` (X, H, I));
`loader.py` stacks the per-expert tensors found on disk. Numerics follow transformers'
JambaForCausalLM on its mamba-ssm kernel path.

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
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels
from .cache import AttnCache, HybridCache, MambaCache
from .config import JambaConfig


class RMSNorm(nn.Module):
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
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: AttnCache | None, offset: int, mask: torch.Tensor | None,
                key_mask: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = _linear(self.q_proj, x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, A, T, Dh)
        k = _linear(self.k_proj, x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, T, Dh)
        v = _linear(self.v_proj, x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        gqa = self.n_kv != self.n_heads
        static_step = cache is not None and t == 1 and pos is not None  # the position is on the device
        if cache is not None and not static_step:  # append to the cache, then attend to all it holds
            cache.k[:, :, offset:offset + t] = k
            cache.v[:, :, offset:offset + t] = v
            k, v = cache.k[:, :, :offset + t], cache.v[:, :, :offset + t]  # (B, G, S, Dh)
        fast = kernels.PREFILL_ATTENTION and t > 1 and mask is None and self.head_dim in (16, 32, 64, 128)
        ops = kernels.on_cuda(x) if fast else None
        if ops is not None:  # causal prefill in our Triton kernel: GQA heads read K/V in place
            out = ops.attention.prefill_attention(q, k, v, offset)  # (B, T, A, Dh)
            return _linear(self.o_proj, out.view(b, t, -1))
        if static_step:  # a CUDA graph can replay this step as pos advances
            ops = kernels.on_cuda(x)
            if ops is not None:  # the cache write and attention in two kernels
                out = ops.attention.decode_attention(q, k, v, cache.k, cache.v, pos, key_mask)
                return _linear(self.o_proj, out.view(b, t, -1))
            cache.k.index_copy_(2, pos, k)
            cache.v.index_copy_(2, pos, v)
            valid = torch.arange(cache.k.shape[2], device=x.device) <= pos  # (capacity,)
            out = _decode_attention(q, cache.k, cache.v, valid if key_mask is None else valid & key_mask)
        elif cache is None:
            with _attention_backends():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                                     enable_gqa=gqa)
        elif t == 1:
            out = _decode_attention(q, k, v, key_mask)
        elif mask is None and offset > 0:  # causal with the queries at the end: no mask materialised
            # imported here: the module pulls in torch._dynamo (1.7 s) and most runs never need it
            from torch.nn.attention.bias import causal_lower_right

            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, offset + t),
                                                 enable_gqa=gqa)
        else:
            with _attention_backends():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                     enable_gqa=gqa)
        return _linear(self.o_proj, out.transpose(1, 2).reshape(b, t, -1))


def _attention_backends():
    # cuDNN's SDPA fails (illegal memory access) on a 64K-token causal prompt on an H200 (torch 2.11,
    # cu130), and below that it is no faster than FlashAttention-2 yet builds a plan for every new prompt
    # length (+40-70 ms to the first token, benchmarks/results/generate_h200_tuning.json)
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None):
    """One query position against S cached ones, reading each K/V head once (no repeat for GQA).

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


class MambaMixer(nn.Module):
    """Mamba-1 selective SSM with Jamba's extra RMSNorms on dt, B and C."""

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        h, e, n, r, k = cfg.hidden_size, cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv
        self.d_inner, self.d_state, self.dt_rank, self.act = e, n, r, cfg.hidden_act
        self.in_proj = nn.Linear(h, 2 * e, bias=cfg.mamba_proj_bias)  # rows [0:E] = u, [E:2E] = z (gate)
        self.conv1d = nn.Conv1d(e, e, k, groups=e, padding=k - 1, bias=cfg.mamba_conv_bias)  # (E, 1, K)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)  # columns [dt | B | C]
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))  # (E, N)
        if self.A_log.device.type != "meta":  # compute ops on meta import ~70 MB of decompositions
            with torch.no_grad():
                self.A_log.copy_(torch.arange(1, n + 1, dtype=torch.float32).log())  # S4D-real: A = -(1..N)
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, h, bias=cfg.mamba_proj_bias)
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

    def forward(self, x: torch.Tensor, cache: MambaCache | None, offset: int,
                pad_mask: torch.Tensor | None) -> torch.Tensor:
        if cache is not None and x.shape[1] == 1 and offset > 0:
            return self._step(x, cache)
        # channel-first (B, E, T) throughout: the layout the scan kernel wants, with no transposing copies.
        # Rows are a multiple of 8 tokens long, zeros after the prompt, so that each starts on a 16-byte
        # boundary: with unaligned rows cuBLAS falls back to slow kernels (in_proj of Jamba-Mini at 16383
        # tokens took 21 ms instead of 3 on an H200, the whole prefill twice as long) and the conv and scan
        # kernels lose their vector loads. The conv never looks ahead, so the zeros change nothing before
        # them; the scan, whose state must stop at the last real token, runs without them.
        t = x.shape[1]
        tp = -(-t // 8) * 8
        if tp != t:
            x = F.pad(x, (0, 0, 0, tp - t))
            pad_mask = None if pad_mask is None else F.pad(pad_mask, (0, tp - t))
        xz = torch.matmul(self.in_proj.weight, x.transpose(1, 2))  # (B, 2E, Tp)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        u, z = xz.chunk(2, dim=1)  # (B, E, Tp) each
        if pad_mask is not None:  # zero padding so left-padded rows see exactly what unpadded ones see
            u = u * pad_mask.unsqueeze(1)
        resume = offset > 0
        u = kernels.causal_conv1d(u, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                  None if cache is None else cache.conv, self.act, resume, length=t)  # (B, E, Tp)
        if pad_mask is not None:
            u = u * pad_mask.unsqueeze(1)
        dt, Bm, Cm = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.matmul(self.dt_proj.weight, self.dt_layernorm(dt).transpose(1, 2))  # (B, E, Tp), no bias
        # out_proj reads y's rows whole, zero padding included, and its extra outputs are cut off: over T rows
        # of this column-major y, cuBLAS would again leave its fast kernels
        y = u.new_empty(u.shape)  # (B, E, Tp)
        y[..., t:] = 0
        kernels.selective_scan(u[..., :t], delta[..., :t], self.neg_A(), self.b_layernorm(Bm[:, :t]).transpose(1, 2),
                               self.c_layernorm(Cm[:, :t]).transpose(1, 2), self.D, z[..., :t], self.dt_proj.bias,
                               None if cache is None else cache.ssm, resume, out=y[..., :t])
        return self.out_proj(y.transpose(1, 2))[:, :t]  # (B, T, H)

    def _step(self, x: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """One decode step for x (B, 1, H): the conv and SSM states advance by one token."""
        xz = _linear(self.in_proj, x[:, 0])  # (B, 2E)
        fused = xz.shape[0] == 1 and self.act in ("silu", "swish") and self.d_state & (self.d_state - 1) == 0
        ops = kernels.on_cuda(xz) if fused else None
        if ops is not None:  # batch 1: everything between in_proj and out_proj in three kernels
            y = ops.triton.mamba_step(xz, cache.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                      self.x_proj.weight, self.dt_layernorm.weight, self.b_layernorm.weight,
                                      self.c_layernorm.weight, self.dt_layernorm.eps, self.dt_proj.weight,
                                      self.dt_proj.bias, self.neg_A(), self.D, cache.ssm)
            return _linear(self.out_proj, y).unsqueeze(1)
        u, z = xz.chunk(2, dim=-1)  # (B, E) each
        u = kernels.causal_conv1d_update(u, self.conv1d.weight.squeeze(1), self.conv1d.bias, cache.conv, self.act)
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(self.dt_layernorm(dt), self.dt_proj.weight)  # (B, E); the bias is added in fp32
        y = kernels.selective_state_update(cache.ssm, u, delta, self.neg_A(),
                                           self.b_layernorm(Bm), self.c_layernorm(Cm), self.D, z, self.dt_proj.bias)
        return _linear(self.out_proj, y).unsqueeze(1)  # (B, 1, H)


class MLP(nn.Module):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = kernels.ACT[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = kernels.on_cuda(x) if self.act is F.silu and x.numel() == x.shape[-1] else None
        if ops is not None and all(type(m) is nn.Linear for m in (self.gate_proj, self.up_proj, self.down_proj)):
            # one token: gate, up and SwiGLU in one GEMV kernel, down in another
            return ops.gemv.swiglu_mlp(x.reshape(1, -1), self.gate_proj.weight, self.up_proj.weight,
                                       self.down_proj.weight).view_as(x)
        return self.down_proj(kernels.act_mul(self.act, self.gate_proj(x), self.up_proj(x)))


class Experts(nn.Module):
    """X SwiGLU experts with stacked weights; each token runs through the k experts it was routed to."""

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        x, i, h = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(x, 2 * i, h))  # rows [0:I] gate, [I:2I] up
        self.down_proj = nn.Parameter(torch.empty(x, h, i))
        self.act = kernels.ACT[cfg.hidden_act]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # x: (T, H), idx/w: (T, k) -> (T, H)
        ops = kernels.on_cuda(x) if self.act is F.silu else None
        if ops is not None and x.dtype == torch.bfloat16:  # grouped GEMM is bf16-only; no host sync
            return self._grouped(x, idx, w)
        return self.per_expert(x, idx, w)

    def per_expert(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Each expert on the tokens routed to it, one expert after the other (a host sync per call)."""
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            tok, slot = torch.where(idx == e)
            y = self.expert(e, x[tok])
            out.index_add_(0, tok, (y * w[tok, slot, None]).to(x.dtype))
        return out

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        # (T, H) -> (T, H); quant.QuantExperts overrides this with one quantized linear per projection
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # (T, I) each
        return F.linear(self.act(gate) * up, self.down_proj[e])

    def _grouped(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """All experts in two grouped GEMMs over the (token, slot) pairs sorted by expert."""
        t, k = idx.shape
        flat = idx.flatten()  # (T·k,)
        order = flat.argsort(stable=True)
        counts = torch.zeros(self.gate_up_proj.shape[0], dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
        rows = x.index_select(0, order // k)  # (T·k, H)
        gate, up = torch._grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(kernels.act_mul(self.act, gate, up), self.down_proj.transpose(1, 2), offs=offs)
        return kernels.moe_combine(y, order, w)


class SparseMoE(nn.Module):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        xt = x.reshape(-1, h)  # (B·T, H)
        ex = self.experts
        fast = xt.shape[0] <= 8 and type(self.router) is nn.Linear and type(ex) is Experts and ex.act is F.silu
        ops = kernels.on_cuda(xt) if fast else None
        if ops is not None:  # up to batch 8 GEMVs beat grouped GEMM (benchmarks/bench_kernels.py)
            # routing (softmax, top-k) happens inside the expert kernels, from the router's logits
            i = ex.down_proj.shape[-1]
            return ops.gemv.swiglu_mlp(xt, ex.gate_up_proj[:, :i], ex.gate_up_proj[:, i:], ex.down_proj,
                                       ops.gemv.router_logits(xt, self.router.weight), self.top_k).view(b, t, h)
        probs = F.softmax(self.router(xt), dim=-1, dtype=torch.float32)  # over all X experts
        w, idx = torch.topk(probs, self.top_k, dim=-1)  # (B·T, k); not renormalised, unlike Mixtral
        return self.experts(xt, idx, w.to(x.dtype)).view(b, t, h)


class DecoderLayer(nn.Module):
    """Pre-norm block: (attention or Mamba) then (MoE or dense MLP), each with a residual.

    A layer hands its feed-forward output on un-added: the next layer adds it to the residual stream and
    normalises in one kernel (`RMSNorm.add_norm`), which saves a launch per block in a decode step.
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
                offset: int, attn_mask: torch.Tensor | None, pad_mask: torch.Tensor | None,
                key_mask: torch.Tensor | None = None, pos: torch.Tensor | None = None):
        """(h, pending) -> (h', pending'): the residual stream is h + pending before and h' + pending' after."""
        h, x = self.input_layernorm.add_norm(h, pending)
        if self.is_attn:
            x = self.self_attn(x, cache, offset, attn_mask, key_mask, pos)
        else:
            x = self.mamba(x, cache, offset, pad_mask)
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
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

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
        t = input_ids.shape[1]
        caller_device = input_ids.device
        input_ids = _on(input_ids, self.device)  # the logits go back to where the ids came from
        offset = cache.offset if cache is not None else 0
        pad_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            pad_mask = attention_mask.bool()
        key_mask, pos = pad_mask, None
        if cache is not None:
            cache.reserve(t)
            cache.record_padding(pad_mask, t)
            pos = cache.pos
            key_mask = cache.key_mask if pos is not None else \
                None if cache.key_mask is None else cache.key_mask[:, :offset + t]
        attn_mask = None if t == 1 else _attention_mask(t, offset, key_mask, input_ids.device)
        h, pending = self.model.embed_tokens(input_ids), None  # (B, T, H); no position embedding
        for i, layer in enumerate(self.model.layers):
            dev = layer.input_layernorm.weight.device  # a model split over devices
            h, pending = _on(h, dev), _on(pending, dev)
            lc = cache.layers[i] if cache is not None else None
            h, pending = layer(h, pending, lc, offset, _on(attn_mask, dev), _on(pad_mask, dev), _on(key_mask, dev),
                               _on(pos, dev))
        if cache is not None:
            cache.offset += t
            if pos is not None:
                pos.add_(t)  # on the device, so a replayed CUDA graph advances it too
        if last_only:
            h, pending = h[:, -1:], pending[:, -1:]
        dev = self.model.final_layernorm.weight.device
        h = self.model.final_layernorm.add_norm(_on(h, dev), _on(pending, dev))[1]
        return _on(_linear(self.lm_head, _on(h, self.lm_head.weight.device)), caller_device)


def _attention_mask(t: int, offset: int, key_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask for a padded batch, or None: plain causal attention needs none."""
    if key_mask is None:
        return None
    key_mask = key_mask[:, :offset + t]
    s = offset + t
    q_pos = torch.arange(offset, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    # a padding query attends to itself alone, so its row is never empty (no NaN)
    allowed = (k_pos <= q_pos) & (key_mask.to(device)[:, None, :] | (k_pos == q_pos))  # (B, T, S)
    return allowed.unsqueeze(1)


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # one token on CUDA may take our GEMV (kernels.GEMV_LINEARS); quantized layers never do
    ops = kernels.gemv_ops(x, layer.weight) if type(layer) is nn.Linear and layer.bias is None else None
    return layer(x) if ops is None else ops.gemv.gemv(x, layer.weight)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t if t is None or t.device == device else t.to(device)
