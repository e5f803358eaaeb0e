"""8-bit and 4-bit weights through bitsandbytes' CPU backend: which modules are quantized, how close the
model stays to full precision, and the errors around it."""

import json
import math
import sys

import bitsandbytes as bnb
import pytest
import torch

from conftest import assert_close
from jamba_cli.errors import DependencyError, UsageError
from jamba_cli.loader import load
from jamba_cli.model import Linear
from jamba_cli.quant import QuantExperts, footprint

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(4))
QUANTIZED = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def quantized_names(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, QUANTIZED)}


def expected_names(config, with_mamba=False) -> set[str]:
    out = set()
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        if config.is_attention(i):
            out |= {f"{p}.self_attn.{n}_proj" for n in "qkvo"}
        elif with_mamba:
            out |= {f"{p}.mamba.{n}" for n in ("x_proj", "out_proj")}
        if config.is_moe(i):
            out |= {f"{p}.feed_forward.experts.{kind}.{e}" for kind in ("gate_up", "down")
                    for e in range(config.num_experts)}
            if with_mamba:
                out.add(f"{p}.feed_forward.router")
        else:
            out |= {f"{p}.feed_forward.{n}_proj" for n in ("gate", "up", "down")}
    return out


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[:, :-1]).float()
    return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item())


@pytest.mark.parametrize("name, bits", [("mini", 8), ("top1", 4)])
def test_mamba_router_and_lm_head_stay_full_precision(checkpoints, name, bits):
    directory, _ = checkpoints[name]
    model, _ = load(directory, dtype="fp32", load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    cfg = model.config
    assert quantized_names(model) == expected_names(cfg)
    for i, layer in enumerate(model.model.layers):
        if not layer.is_attn:
            assert not any(isinstance(m, QUANTIZED) for m in layer.mamba.modules())
            assert type(layer.mamba.in_proj) is Linear and layer.mamba.in_proj.weight.dtype == torch.float32
        if cfg.is_moe(i):
            assert type(layer.feed_forward.router) is Linear
            assert isinstance(layer.feed_forward.experts, QuantExperts)
            assert not any(name.endswith("_proj") for name, _ in layer.feed_forward.experts.named_parameters())
    assert type(model.lm_head) is Linear and model.lm_head.weight.dtype == torch.float32
    kind = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    q_proj = next(layer for layer in model.model.layers if layer.is_attn).self_attn.q_proj
    assert type(q_proj) is kind
    assert q_proj.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    if bits == 4:
        assert q_proj.weight.quant_type == "nf4" and q_proj.compute_dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(IDS)).all()


def test_skip_list_is_overridable(checkpoints):
    directory, _ = checkpoints["top1"]
    model, _ = load(directory, dtype="fp32", load_in_8bit=True, int8_skip="lm_head")
    assert quantized_names(model) == expected_names(model.config, with_mamba=True)
    for name in ("in_proj", "dt_proj"):  # their weights are read directly, so they are never swapped
        assert type(getattr(model.model.layers[1].mamba, name)) is Linear
    assert type(model.lm_head) is Linear
    with torch.no_grad():
        assert torch.isfinite(model(IDS)).all()


def test_tied_lm_head_is_never_quantized(checkpoints):
    model, _ = load(checkpoints["reasoning"][0], dtype="fp32", load_in_8bit=True, int8_skip="")
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.fixture(scope="module")
def full_precision(fitted_lm):
    directory, held = fitted_lm
    model, _ = load(directory, dtype="fp32", device="cpu")
    with torch.no_grad():
        logits = model(held[:, :-1])
    return logits, perplexity(model, held)


def test_8bit_stays_close_to_full_precision(fitted_lm, full_precision):
    directory, held = fitted_lm
    want, ppl = full_precision
    q8, _ = load(directory, dtype="fp32", load_in_8bit=True)
    with torch.no_grad():
        got = q8(held[:, :-1])
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert cos > 0.999
    assert (got - want).abs().mean().item() < 0.02 * want.abs().mean().item()
    assert ppl < 150  # the fitted model predicts (uniform: 320), so a 2% bound says something
    assert abs(perplexity(q8, held) / ppl - 1) < 0.02


def test_4bit_perplexity(fitted_lm, full_precision):
    directory, held = fitted_lm
    q4, _ = load(directory, dtype="fp32", load_in_4bit=True)
    assert abs(perplexity(q4, held) / full_precision[1] - 1) < 0.05


def test_int8_threshold_keeps_outlier_columns_exact(checkpoints):
    directory, _ = checkpoints["top1"]
    full, _ = load(directory, dtype="fp32", device="cpu")
    with_outliers, _ = load(directory, dtype="fp32", load_in_8bit=True)
    without, _ = load(directory, dtype="fp32", load_in_8bit=True, int8_threshold=0.0)
    # many rows, seeded: the max error over 3 unseeded rows put the ratio below 3 for about 1 draw in 12
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    x[:, 5] = 40.0  # one outlier feature, as LLM.int8 finds in real activations
    errors = []
    for model in (with_outliers, without):
        layer = model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            errors.append((layer(x) - full.model.layers[0].self_attn.q_proj(x)).abs().max().item())
    assert with_outliers.model.layers[0].self_attn.q_proj.state.threshold == 6.0
    assert errors[0] < errors[1] / 3, errors


