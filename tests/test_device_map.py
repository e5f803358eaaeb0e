"""Device maps: a model split over the CPU and disk offload computes exactly what it computes on one device,
and every way of getting the map wrong is reported in one line before any memory is spent."""

import json

import pytest
import torch

from conftest import assert_close
from jamba_cli.cache import make_cache
from jamba_cli.errors import DeviceMapError
from jamba_cli.generation import generate_step
from jamba_cli.devices import parse_max_memory
from jamba_cli.loader import load
from jamba_cli.quant import footprint

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(3))


def layer_map(n_layers: int, device_of) -> dict:
    out = {"model.embed_tokens": "cpu", "model.final_layernorm": "cpu", "lm_head": device_of(n_layers)}
    out.update({f"model.layers.{i}": device_of(i) for i in range(n_layers)})
    return out


def is_mapped_file(t: torch.Tensor) -> bool:
    return t.untyped_storage().filename is not None


@pytest.fixture(scope="module")
def reference(checkpoints):
    directory, _ = checkpoints["mini"]
    model, _ = load(directory, dtype="fp32", device="cpu")
    with torch.no_grad():
        return directory, model(IDS)


def test_cpu_and_disk_offload_give_single_device_logits(reference, tmp_path):
    directory, want = reference
    model, _ = load(directory, dtype="fp32", device_map="auto", max_memory="cpu=2MB", offload_folder=tmp_path)
    sizes = footprint(model)
    assert sizes["cpu"] > 0 and sizes["disk"] > 0  # really split
    assert sum(sizes.values()) == sum(p.numel() * 4 for p in model.parameters())
    with torch.no_grad():
        got = model(IDS)
    assert_close(got, want, 1e-5)
    assert list(tmp_path.iterdir()) == []  # the mapped files are unlinked: nothing is left behind


def test_explicit_json_map(reference, tmp_path):
    directory, want = reference
    n = 16
    path = tmp_path / "map.json"
    path.write_text(json.dumps(layer_map(n, lambda i: "disk" if i % 3 == 1 or i == n else "cpu")))
    model, _ = load(directory, dtype="fp32", device_map=str(path), offload_folder=tmp_path / "offload")
    layers = model.model.layers
    assert [is_mapped_file(layer.input_layernorm.weight) for layer in layers] == [i % 3 == 1 for i in range(n)]
    assert is_mapped_file(model.lm_head.weight) and not is_mapped_file(model.model.embed_tokens.weight)
    with torch.no_grad():
        got = model(IDS)
    assert_close(got, want, 1e-5)


def test_generation_with_the_cache_on_each_layers_device(checkpoints, tmp_path):
    directory, _ = checkpoints["top1"]
    single, _ = load(directory, dtype="fp32", device="cpu")
    split, _ = load(directory, dtype="fp32", device_map=layer_map(4, lambda i: "disk" if i >= 2 else "cpu"),
                    offload_folder=tmp_path)
    cache = make_cache(split.config, 1, dtype=split.dtype, device=split.layer_devices(), capacity=40)
    assert [layer.k.device if hasattr(layer, "k") else layer.ssm.device for layer in cache.layers] \
        == split.layer_devices()
    prompt = torch.tensor([1, 40, 41, 42, 43])
    want = torch.cat(list(generate_step(single, prompt, max_tokens=20)))
    got = torch.cat(list(generate_step(split, prompt, cache=cache, max_tokens=20)))
    assert got.tolist() == want.tolist()


def test_parse_max_memory():
    assert parse_max_memory("cpu=2GiB, disk=1.5TB") == {"cpu": 2 * 2**30, "disk": 1_500_000_000_000}
    assert parse_max_memory("CPU=500 MB") == {"cpu": 500_000_000}
    assert parse_max_memory("cpu=1024") == {"cpu": 1024}


