"""Loading checkpoints: layouts, the HF cache, progress, and one clear error for each way a checkpoint breaks."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jamba_cli.errors import CheckpointError, ConfigError, UsageError
from jamba_cli.loader import load
from conftest import CONFIGS, make_hf_model, save_checkpoint


@pytest.fixture
def ckpt(checkpoints, tmp_path):
    """A private copy of the 'top1' checkpoint that a test may break."""
    return shutil.copytree(checkpoints["top1"][0], tmp_path / "ckpt")


def _logits(directory):
    model, _ = load(directory, dtype="fp32", device="cpu")
    with torch.no_grad():
        return model(torch.arange(3, 40)[None])


def _rewrite(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_sharded_and_single_file_give_identical_logits(tokenizer_dir, tmp_path):
    model = make_hf_model(**CONFIGS["mini"])
    single = save_checkpoint(model, tmp_path / "single", tokenizer_dir)
    sharded = save_checkpoint(model, tmp_path / "sharded", tokenizer_dir, max_shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert torch.equal(_logits(single), _logits(sharded))


def test_stacked_expert_layout_loads_like_per_expert_keys(ckpt, tmp_path):
    want = _logits(ckpt)

    def stack(tensors):
        for base in sorted({k.split(".experts.")[0] for k in tensors if ".experts." in k}):
            n = len({k for k in tensors if k.startswith(base + ".experts.") and k.endswith("down_proj.weight")})
            pop = lambda e, p: tensors.pop(f"{base}.experts.{e}.{p}.weight")
            tensors[f"{base}.experts.gate_up_proj"] = torch.stack(
                [torch.cat([pop(e, "gate_proj"), pop(e, "up_proj")]) for e in range(n)])
            tensors[f"{base}.experts.down_proj"] = torch.stack([pop(e, "down_proj") for e in range(n)])

    _rewrite(ckpt, stack)
    assert torch.equal(_logits(ckpt), want)


def test_tied_checkpoint_has_no_head_and_shares_it(checkpoints):
    directory, _ = checkpoints["reasoning"]
    with open(directory / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "lm_head.weight" not in header
    model, _ = load(directory, dtype="fp32", device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_progress_reports_bytes_up_to_the_total(ckpt):
    seen = []
    load(ckpt, dtype="fp32", device="cpu", progress=lambda done, total: seen.append((done, total)))
    total = seen[-1][1]
    assert seen[-1][0] == total == (ckpt / "model.safetensors").stat().st_size - 8 - \
        int.from_bytes((ckpt / "model.safetensors").read_bytes()[:8], "little")
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))


def test_dtype_choice(ckpt):
    assert load(ckpt, dtype="bf16", device="cpu")[0].model.layers[1].mamba.in_proj.weight.dtype == torch.bfloat16
    assert load(ckpt, dtype=torch.float16, device="cpu")[0].dtype == torch.float16
    assert load(ckpt, device="cpu")[0].dtype == torch.float32  # tiny model on CPU: fp32 by default
    with pytest.raises(UsageError, match="unknown `dtype` 'int3'"):
        load(ckpt, dtype="int3")


def test_repo_id_from_the_local_hf_cache(ckpt, tmp_path, monkeypatch):
    # the cache layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--ai21labs--Jamba-test"
    shutil.copytree(ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    assert torch.equal(_logits("ai21labs/Jamba-test"), _logits(ckpt))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*jamba download ai21labs/Nope"):
        load("ai21labs/Nope")


@pytest.mark.parametrize("name, breaker, message", [
    ("no config", lambda d: (d / "config.json").unlink(), r"no config\.json in"),
    ("no weights", lambda d: (d / "model.safetensors").unlink(), r"no safetensors weights in"),
    ("no tokenizer", lambda d: (d / "tokenizer.json").unlink(), r"no tokenizer\.json in"),
    ("bad tokenizer", lambda d: (d / "tokenizer.json").write_text("{}"), r"tokenizer\.json in .* cannot be read"),
    ("not jamba", lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "mamba"})),
     r"model_type is 'mamba', not 'jamba'"),
    ("bad config", lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "attn_layer_offset": 9})),
     r"'attn_layer_offset' \(9\) must be smaller than 'attn_layer_period' \(2\)"),
    ("garbage", lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!}xxxxx"),
     r"model\.safetensors is corrupt: its safetensors header is not valid JSON"),
    ("huge header", lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}"),
     r"model\.safetensors is corrupt or truncated"),
    ("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
     r"model\.safetensors is truncated: \S+ ends at byte \d+ but the file has \d+"),
    ("empty", lambda d: (d / "model.safetensors").write_bytes(b""), r"model\.safetensors is not a safetensors file"),
])
def test_broken_checkpoints_fail_with_one_line(ckpt, name, breaker, message):
    breaker(ckpt)
    with pytest.raises((CheckpointError, ConfigError), match=message) as info:
        load(ckpt, device="cpu")
    assert "\n" not in str(info.value)


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mamba.dt_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"^missing tensor model\.layers\.1\.mamba\.dt_layernorm\.weight$"):
        load(ckpt)


def test_missing_expert_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.2.feed_forward.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"^missing tensor model\.layers\.2\.feed_forward\.experts\.5\.up_proj"):
        load(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.rotary_emb\.inv_freq "
                                              r"in model\.safetensors"):
        load(ckpt)


def test_expert_beyond_num_experts_is_unexpected(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.feed_forward.experts.8.down_proj.weight": torch.zeros(64, 96)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.feed_forward\.experts\.8\."):
        load(ckpt)


def test_shape_mismatch_names_key_and_both_shapes(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.1.mamba.A_log": torch.zeros(128, 9)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for model\.layers\.1\.mamba\.A_log: "
                                              r"checkpoint has \[128, 9\], config expects \[128, 8\]"):
        load(ckpt)


def test_missing_shard_is_named(tokenizer_dir, tmp_path):
    sharded = save_checkpoint(make_hf_model(**CONFIGS["top1"]), tmp_path / "s", tokenizer_dir, max_shard_size="100KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"missing weight shard {victim.name} \(listed in "
                                              r"model\.safetensors\.index\.json\)"):
        load(sharded)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load(tmp_path / "nothing-here")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load(tmp_path / "file")


def test_a_user_that_does_not_exist_is_one_usage_error_through_the_api():
    with pytest.raises(UsageError, match="`path_or_repo`: cannot expand ~nosuchuser-jamba-test: no such user"):
        load("~nosuchuser-jamba-test/ckpt")
