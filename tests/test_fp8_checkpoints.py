"""Loading compressed-tensors FP8 checkpoints (AI21's `*-FP8` layout, written here by
helpers.write_compressed_fp8 from a transformers-saved checkpoint): float8 weights go straight into our
fp8 layers, or are widened (CPU) or requantized (int8) as they load; the result equals the dequantized
weights loaded as a plain checkpoint."""

import json
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_close
from helpers import jamba, write_compressed_fp8
from jamba_cli.compressed_tensors import dequantize
from jamba_cli.errors import CheckpointError
from jamba_cli.loader import load
from jamba_cli.model import Linear
from jamba_cli.quant8 import Experts8, Linear8

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(5))


def dequantized_copy(fp8_dir, dst):
    """The FP8 checkpoint with every float8 weight replaced by weight · scale in fp32, and no
    quantization_config: the plain checkpoint an FP8 load must equal."""
    dst.mkdir()
    for shard in fp8_dir.glob("*.safetensors"):
        out = {}
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                if key.endswith((".weight_scale", ".input_scale")):
                    continue
                t = f.get_tensor(key)
                if t.dtype == torch.float8_e4m3fn:
                    t = dequantize(t, f.get_tensor(key.removesuffix("weight") + "weight_scale"))
                out[key] = t
        save_file(out, dst / shard.name, metadata={"format": "pt"})
    for extra in fp8_dir.iterdir():
        if extra.suffix != ".safetensors":
            (dst / extra.name).write_bytes(extra.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    index = dst / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.endswith(("_scale",))}
        index.write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="module")
def fp8_ckpt(checkpoints, tmp_path_factory):
    src = checkpoints["mini"][0]
    root = tmp_path_factory.mktemp("fp8")
    fp8 = write_compressed_fp8(src, root / "fp8")
    return fp8, dequantized_copy(fp8, root / "plain")


def test_fp8_checkpoint_on_the_cpu_is_widened_with_a_note(fp8_ckpt, capfd):
    fp8, plain = fp8_ckpt
    got, _ = load(fp8, dtype="fp32", device="cpu")
    assert "holds float8 weights; they are widened to the model's dtype" in capfd.readouterr().err
    assert not any(isinstance(m, (Linear8, Experts8)) for m in got.modules())
    want, _ = load(plain, dtype="fp32", device="cpu")
    with torch.no_grad():
        assert torch.equal(got(IDS), want(IDS))


def test_fp8_checkpoint_read_as_is_into_our_fp8_layers(fp8_ckpt, capfd):
    fp8, plain = fp8_ckpt
    got, _ = load(fp8, dtype="fp32", quant="fp8")
    assert capfd.readouterr().err == ""  # nothing converted
    layer = got.model.layers[4]  # attention and a dense MLP in the Mini schedule
    assert isinstance(layer.self_attn.q_proj, Linear8) and isinstance(got.model.layers[1].feed_forward.experts, Experts8)
    assert type(got.model.layers[1].mamba.in_proj) is Linear  # ignored by the checkpoint: 16-bit
    with safe_open(next(fp8.glob("*.safetensors")), framework="pt") as f:  # the bytes, not requantized
        assert torch.equal(layer.self_attn.q_proj.weight.view(torch.uint8),
                           f.get_tensor("model.layers.4.self_attn.q_proj.weight").view(torch.uint8))
    want, _ = load(plain, dtype="fp32", device="cpu")
    with torch.no_grad():
        assert_close(got(IDS), want(IDS), 1e-4)


def test_fp8_checkpoint_requantized_to_int8(fp8_ckpt, capfd):
    fp8, plain = fp8_ckpt
    got, _ = load(fp8, dtype="fp32", quant="int8")
    assert "they are requantized to int8 as they load" in capfd.readouterr().err
    assert got.model.layers[1].feed_forward.experts.weight_format == "int8"
    want, _ = load(plain, dtype="fp32", device="cpu")
    with torch.no_grad():
        a, b = got(IDS), want(IDS)
    assert ((a - b).norm() / b.norm()).item() < 0.2  # a random 16-layer model amplifies any rounding


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_per_tensor_and_per_channel_scales(checkpoints, tmp_path, strategy):
    fp8 = write_compressed_fp8(checkpoints["top1"][0], tmp_path / "fp8", strategy=strategy,
                               scale_dtype=torch.bfloat16, input_scale=0.5 if strategy == "tensor" else None)
    plain = dequantized_copy(fp8, tmp_path / "plain")
    got, _ = load(fp8, dtype="fp32", device="cpu")
    want, _ = load(plain, dtype="fp32", device="cpu")
    with torch.no_grad():
        assert torch.equal(got(IDS), want(IDS))


def _rewrite(directory, change):
    shard = next(directory.glob("*.safetensors"))
    with safe_open(shard, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_missing_weight_scale_is_one_line(checkpoints, tmp_path):
    fp8 = write_compressed_fp8(checkpoints["top1"][0], tmp_path / "fp8")
    _rewrite(fp8, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight_scale"))
    with pytest.raises(CheckpointError) as err:
        load(fp8, device="cpu")
    assert str(err.value) == ("missing tensor model.layers.0.self_attn.q_proj.weight_scale (config.json's "
                              "quantization_config makes model.layers.0.self_attn.q_proj.weight float8)")


def test_float8_weight_without_quantization_config_is_refused(checkpoints, tmp_path):
    fp8 = write_compressed_fp8(checkpoints["top1"][0], tmp_path / "fp8")
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load(fp8, device="cpu")
    assert str(err.value) == ("model.layers.0.feed_forward.experts.0.down_proj.weight in model.safetensors has "
                              "dtype F8_E4M3, but config.json has no quantization_config to say how it is scaled")


@pytest.mark.slow
def test_jamba_run_on_an_fp8_folder(fp8_ckpt):
    # the symptom: `error: unexpected tensor ...weight_scale` from `jamba run -m <folder>`
    fp8, plain = fp8_ckpt
    got = subprocess.run(jamba("run", "-m", fp8, "-n", 6, "--ignore-eos", "--temperature", "0", "--dtype", "fp32",
                               "--device", "cpu", "Hello"), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    want = subprocess.run(jamba("run", "-m", plain, "-n", 6, "--ignore-eos", "--temperature", "0", "--dtype", "fp32",
                                "--device", "cpu", "Hello"), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout != ""
    assert got.stderr.count("note: ") == 1
