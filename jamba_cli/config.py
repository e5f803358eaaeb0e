"""JambaConfig: the keys of a Jamba `config.json`, validated, with the derived layer schedule.

Field names equal the config.json keys written by every official checkpoint (Jamba-v0.1, 1.5/1.6/1.7
Mini and Large, Reasoning-3B, Jamba2) and by transformers' `JambaConfig.save_pretrained`.
Keys we do not know are kept in `extra` and written back by `to_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

# Keys of the remote-code era (spring 2024) and their current names; values of the others are ignored.
_LEGACY_RENAMES = {"n_ctx": "max_position_embeddings"}


@dataclass(frozen=True)
class JambaConfig:
    vocab_size: int = 65536
    tie_word_embeddings: bool = False
    hidden_size: int = 4096
    intermediate_size: int = 14336  # dense MLP and every expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8  # None means as many as query heads (MHA)
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6  # every RMSNorm, the dt/B/C norms inside Mamba included
    use_cache: bool = True
    num_logits_to_keep: int | None = 1
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    sliding_window: int | None = None  # never set by a released checkpoint; attention is full causal
    max_position_embeddings: int = 262144  # informational: there are no position embeddings (NoPE)
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_experts: int = 16
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    use_mamba_kernels: bool = True
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"  # "auto" = ceil(hidden_size / 16), resolved in __post_init__
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False  # bias on in_proj and out_proj
    torch_dtype: str | None = None  # transformers v5 writes this as "dtype"
    model_type: str = "jamba"
    architectures: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type != "jamba":
            raise ConfigError(f"model_type is {self.model_type!r}, not 'jamba': this is not a Jamba checkpoint")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.mamba_dt_rank == "auto":
            object.__setattr__(self, "mamba_dt_rank", math.ceil(self.hidden_size / 16))
        self._validate()

    def _validate(self) -> None:
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_experts_per_tok", "num_experts", "expert_layer_period",
                "attn_layer_period", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank")
        for key in ints:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config key {key!r} must be a positive integer, got {value!r}")
        for key in ("expert_layer_offset", "attn_layer_offset"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"config key {key!r} must be a non-negative integer, got {value!r}")
        if self.attn_layer_offset >= self.attn_layer_period:
            raise ConfigError(f"config key 'attn_layer_offset' ({self.attn_layer_offset}) must be smaller than "
                              f"'attn_layer_period' ({self.attn_layer_period})")
        if self.expert_layer_offset >= self.expert_layer_period:
            raise ConfigError(f"config key 'expert_layer_offset' ({self.expert_layer_offset}) must be smaller than "
                              f"'expert_layer_period' ({self.expert_layer_period})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"config key 'hidden_size' ({self.hidden_size}) must be divisible by "
                              f"'num_attention_heads' ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config key 'num_attention_heads' ({self.num_attention_heads}) must be divisible by "
                              f"'num_key_value_heads' ({self.num_key_value_heads})")
        if self.num_experts > 1 and self.num_experts_per_tok > self.num_experts:  # 1 expert = dense everywhere
            raise ConfigError(f"config key 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds "
                              f"'num_experts' ({self.num_experts})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"config key 'hidden_act' is {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if not isinstance(self.rms_norm_eps, (int, float)) or isinstance(self.rms_norm_eps, bool) \
                or not self.rms_norm_eps > 0:
            raise ConfigError(f"config key 'rms_norm_eps' must be a positive number, got {self.rms_norm_eps!r}")
        for token_id in self.eos_token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
                raise ConfigError(f"config key 'eos_token_id' holds {token_id!r}, not a token id below "
                                  f"vocab_size {self.vocab_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JambaConfig:
        data = dict(data)
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.pop("dtype")
        for old, new in _LEGACY_RENAMES.items():
            if old in data:
                data.setdefault(new, data.pop(old))
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except TypeError as e:  # a value of the wrong kind that a comparison choked on
            raise ConfigError(f"invalid config: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> JambaConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    # -- derived schedule (transformers' layers_block_type / layers_num_experts) --

    def is_attention(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    def is_moe(self, i: int) -> bool:
        return self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset

    @property
    def layers_block_type(self) -> list[str]:
        return ["attention" if self.is_attention(i) else "mamba" for i in range(self.num_hidden_layers)]

    @property
    def layers_num_experts(self) -> list[int]:
        return [self.num_experts if self.is_moe(i) else 1 for i in range(self.num_hidden_layers)]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