@pytest.mark.parametrize("device_map, max_memory, offload, message", [
    ({"model.layers.99": "cpu"}, None, False,
     "device map names 'model.layers.99', which is not a module of this model (it has 16 layers, "
     "model.layers.0 to model.layers.15)"),
    ({"model.layers.0.attention": "cpu"}, None, False,
     "device map names 'model.layers.0.attention', which is not a module of this model"),
    ({"": 0}, None, False, "device map entry '': there is no cuda:0 (no GPU is visible)"),
    ("cuda:3", None, False, "`device_map`: there is no cuda:3 (no GPU is visible)"),
    ({"": "gpu0"}, None, False,
     "device map entry '': 'gpu0' is not a device (use a GPU index, cuda:N, cpu or disk)"),
    ("fastest", None, False, "`device_map`: 'fastest' is not a device (use a GPU index, cuda:N, cpu or disk)"),
    ({k: v for k, v in layer_map(16, lambda i: "cpu").items() if k != "model.layers.7"}, None, False,
     "device map leaves model.layers.7 unmapped; give it a device"),
    ({"": "cpu", "model.layers.3.feed_forward": "disk"}, None, True,
     "device map splits model.layers.3 over cpu and disk; give each layer one device"),
    ({"": "cpu", "lm_head": "disk"}, None, False, "the device map sends weights to disk: pass `offload_folder`"),
    ("auto", "cpu=1MB", False, "not enough memory: the weights need "),
    ({"": "cpu"}, {"cpu": "1MB"}, False, "not enough memory: the device map puts "),
    ("cpu", "cpu=2MB,7=1GiB", False, "`max_memory`: there is no cuda:7 (no GPU is visible)"),
    ("auto", "cpu:2GiB", False, "`max_memory` entry 'cpu:2GiB' is not DEVICE=SIZE (e.g. 0=70GiB,cpu=200GiB)"),
    ("auto", "cpu=lots", False, "`max_memory` size 'lots' for cpu is not a size like 70GiB or 500MB"),
])
def test_bad_placement_is_one_clear_line(checkpoints, tmp_path, device_map, max_memory, offload, message):
    if torch.cuda.is_available() and "GPU" in message:
        pytest.skip("this machine has GPUs")
    directory, _ = checkpoints["mini"]
    with pytest.raises(DeviceMapError) as err:
        load(directory, dtype="fp32", device_map=device_map, max_memory=max_memory,
             offload_folder=tmp_path if offload else None)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    if message.startswith("not enough memory: the weights"):
        assert str(err.value).endswith("raise it, quantize, or pass `offload_folder`")


def test_bad_json_map_file(checkpoints, tmp_path):
    directory, _ = checkpoints["mini"]
    path = tmp_path / "map.json"
    path.write_text('{"model.layers.0": 0,')
    with pytest.raises(DeviceMapError, match=r"^device map .*map\.json is not valid JSON"):
        load(directory, device_map=path)
    with pytest.raises(DeviceMapError, match=r"^cannot read device map .*missing\.json"):
        load(directory, device_map=tmp_path / "missing.json")


def test_device_and_device_map_together(checkpoints):
    with pytest.raises(DeviceMapError, match="^pass either `device` or `device_map`, not both$"):
        load(checkpoints["mini"][0], device="cpu", device_map="auto")
    with pytest.raises(DeviceMapError, match="^not enough memory: the device map puts .* on cpu"):
        load(checkpoints["mini"][0], device="cpu", max_memory="cpu=1MB")  # a budget checks a plain device too


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_over_gpus_and_cpu_matches_one_device(checkpoints):
    # Every GPU gets a share of the layers and the last quarter stays on the CPU (issue #30367: caches too).
    directory, _ = checkpoints["mini"]
    n_gpu = torch.cuda.device_count()
    single, _ = load(directory, dtype="fp32", device="cuda:0")
    split, _ = load(directory, dtype="fp32",
                    device_map=layer_map(16, lambda i: "cpu" if i >= 12 else i * n_gpu // 12))
    assert len(set(split.layer_devices())) == min(n_gpu, 12) + 1
    cache = make_cache(split.config, 2, dtype=split.dtype, device=split.layer_devices(), capacity=30)
    with torch.no_grad():
        want = single(IDS.cuda())
        got = split(IDS.cuda(), cache)
    assert got.device == want.device
    assert_close(got, want)
    prompt = torch.tensor([1, 40, 41, 42, 43])
    assert torch.cat(list(generate_step(split, prompt, max_tokens=16))).tolist() \
        == torch.cat(list(generate_step(single, prompt, max_tokens=16))).tolist()
