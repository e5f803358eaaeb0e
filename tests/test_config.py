"""JambaConfig against the config.json files of released checkpoints and against transformers' schedule."""

import json
import warnings

import pytest

from jamba_cli.config import JambaConfig
from jamba_cli.errors import ConfigError

MINI = {  # AI21-Jamba-1.5-Mini's config.json, key for key
    "architectures": ["JambaForCausalLM"], "attention_dropout": 0.0, "attn_layer_offset": 4,
    "attn_layer_period": 8, "bos_token_id": 1, "eos_token_id": [2, 518], "expert_layer_offset": 1,
    "expert_layer_period": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "mamba_conv_bias": True, "mamba_d_conv": 4, "mamba_d_state": 16,
    "mamba_dt_rank": 256, "mamba_expand": 2, "mamba_proj_bias": False, "max_position_embeddings": 262144,
    "model_type": "jamba", "num_attention_heads": 32, "num_experts": 16, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_logits_to_keep": 1, "output_router_logits": False,
    "pad_token_id": 0, "rms_norm_eps": 1e-06, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.2",
    "use_cache": True, "use_mamba_kernels": True, "vocab_size": 65536}
LARGE = {**MINI, "hidden_size": 8192, "num_hidden_layers": 72, "num_attention_heads": 64,
         "intermediate_size": 24576, "mamba_dt_rank": 512}
REASONING_3B = {**MINI, "hidden_size": 2560, "num_hidden_layers": 28, "num_attention_heads": 20,
                "num_key_value_heads": 1, "attn_layer_period": 14, "attn_layer_offset": 7, "num_experts": 1,
                "intermediate_size": 8192, "mamba_dt_rank": 160, "tie_word_embeddings": True,
                "eos_token_id": [2, 519]}
V01 = {**MINI, "eos_token_id": 2, "mamba_dt_rank": "auto", "n_ctx": 262144,
       "calc_logits_for_entire_prompt": False, "mamba_inner_layernorms": True,
       "auto_map": {"AutoConfig": "configuration_jamba.JambaConfig"}}
V5 = {k: v for k, v in MINI.items() if k not in ("torch_dtype", "num_logits_to_keep", "sliding_window")}
V5.update(dtype="bfloat16", use_mambapy=False, use_associative_scan=True, transformers_version="5.17.0")


def test_mini_schedule():
    c = JambaConfig.from_dict(MINI)
    assert [i for i, t in enumerate(c.layers_block_type) if t == "attention"] == [4, 12, 20, 28]
    assert [i for i, n in enumerate(c.layers_num_experts) if n > 1] == list(range(1, 32, 2))
    assert (c.d_inner, c.head_dim, c.mamba_dt_rank, c.eos_token_ids) == (8192, 128, 256, [2, 518])


def test_large_schedule():
    c = JambaConfig.from_dict(LARGE)
    assert [i for i, t in enumerate(c.layers_block_type) if t == "attention"] == list(range(4, 72, 8))
    assert sum(n > 1 for n in c.layers_num_experts) == 36 and c.layers_block_type.count("mamba") == 63


def test_reasoning_3b_is_dense_with_tied_embeddings_and_mqa():
    c = JambaConfig.from_dict(REASONING_3B)
    assert c.tie_word_embeddings and c.num_key_value_heads == 1
    assert c.layers_num_experts == [1] * 28
    assert [i for i, t in enumerate(c.layers_block_type) if t == "attention"] == [7, 21]


def test_v01_legacy_keys_and_auto_dt_rank():
    c = JambaConfig.from_dict(V01)
    assert c.mamba_dt_rank == 256  # ceil(4096 / 16)
    assert c.max_position_embeddings == 262144
    assert c.extra["calc_logits_for_entire_prompt"] is False and "auto_map" in c.extra


def test_transformers_v5_keys():
    c = JambaConfig.from_dict(V5)
    assert c.torch_dtype == "bfloat16" and c.extra["use_mambapy"] is False


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    c = JambaConfig.from_dict({**MINI, "some_future_key": {"a": 1}})
    assert c.extra == {"some_future_key": {"a": 1}, "transformers_version": "4.40.2"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(c.to_dict()))
    assert JambaConfig.from_file(path) == c


def test_defaults_and_none_kv_heads():
    c = JambaConfig.from_dict({"num_key_value_heads": None, "hidden_size": 64, "num_attention_heads": 4})
    assert c.num_key_value_heads == 4 and c.mamba_dt_rank == 4


@pytest.mark.parametrize("periods", [(8, 4, 2, 1), (3, 1, 3, 1), (4, 0, 1, 0), (5, 2, 3, 2), (1, 0, 4, 3)])
def test_schedules_match_transformers(periods):
    from transformers import JambaConfig as Reference

    ap, ao, ep, eo = periods
    keys = dict(num_hidden_layers=17, attn_layer_period=ap, attn_layer_offset=ao, expert_layer_period=ep,
                expert_layer_offset=eo, num_experts=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Reference(**keys)
    ours = JambaConfig.from_dict(keys)
    assert ours.layers_block_type == ref.layers_block_type
    assert ours.layers_num_experts == ref.layers_num_experts


@pytest.mark.parametrize("change, key", [
    ({"attn_layer_offset": 8}, "attn_layer_offset"),
    ({"expert_layer_offset": 2}, "expert_layer_offset"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_experts": "16"}, "num_experts"),
    ({"mamba_dt_rank": "big"}, "mamba_dt_rank"),
    ({"num_key_value_heads": 5}, "num_attention_heads"),
    ({"num_attention_heads": 3}, "hidden_size"),
    ({"num_experts_per_tok": 17}, "num_experts_per_tok"),
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"eos_token_id": [2, 70000]}, "eos_token_id"),
])
def test_invalid_values_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key):
        JambaConfig.from_dict({**MINI, **change})


def test_other_model_type_is_refused():
    with pytest.raises(ConfigError, match="'llama', not 'jamba'"):
        JambaConfig.from_dict({**MINI, "model_type": "llama"})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        JambaConfig.from_file(tmp_path / "config.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        JambaConfig.from_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        JambaConfig.from_file(bad)
