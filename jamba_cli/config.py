"""JambaConfig: the keys of a Jamba `config.json`, validated, with the derived layer schedule.

Field names equal the config.json keys written by every official checkpoint (Jamba-v0.1, 1.5/1.6/1.7
Mini and Large, Reasoning-3B, Jamba2) and by transformers' `JambaConfig.save_pretrained`.
Keys we do not know are kept in `extra` and written back by `to_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint_files import value as shown_value
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
        self._check_types()
        if self.model_type != "jamba":
            raise ConfigError(f"model_type is {self.model_type!r}, not 'jamba': this is not a Jamba checkpoint")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.mamba_dt_rank == "auto":
            object.__setattr__(self, "mamba_dt_rank", -(-self.hidden_size // 16))  # ceil, exact for any int
        self._validate()

    def _check_types(self) -> None:
        """Each key holds a value of its JSON type: a string, list, object, null or bool where a number
        belongs is named here, before anything computes with it."""
        for key, kind in _KINDS.items():
            value = getattr(self, key)
            if not _is(value, kind):
                raise ConfigError(f"key {key!r} must be {_KIND_NAMES[kind]}, got {shown_value(value)}")

    def _validate(self) -> None:
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_experts_per_tok", "num_experts", "expert_layer_period",
                "attn_layer_period", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
                "max_position_embeddings")
        for key in ints:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"key {key!r} must be a positive integer, got {shown_value(value)}")
        for key in ("expert_layer_offset", "attn_layer_offset"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"key {key!r} must be a non-negative integer, got {shown_value(value)}")
        if self.attn_layer_offset >= self.attn_layer_period:
            raise ConfigError(f"key 'attn_layer_offset' ({self.attn_layer_offset}) must be smaller than "
                              f"'attn_layer_period' ({self.attn_layer_period})")
        if self.expert_layer_offset >= self.expert_layer_period:
            raise ConfigError(f"key 'expert_layer_offset' ({self.expert_layer_offset}) must be smaller than "
                              f"'expert_layer_period' ({self.expert_layer_period})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"key 'hidden_size' ({self.hidden_size}) must be divisible by "
                              f"'num_attention_heads' ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"key 'num_attention_heads' ({self.num_attention_heads}) must be divisible by "
                              f"'num_key_value_heads' ({self.num_key_value_heads})")
        if self.num_experts > 1 and self.num_experts_per_tok > self.num_experts:  # 1 expert = dense everywhere
            raise ConfigError(f"key 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds "
                              f"'num_experts' ({self.num_experts})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"key 'hidden_act' is {shown_value(self.hidden_act)}; "
                              f"supported: {', '.join(ACTIVATIONS)}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"key 'rms_norm_eps' must be a positive number, "
                              f"got {shown_value(self.rms_norm_eps)}")
        for token_id in self.eos_token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise ConfigError(f"key 'eos_token_id' holds {token_id!r}, not a token id below "
                                  f"vocab_size {self.vocab_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> JambaConfig:
        """The config of `data` (a parsed config.json); `source` names the file in error messages."""
        data = dict(data)
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.pop("dtype")
        for old, new in _LEGACY_RENAMES.items():
            if old in data:
                data.setdefault(new, data.pop(old))
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        where = f"{source}: " if source else ""
        try:
            return cls(**known, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
        except (TypeError, ValueError, OverflowError) as e:  # a value no check above foresaw
            raise ConfigError(f"{where or 'config: '}invalid value: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> JambaConfig:
        """The config in the file `path`: a regular file holding one JSON object (a FIFO or a device is
        refused, not read); every error names the file."""
        from .checkpoint_files import read_json

        path = Path(path)
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        return cls.from_dict(read_json(path, ConfigError), source=str(path))

    def param_count(self) -> int:
        """The number of weights this config describes (a tied head counted once), in closed form: it costs
        nothing however large the values, so that the loader can hold it against the checkpoint's files
        before building anything. tests/test_untrusted_checkpoints.py checks it against the model."""
        h, v, i, x = self.hidden_size, self.vocab_size, self.intermediate_size, self.num_experts
        e, n, r, k = self.d_inner, self.mamba_d_state, self.mamba_dt_rank, self.mamba_d_conv
        kv = self.num_key_value_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv
        mamba = (h * 2 * e + 2 * e * self.mamba_proj_bias  # in_proj
                 + e * k + e * self.mamba_conv_bias  # conv1d
                 + e * (r + 2 * n) + r * e + e  # x_proj, dt_proj
                 + e * n + e  # A_log, D
                 + e * h + h * self.mamba_proj_bias  # out_proj
                 + r + 2 * n)  # dt, B and C norms
        mlp, moe = 3 * h * i, h * x + 3 * x * h * i
        layers, n_attn, n_moe = self.num_hidden_layers, self.attention_layers, self.moe_layers
        return (v * h * (1 if self.tie_word_embeddings else 2) + h
                + n_attn * attention + (layers - n_attn) * mamba
                + n_moe * moe + (layers - n_moe) * mlp + layers * 2 * h)

    @property
    def attention_layers(self) -> int:
        """How many layers are attention layers (the others are Mamba), without a loop over them."""
        return _count(self.num_hidden_layers, self.attn_layer_period, self.attn_layer_offset)

    @property
    def moe_layers(self) -> int:
        """How many layers have a mixture of experts (the others a dense MLP)."""
        if self.num_experts <= 1:
            return 0
        return _count(self.num_hidden_layers, self.expert_layer_period, self.expert_layer_offset)

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


def _count(n: int, period: int, offset: int) -> int:
    """How many i in range(n) have i % period == offset (0 <= offset < period)."""
    return 0 if offset >= n else (n - 1 - offset) // period + 1


# The JSON type of each key: a string where a number belongs, or a bool, a list, an object or null, is
# refused by name before anything computes with it.
_INT, _INT_OR_NULL, _DT_RANK, _EOS, _BOOL, _NUMBER, _STR, _STR_OR_NULL, _STRS_OR_NULL = range(9)
_KINDS = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_experts_per_tok", "num_experts", "expert_layer_period", "expert_layer_offset",
                     "attn_layer_period", "attn_layer_offset", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                     "max_position_embeddings"), _INT),
    **dict.fromkeys(("num_key_value_heads", "num_logits_to_keep", "pad_token_id", "bos_token_id",
                     "sliding_window"), _INT_OR_NULL),
    "mamba_dt_rank": _DT_RANK,
    "eos_token_id": _EOS,
    **dict.fromkeys(("tie_word_embeddings", "use_cache", "output_router_logits", "use_mamba_kernels",
                     "mamba_conv_bias", "mamba_proj_bias"), _BOOL),
    **dict.fromkeys(("initializer_range", "rms_norm_eps", "router_aux_loss_coef", "attention_dropout"), _NUMBER),
    **dict.fromkeys(("hidden_act", "model_type"), _STR),
    "torch_dtype": _STR_OR_NULL,
    "architectures": _STRS_OR_NULL,
}
_KIND_NAMES = {_INT: "an integer", _INT_OR_NULL: "an integer or null", _DT_RANK: 'an integer or "auto"',
               _EOS: "a token id, a list of them or null", _BOOL: "true or false", _NUMBER: "a finite number",
               _STR: "a string", _STR_OR_NULL: "a string or null", _STRS_OR_NULL: "a list of strings or null"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is(value, kind: int) -> bool:
    if kind == _INT:
        return _is_int(value)
    if kind == _INT_OR_NULL:
        return value is None or _is_int(value)
    if kind == _DT_RANK:
        return value == "auto" or _is_int(value)
    if kind == _EOS:
        return value is None or _is_int(value) or (isinstance(value, (list, tuple)) and all(map(_is_int, value)))
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _NUMBER:
        return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
    if kind == _STR:
        return isinstance(value, str)
    if kind == _STR_OR_NULL:
        return value is None or isinstance(value, str)
    return value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
