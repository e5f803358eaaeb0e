"""Our 8-bit layers (jamba_cli/quant8.py) on the CPU: what is quantized, how close the model stays, how
they compare with bitsandbytes' LLM.int8 on the same weights, and the options around them. The GPU
kernels that read them: tests/test_triton_kernels.py (interpreter) and tests/test_gpu.py."""

import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from helpers import jamba
from jamba_cli import kernels
from jamba_cli.errors import UsageError
from jamba_cli.loader import load
from jamba_cli.model import Linear
from jamba_cli.quant import bytes_by_dtype, footprint
from jamba_cli.quant8 import Experts8, Linear8, dequantize, quantize_rows

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(4))


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[:, :-1]).float()
    return math.exp(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("fmt, bound", [("int8", 0.5 / 127), ("fp8", 2 ** -4)])
def test_quantize_rows_round_trip(fmt, bound):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0  # an all-zero row stays zero
    q, s = quantize_rows(w, fmt)
    assert q.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt] and s.shape == (64,)
    back = dequantize(q, s)
    assert torch.equal(back[5], torch.zeros(96))
    # per element: int8 is off by at most half a step of its row; e4m3 by a relative 2^-4 (3 mantissa bits)
    # above the smallest normal number
    err = (back - w).abs()
    if fmt == "int8":
        assert (err <= bound * w.abs().amax(1, keepdim=True) * 1.0001).all()
    else:
        normal = w.abs() >= 2 ** -6 * s[:, None]
        assert (err[normal] <= bound * w.abs()[normal] * 1.0001).all()


def test_linear_through_the_seam_is_the_dequantized_product():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 48, generator=g), torch.randn(32, 48, generator=g)
    q, s = quantize_rows(w, "int8")
    assert_close(kernels.linear(x, q, scale=s), F.linear(x, dequantize(q, s)), 1e-5)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_which_modules_are_8bit(checkpoints, fmt):
    model, _ = load(checkpoints["mini"][0], dtype="fp32", quant=fmt)
    c = model.config
    for i, layer in enumerate(model.model.layers):
        ff = layer.feed_forward
        if c.is_moe(i):
            assert isinstance(ff.experts, Experts8) and ff.experts.weight_format == fmt
            assert type(ff.router) is Linear  # routers stay full precision
        else:
            assert all(isinstance(getattr(ff, n), Linear8) for n in ("gate_proj", "up_proj", "down_proj"))
        if layer.is_attn:
            assert all(isinstance(getattr(layer.self_attn, f"{n}_proj"), Linear8) for n in "qkvo")
        else:  # the Mamba mixer stays full precision, as AI21's model card asks
            assert not any(isinstance(m, (Linear8, Experts8)) for m in layer.mamba.modules())
    assert type(model.lm_head) is Linear


def test_skip_list_is_overridable_but_in_proj_and_dt_proj_stay(checkpoints):
    model, _ = load(checkpoints["mini"][0], dtype="fp32", quant="int8", int8_skip="router")
    layer = next(lay for lay in model.model.layers if not lay.is_attn)
    assert isinstance(layer.mamba.x_proj, Linear8) and isinstance(layer.mamba.out_proj, Linear8)
    assert type(layer.mamba.in_proj) is Linear and type(layer.mamba.dt_proj) is Linear  # read as tensors
    assert isinstance(model.lm_head, Linear8)
    with torch.no_grad():
        assert torch.isfinite(model(IDS)).all()


def test_int8_error_at_most_llm_int8s_on_the_same_weights(checkpoints):
    # a transformers-saved Mini-like checkpoint (random, so errors grow through its layers); the same skip list
    directory = checkpoints["mini"][0]
    full, _ = load(directory, dtype="fp32", device="cpu")
    ours, _ = load(directory, dtype="fp32", quant="int8")
    bnb8, _ = load(directory, dtype="fp32", load_in_8bit=True, int8_backend="bitsandbytes")
    with torch.no_grad():
        want, got, theirs = full(IDS), ours(IDS), bnb8(IDS)
    ours_err, bnb_err = relative_error(got, want), relative_error(theirs, want)
    # per-row int8 of the weights alone; LLM.int8 also rounds the activations to int8
    assert 0 < ours_err <= bnb_err, (ours_err, bnb_err)


