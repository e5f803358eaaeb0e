"""Shared by the benchmarks: model shapes and random weights built in memory (no checkpoint on disk).

Every parameter's values depend only on its name and shape, so our model and transformers' get the
same weights when built one after the other (their parameter names and shapes coincide).
"""

from __future__ import annotations

import math
import zlib

import torch

SHAPES = {
    # Jamba v0.1 / 1.5-1.7 Mini: 51.6B parameters, 12.1B active
    "mini": dict(vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, num_experts=16, num_experts_per_tok=2,
                 attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1,
                 mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256),
    # Jamba 1.5-1.7 Large (398B); use with --layers to build a few of its layers
    "large": dict(vocab_size=65536, hidden_size=8192, intermediate_size=24576, num_hidden_layers=72,
                  num_attention_heads=64, num_key_value_heads=8, num_experts=16, num_experts_per_tok=2,
                  attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=512),
    # Jamba-Reasoning-3B / Jamba2-3B: dense MLPs, attention on layers 7 and 21 with one K/V head, tied
    # embeddings (2.9B parameters with the 64K vocabulary)
    "3b": dict(vocab_size=65536, hidden_size=2560, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=20, num_key_value_heads=1, num_experts=1, num_experts_per_tok=1,
               attn_layer_period=14, attn_layer_offset=7, expert_layer_period=1, expert_layer_offset=0,
               mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=160, tie_word_embeddings=True),
    # smoke tests on a CPU
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                 attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
                 mamba_d_state=16, mamba_d_conv=4, mamba_expand=2),
}


def random_param(name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Values like a freshly initialised Jamba: normal(0.02) matrices, unit norms and D, S4D A, small dt."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("A_log"):
        return torch.log(torch.arange(1, shape[-1] + 1, dtype=torch.float32, device=device)).expand(shape).to(dtype)
    if leaf == "D" or "norm" in name:
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith("dt_proj.bias"):  # softplus(bias) = 0.01: the Mamba init's typical step
        return torch.full(shape, math.log(math.expm1(0.01)), dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.normal_(0.0, 0.02, generator=g)


def build(cls, config, dtype: torch.dtype, device) -> torch.nn.Module:
    """`cls(config)` in eval mode with materialize()'s random weights, made in place on `device` (the
    parameters start on the meta device, so no full-size copy is ever built elsewhere)."""
    with torch.device("meta"):
        model = cls(config)
    materialize(model, dtype, device)
    return model.eval()


def materialize(model: torch.nn.Module, dtype: torch.dtype, device) -> None:
    """Give every parameter of a model built on the meta device its random values, one at a time."""
    tied = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if id(p) in tied:
            setattr(module, attr, tied[id(p)])
            continue
        new = torch.nn.Parameter(random_param(name, p.shape, dtype, device), requires_grad=False)
        tied[id(p)] = new
        setattr(module, attr, new)


def shape_config(shape: str, layers: int | None = None) -> dict:
    cfg = dict(SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    return cfg
