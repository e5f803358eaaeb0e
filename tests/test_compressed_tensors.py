"""compressed-tensors FP8 checkpoints: the quantization_config read (what is quantized, what is refused, in
one line naming the key), the tensors' layout checked, the reference dequantization, and the test writer
(helpers.write_compressed_fp8) producing that layout from a real transformers-saved checkpoint."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from conftest import assert_close
from helpers import ROOT, write_compressed_fp8
from safetensors import safe_open

from jamba_cli.compressed_tensors import FP8Scheme, dequantize, scheme_from_config, to_row_scale
from jamba_cli.errors import CheckpointError, ConfigError
from jamba_cli.safetensors_header import read_header

SRC = "m/config.json"
Entry = namedtuple("Entry", "dtype shape")

# As llm-compressor saves FP8_DYNAMIC (channel weights, dynamic per-token activations) for Jamba.
ARGS = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
        "observer": "minmax", "observer_kwargs": {}, "scale_dtype": None, "strategy": "channel", "symmetric": True,
        "type": "float", "zp_dtype": None}
CONFIG = {"model_type": "jamba", "quantization_config": {
    "config_groups": {"group_0": {
        "format": "float-quantized", "output_activations": None, "targets": ["Linear"], "weights": ARGS,
        "input_activations": {**ARGS, "dynamic": True, "observer": None, "strategy": "token"}}},
    "format": "float-quantized", "global_compression_ratio": None, "kv_cache_scheme": None,
    "ignore": ["lm_head", "model.layers.1.feed_forward.router", "re:.*mamba"],
    "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
    "transform_config": {}, "version": "0.12.2"}}

PROJS = {"attention": "model.layers.4.self_attn.q_proj", "dense": "model.layers.0.feed_forward.down_proj",
         "expert": "model.layers.1.feed_forward.experts.3.gate_proj", "router": "model.layers.1.feed_forward.router",
         "mamba": "model.layers.0.mamba.in_proj", "lm_head": "lm_head"}


def edited(path: str, value, config=CONFIG) -> dict:
    """CONFIG with the key at `path` ("a.b.c" under quantization_config) set to `value` (deleted if ...)."""
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config["quantization_config"]
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return config


def test_no_quantization_config_is_no_scheme():
    assert scheme_from_config({"model_type": "jamba"}, SRC) is None


def test_channel_scheme_targets_linear_and_honours_ignore():
    scheme = scheme_from_config(CONFIG, SRC)
    assert isinstance(scheme, FP8Scheme) and scheme.format == "float-quantized"
    assert {k: scheme.strategy(v) for k, v in PROJS.items()} == {
        "attention": "channel", "dense": "channel", "expert": "channel", "router": None, "mamba": None,
        "lm_head": None}
    # "re:" entries are re.match-ed: anchored at the start only, so the mixer's every projection is covered
    for proj in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        assert not scheme.quantized(f"model.layers.2.mamba.{proj}")
    # an exact entry names one module: layer 3's router is still quantized ("Linear" covers routers)
    assert scheme.quantized("model.layers.3.feed_forward.router")
    # "Linear" covers Linear modules only: not conv1d, norms, embeddings, nor the mixer itself
    for name in ("model.layers.4.self_attn", "model.embed_tokens", "model.layers.0.input_layernorm",
                 "model.layers.6.mamba.conv1d"):
        assert not scheme.quantized(name), name
    assert scheme.tensor_names(PROJS["expert"]) == (f"{PROJS['expert']}.weight", f"{PROJS['expert']}.weight_scale",
                                                    f"{PROJS['expert']}.input_scale")


def test_ignore_matching_follows_compressed_tensors():
    def scheme(ignore, targets=("Linear",)):
        config = edited("ignore", list(ignore))
        return scheme_from_config(edited("config_groups.group_0.targets", list(targets), config), SRC)

    name = "model.layers.0.mamba.in_proj"
    assert scheme(["model.layers.0.mamba"]).quantized(name)  # an exact parent name does not cover children
    assert scheme(["re:mamba"]).quantized(name)  # re.match: anchored at the start
    assert not scheme(["re:.*mamba"]).quantized(name)
    assert not scheme([r"re:model\.layers\.0\."]).quantized(name)  # a prefix pattern covers the subtree
    assert scheme([r"re:model\.layers\.0\."]).quantized("model.layers.10.mamba.in_proj")
    assert not scheme(["Linear"]).quantized(name)  # a class name ignores every module of that class
    assert scheme(["Embedding"]).quantized(name)  # ...and another class none of the Linear ones
    # targets: names and patterns instead of "Linear"
    experts = scheme([], [r"re:.*experts\.\d+\.(gate|up|down)_proj$", "lm_head"])
    assert experts.quantized(PROJS["expert"]) and experts.quantized("lm_head")
    assert not experts.quantized(PROJS["dense"]) and not experts.quantized(PROJS["attention"])


def test_tensor_strategy_static_input_and_presets():
    config = edited("config_groups.group_0.weights.strategy", "tensor")
    config = edited("config_groups.group_0.input_activations",
                    {**ARGS, "strategy": "tensor", "observer": "static_minmax"}, config)
    scheme = scheme_from_config(config, SRC)
    assert scheme.strategy(PROJS["attention"]) == "tensor" and scheme.groups[0].static_input
    # strategy left out: inferred from group_size as the library does
    assert scheme_from_config(edited("config_groups.group_0.weights.strategy", ...), SRC).strategy(
        PROJS["dense"]) == "tensor"
    config = edited("config_groups.group_0.weights.group_size", -1,
                    edited("config_groups.group_0.weights.strategy", ...))
    assert scheme_from_config(config, SRC).strategy(PROJS["dense"]) == "channel"
    # naive-quantized (fp8 weight-only) stores the same tensors
    config = edited("config_groups.group_0.input_activations", None, edited("format", "naive-quantized"))
    config = edited("config_groups.group_0.format", "naive-quantized", config)
    assert scheme_from_config(config, SRC).strategy(PROJS["expert"]) == "channel"
    # a group given as a preset name
    for preset, strategy in (("FP8_DYNAMIC", "channel"), ("FP8", "tensor")):
        config = edited("config_groups", {preset: ["Linear"]})
        assert scheme_from_config(config, SRC).strategy(PROJS["expert"]) == strategy


G = "key 'quantization_config.config_groups.group_0"


@pytest.mark.parametrize("path, value, message", [
    ("quant_method", "fp8", "key 'quantization_config.quant_method' is 'fp8'; jamba-cli reads quantized "
     "checkpoints only in the compressed-tensors FP8 layout (quant_method 'compressed-tensors')"),
    ("quant_method", "bitsandbytes", "key 'quantization_config.quant_method' is 'bitsandbytes'; jamba-cli reads "
     "quantized checkpoints only in the compressed-tensors FP8 layout (quant_method 'compressed-tensors')"),
    ("format", "pack-quantized", "key 'quantization_config.format' is 'pack-quantized'; supported: "
     "'float-quantized' or 'naive-quantized'"),
    ("config_groups.group_0.weights.type", "int", f"{G}.weights.type' is 'int'; jamba-cli reads FP8 weights "
     "(type 'float')"),
    ("config_groups.group_0.weights.type", ..., f"{G}.weights.type' is 'int'; jamba-cli reads FP8 weights "
     "(type 'float')"),
    ("config_groups.group_0.weights.num_bits", 4, f"{G}.weights.num_bits' is 4; jamba-cli reads 8-bit float "
     "(e4m3) weights"),
    ("config_groups.group_0.weights.strategy", "block", f"{G}.weights.strategy' is 'block'; supported: 'tensor' "
     "or 'channel' (one scale per weight or per output row)"),
    ("config_groups.group_0.weights.symmetric", False, f"{G}.weights.symmetric' is False; FP8 weights are "
     "symmetric (true)"),
    ("config_groups.group_0.weights.dynamic", True, f"{G}.weights.dynamic' is True; weights are scaled "
     "statically (false)"),
    ("config_groups.group_0.weights", None, f"{G}.weights' is None; jamba-cli reads FP8 weights (type 'float', "
     "num_bits 8)"),
    ("config_groups.group_0.output_activations", {"num_bits": 8}, f"{G}.output_activations' is {{'num_bits': 8}}; "
     "it must be null"),
    ("config_groups.group_0.targets", ["Embedding"], f"{G}.targets[0]' is 'Embedding'; the only module class "
     "jamba-cli quantizes is 'Linear'"),
    ("config_groups.group_0.targets", [], f"{G}.targets' is []; it must be a list of 'Linear', module names and "
     "'re:' patterns"),
    ("kv_cache_scheme", {"num_bits": 8, "type": "float"}, "key 'quantization_config.kv_cache_scheme' is "
     "{'num_bits': 8, 'type': 'float'}; a quantized KV cache is not supported (it must be null)"),
    ("ignore", "lm_head", "key 'quantization_config.ignore' is 'lm_head'; it must be a list of module names and "
     "'re:' patterns"),
    ("ignore", ["re:(mamba"], "key 'quantization_config.ignore[0]' is 're:(mamba'; not a valid regular "
     "expression (missing ), unterminated subpattern at position 0)"),
    ("config_groups", {"W4A16": ["Linear"]}, "key 'quantization_config.config_groups.W4A16' is ['Linear']; a "
     "preset must be one of 'FP8' or 'FP8_DYNAMIC'"),
    ("transform_config", {"config_groups": {"v": {}}}, "key 'quantization_config.transform_config' is "
     "{'config_groups': {'v': {}}}; transformed weights are not supported (it must be {})"),
])
def test_unsupported_configs_are_refused_in_one_line(path, value, message):
    with pytest.raises(ConfigError) as e:
        scheme_from_config(edited(path, value), SRC)
    assert str(e.value) == f"{SRC}: {message}"


def test_group_strategy_is_refused_in_one_line():
    config = edited("config_groups.group_0.weights.strategy", ...,
                    edited("config_groups.group_0.weights.group_size", 128))
    with pytest.raises(ConfigError) as e:
        scheme_from_config(config, SRC)
    assert str(e.value) == (f"{SRC}: {G}.weights.strategy' is 'group'; supported: 'tensor' or 'channel' "
                            "(one scale per weight or per output row)")
    config = edited("config_groups.group_0.input_activations", {**ARGS, "strategy": "channel"})
    with pytest.raises(ConfigError) as e:
        scheme_from_config(config, SRC)
    assert str(e.value) == (f"{SRC}: {G}.input_activations.strategy' is 'channel'; supported: dynamic "
                            "activations, or static per-tensor ('tensor') input scales")


def test_check_validates_each_tensor_naming_it():
    scheme = scheme_from_config(CONFIG, SRC)
    name, fp8 = PROJS["expert"], torch.float8_e4m3fn
    w = Entry(fp8, (96, 64))
    assert scheme.check(name, w, Entry(torch.float32, (96, 1))) == "channel"
    assert scheme.check(name, w, Entry(torch.bfloat16, (96,)), Entry(torch.float32, (1,))) == "channel"
    bad = [
        ((Entry(torch.bfloat16, (96, 64)), Entry(torch.float32, (96, 1))),
         f"{name}.weight has dtype BF16; the quantization_config makes it F8_E4M3"),
        ((Entry(fp8, (4, 96, 64)), Entry(torch.float32, (96, 1))),
         f"{name}.weight has shape [4, 96, 64]; an fp8 weight is 2-D"),
        ((w, Entry(torch.float32, (64, 1))),
         f"{name}.weight_scale has shape [64, 1]; per-channel scales of a weight with 96 rows are [96, 1]"),
        ((w, Entry(torch.float32, (1,))),
         f"{name}.weight_scale has shape [1]; per-channel scales of a weight with 96 rows are [96, 1]"),
        ((w, Entry(torch.int8, (96, 1))), f"{name}.weight_scale has dtype I8; a scale is F32, BF16, F16"),
        ((w, Entry(torch.float32, (96, 1)), Entry(torch.float32, (2,))),
         f"{name}.input_scale has shape [2]; a static input scale is [1]"),
    ]
    for args, message in bad:
        with pytest.raises(CheckpointError) as e:
            scheme.check(name, *args)
        assert str(e.value) == message
    with pytest.raises(CheckpointError) as e:
        scheme.check(PROJS["router"], w, Entry(torch.float32, (96, 1)))
    assert str(e.value) == (f"{PROJS['router']} is not quantized in this checkpoint's quantization_config, "
                            f"but has a weight_scale")
    tensor = scheme_from_config(edited("config_groups.group_0.weights.strategy", "tensor"), SRC)
    assert tensor.check(name, w, Entry(torch.float32, ())) == "tensor"
    with pytest.raises(CheckpointError) as e:
        tensor.check(name, w, Entry(torch.float32, (96, 1)))
    assert str(e.value) == f"{name}.weight_scale has shape [96, 1]; a per-tensor scale is [1]"


def test_dequantize_is_weight_times_scale():
    torch.manual_seed(0)
    w = (torch.randn(6, 5) * 100).to(torch.float8_e4m3fn)
    channel = torch.rand(6, 1) + 0.5
    assert torch.equal(dequantize(w, channel), w.float() * channel)
    assert torch.equal(dequantize(w, channel.to(torch.bfloat16)), w.float() * channel.to(torch.bfloat16).float())
    assert torch.equal(dequantize(w, torch.tensor([0.25])), w.float() * 0.25)
    assert torch.equal(to_row_scale(torch.tensor(3.0), 4), torch.full((4,), 3.0))
    assert to_row_scale(channel, 6).shape == (6,) and to_row_scale(channel, 6).dtype == torch.float32
    with pytest.raises(CheckpointError):
        to_row_scale(torch.ones(3, 2), 6)


def test_importing_it_leaves_torch_out():
    code = "import sys, jamba_cli.compressed_tensors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def _modules(header) -> set[str]:
    return {k.rpartition(".")[0] for k in header}


@pytest.mark.parametrize("strategy, scale_dtype", [("channel", None), ("tensor", torch.bfloat16)])
def test_writer_round_trip(checkpoints, tmp_path, strategy, scale_dtype):
    src = checkpoints["mini"][0]
    dst = write_compressed_fp8(src, tmp_path / "fp8", strategy=strategy, scale_dtype=scale_dtype)
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == strategy
    # the saved ignore names each unquantized Linear, as llm-compressor writes it
    assert "lm_head" in qc["ignore"] and "model.layers.1.feed_forward.router" in qc["ignore"]
    assert "model.layers.15.mamba.dt_proj" in qc["ignore"] and not any(i.startswith("re:") for i in qc["ignore"])
    assert {p.name for p in dst.iterdir()} == {p.name for p in src.iterdir()}

    header = read_header(dst / "model.safetensors")  # our parser takes F8_E4M3
    scheme = scheme_from_config(config, str(dst / "config.json"))
    quantized = {m for m in _modules(header) if f"{m}.weight_scale" in header}
    assert quantized == {m for m in _modules(header) if scheme.quantized(m)}
    assert {m.split(".")[-1] for m in quantized} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    assert len(quantized) == 2 * 4 + 8 * 3 + 8 * 4 * 3  # attention (2 layers), dense MLPs (8), experts (8 x 4)
    with safe_open(src / "model.safetensors", "pt") as f_src, safe_open(dst / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(f_src.keys()) | {f"{m}.weight_scale" for m in quantized}
        for key in f_src.keys():
            module = key.rpartition(".")[0]
            if module not in quantized or not key.endswith(".weight"):
                assert torch.equal(f.get_tensor(key), f_src.get_tensor(key)), key
                continue
            names = scheme.tensor_names(module)
            weight, scale = f.get_tensor(names.weight), f.get_tensor(names.weight_scale)
            assert scheme.check(module, header[names.weight], header[names.weight_scale]) == strategy
            assert scale.dtype == (scale_dtype or torch.float32)
            assert scale.shape == ((weight.shape[0], 1) if strategy == "channel" else (1,))
            # e4m3 keeps 3 mantissa bits: rounding is within 1/16 of the value
            assert_close(dequantize(weight, scale), f_src.get_tensor(key), rtol=1 / 16, msg=key)


def test_writer_static_input_scales_and_shards(sharded_checkpoint, tmp_path):
    dst = write_compressed_fp8(sharded_checkpoint, tmp_path / "fp8", strategy="tensor", input_scale=0.5,
                               ignore=["lm_head", "re:.*mamba"], save_ignore_as_given=True)
    config = json.loads((dst / "config.json").read_text())
    scheme = scheme_from_config(config, "config.json")
    assert scheme.ignore == ("lm_head", "re:.*mamba") and scheme.groups[0].static_input
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    headers = {}
    for shard in sorted(set(index.values())):
        headers.update(read_header(dst / shard))
    assert set(index) == set(headers)
    quantized = [m for m in _modules(headers) if scheme.quantized(m)]
    assert quantized and all(f"{m}.input_scale" in headers for m in quantized)
    for m in quantized:
        names = scheme.tensor_names(m)
        assert scheme.check(m, headers[names.weight], headers[names.weight_scale],
                            headers[names.input_scale]) == "tensor"