@pytest.mark.parametrize("fmt, bound", [("int8", 0.005), ("fp8", 0.01)])
def test_bundled_model_8bit_perplexity(fmt, bound):
    full, tok = load(dtype="fp32", device="cpu")  # the bundled model
    text = (Path(__file__).parent / "data" / "shakespeare_val.txt").read_text()  # text it never saw
    ids = tok.encode(text, add_special_tokens=False)[:4 * 255]
    rows = torch.tensor([[tok.bos_token_id] + ids[i:i + 255] for i in range(0, len(ids), 255)])  # (4, 256)
    q8, _ = load(dtype="fp32", device="cpu", quant=fmt)
    assert isinstance(q8.model.layers[1].feed_forward.experts, Experts8)
    base = perplexity(full, rows)
    assert base < 150  # a trained model: the bound below says something
    assert abs(perplexity(q8, rows) / base - 1) < bound  # int8 within 0.5 % of fp32 (the bound)


def test_stacked_and_per_expert_checkpoints_quantize_alike(checkpoints, tmp_path):
    from safetensors.torch import save_file

    directory = checkpoints["top1"][0]  # per-expert keys, as transformers saves them
    full, _ = load(directory, dtype="fp32", device="cpu")
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    a, _ = load(directory, dtype="fp32", quant="int8")
    b, _ = load(tmp_path, dtype="fp32", quant="int8")
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS))


def test_weight_bytes_per_dtype(checkpoints):
    full, _ = load(checkpoints["mini"][0], dtype="bf16", device="cpu")
    model, _ = load(checkpoints["mini"][0], dtype="bf16", quant="int8")
    kinds = bytes_by_dtype(model)
    eight = [m for m in model.modules() if isinstance(m, (Linear8, Experts8))]
    want_int8 = sum(p.numel() for m in eight for n, p in m.named_parameters() if p.dtype == torch.int8)
    want_scales = sum(p.numel() * 4 for m in eight for n, p in m.named_parameters() if p.dtype == torch.float32)
    assert kinds["int8"] == want_int8 > 0 and kinds["float32"] == want_scales
    assert sum(kinds.values()) == footprint(model)["cpu"] < footprint(full)["cpu"]
    # an 8-bit weight with its fp32 row scales takes half of bf16 plus 4 bytes a row
    assert want_int8 + want_scales + kinds["bfloat16"] == footprint(model)["cpu"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(quant="fp8", load_in_4bit=True), "`quant` fp8 is 8-bit; it excludes `load_in_4bit`"),
    (dict(quant="int8", int8_backend="bitsandbytes"),
     "`quant` int8 picks our 8-bit layers; it excludes `int8_backend` bitsandbytes"),
    (dict(int8_backend="ours"), "`int8_backend` ours applies to `load_in_8bit`, which is not set"),
    (dict(quant="int4"), "`quant` must be one of int8, fp8, not 'int4'"),
    (dict(load_in_8bit=True, int8_backend="gptq"), "`int8_backend` must be one of auto, ours, bitsandbytes, not 'gptq'"),
])
def test_bad_8bit_options(checkpoints, kwargs, message):
    with pytest.raises(UsageError) as err:
        load(checkpoints["mini"][0], **kwargs)
    assert str(err.value) == message


def run_jamba(*args):
    return subprocess.run(jamba(*args), capture_output=True, text=True, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_cli_quant_int8_shows_the_bytes_per_dtype(ckpt):
    r = run_jamba("run", "-m", ckpt, "--quant", "int8", "--stats", "-n", "4", "--temperature", "0", "Hello")
    assert r.returncode == 0, r.stderr
    weights = next(line for line in r.stderr.splitlines() if line.startswith("weights "))
    assert "int8" in weights and "float32" in weights
    plain = run_jamba("run", "-m", ckpt, "--stats", "-n", "4", "--temperature", "0", "Hello")
    assert "int8" not in next(line for line in plain.stderr.splitlines() if line.startswith("weights "))


@pytest.mark.slow
def test_cli_contradictory_8bit_flags_exit_2(ckpt):
    r = run_jamba("run", "-m", ckpt, "--quant", "fp8", "--load-in-4bit", "Hello")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: --quant fp8 is 8-bit; it excludes --load-in-4bit"]