def test_stacked_and_per_expert_checkpoints_quantize_alike(checkpoints, tmp_path):
    from safetensors.torch import save_file

    directory, _ = checkpoints["top1"]
    full, _ = load(directory, dtype="fp32", device="cpu")
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    a, _ = load(directory, dtype="fp32", load_in_8bit=True)
    b, _ = load(tmp_path, dtype="fp32", load_in_8bit=True)
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS))


def test_offloaded_layers_stay_full_precision(checkpoints, tmp_path):
    directory, _ = checkpoints["top1"]
    device_map = {"model.embed_tokens": "cpu", "model.final_layernorm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i >= 2 else "cpu" for i in range(4)})
    path = tmp_path / "map.json"
    path.write_text(json.dumps(device_map))
    split, _ = load(directory, dtype="fp32", load_in_8bit=True, device_map=path, offload_folder=tmp_path / "off")
    skip_late = ("mamba", "router", "lm_head", "layers.2", "layers.3")
    single, _ = load(directory, dtype="fp32", load_in_8bit=True, int8_skip=skip_late)
    assert quantized_names(split) == quantized_names(single) != set()
    assert footprint(split)["disk"] > 0
    with torch.no_grad():
        assert_close(split(IDS), single(IDS), 1e-5)


def test_footprint_counts_int8_bytes_and_row_scales(checkpoints):
    model, _ = load(checkpoints["top1"][0], dtype="fp32", load_in_8bit=True)
    want = sum(p.numel() * 4 for name, p in model.named_parameters() if p.dtype == torch.float32)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            want += m.out_features * m.in_features + m.out_features * 4  # int8 weight, fp32 scale per row
    assert footprint(model) == {"cpu": want}
    with torch.no_grad():
        model(IDS)  # bitsandbytes moves the scales into the module's state on first use
    assert footprint(model) == {"cpu": want}


def test_missing_bitsandbytes_is_one_line(checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is absent
    with pytest.raises(DependencyError) as err:
        load(checkpoints["mini"][0], load_in_4bit=True)
    assert str(err.value) == "8-bit and 4-bit loading need bitsandbytes: pip install 'jamba-cli[quant]'"


@pytest.mark.parametrize("kwargs, message", [
    (dict(load_in_8bit=True, load_in_4bit=True), "`load_in_8bit` and `load_in_4bit` exclude each other"),
    (dict(load_in_8bit=True, int8_threshold=-1.0), "`int8_threshold` must be >= 0, got -1.0"),
])
def test_bad_quantization_options(checkpoints, kwargs, message):
    # usage errors, as from the CLI (exit status 2 there: test_cli.test_usage_errors_exit_2)
    with pytest.raises(UsageError) as err:
        load(checkpoints["mini"][0], **kwargs)
    assert str(err.value) == message and err.value.exit_code == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("split", [False, True])
def test_quantized_on_gpu_and_split_with_cpu(fitted_lm, full_precision, bits, split):
    directory, held = fitted_lm
    device_map = {"": 0}
    if split:  # the second half runs on the CPU, quantized there by bitsandbytes' CPU backend
        device_map.update({f"model.layers.{i}": "cpu" for i in range(4, 8)})
    model, _ = load(directory, dtype="bf16", device_map=device_map, load_in_8bit=bits == 8,
                    load_in_4bit=bits == 4, int8_backend="bitsandbytes" if bits == 8 else "auto")
    assert quantized_names(model) == expected_names(model.config)
    assert model.model.layers[2].self_attn.q_proj.weight.device.type == "cuda"
    assert model.model.layers[6].self_attn.q_proj.weight.device.type == ("cpu" if split else "cuda")
    assert abs(perplexity(model, held.cuda()) / full_precision[1] - 1) < (0.02 if bits == 8 else 0.05)


@pytest.mark.slow
def test_bundled_model_8bit_perplexity_within_2_percent():
    from pathlib import Path

    full, tok = load(dtype="fp32", device="cpu")  # the bundled model
    text = (Path(__file__).parent / "data" / "shakespeare_val.txt").read_text()
    ids = tok.encode(text, add_special_tokens=False)[:4 * 255]
    rows = torch.tensor([[tok.bos_token_id] + ids[i:i + 255] for i in range(0, len(ids), 255)])  # (4, 256)
    q8, _ = load(dtype="fp32", device="cpu", load_in_8bit=True)
    assert quantized_names(q8) == expected_names(q8.config)
    base = perplexity(full, rows)
    assert base < 150  # a trained model: the bound below says something
    assert abs(perplexity(q8, rows) / base - 1) < 0.02
