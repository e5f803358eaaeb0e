"""Tiny real Jamba checkpoints for the tests: transformers' JambaForCausalLM with random weights, saved with
`save_pretrained` (which proves the file format), next to a small real BPE tokenizer."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from helpers import REPO, ROOT
from hubserver import FakeHub

# The tiny models run fastest on one thread, and far faster than on two when the CPU is shared.
torch.set_num_threads(1)

# Where the Triton kernel tests run: compiled on a GPU, else on the CPU in Triton's interpreter, which must
# be chosen before anything imports Triton (conftest.py is imported before every test module).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """The Triton kernel checks are slow on the CPU, in the interpreter: `pytest -m "not slow"` leaves them out."""
    for item in items:
        if item.path.name == "test_triton_kernels.py":
            item.add_marker(pytest.mark.slow)


# Relative tolerance of the numeric comparisons, by the lower precision of the two tensors compared: float
# noise (another summation order, another CPU's vector width) stays far inside these, a wrong formula
# does not. fp32 equals the transformers-parity bound the tests always used, now relative to the scale.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close(actual, expected, rtol: float | None = None, *, norm: bool = False, msg: str = "") -> None:
    """The one numeric comparison of the tests.

    Element-wise (the default): |actual - expected| <= rtol * (scale + |expected|), where scale is the
    largest |expected| (the logits' scale), so a bound never sits inside the float noise of large values
    and still catches a wrong small one. `norm`: ||actual - expected|| / ||expected|| <= rtol, for bf16
    paths whose rounding differs element by element. rtol defaults to RTOL of the lower precision.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if rtol is None:
        rtol = max(RTOL.get(actual.dtype, 0.0), RTOL.get(expected.dtype, 0.0)) or RTOL[torch.float32]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)} {msg}"
    assert not a.isnan().any(), f"NaN in the result {msg}"
    if norm:
        err = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
        assert err <= rtol, f"relative error {err:.3g} > {rtol:.3g} {msg}"
        return
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, equal_nan=False, msg=lambda m: f"{m} {msg}")


def shared_data(name: str) -> Path:
    """The path of `name` in the shared data folder, where AI21's own files (chat templates, tokenizers) are
    kept: they are not ours to copy into the repository. The folder is ../shared/data beside the repository
    (ROOT), or $JAMBA_SHARED_DATA where set. Skips the calling test, naming the file, where it is absent."""
    override = os.environ.get("JAMBA_SHARED_DATA")
    folder = Path(override) if override else ROOT.parent / "shared" / "data"
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{name} not found in {folder} (AI21's file, not vendored)")
    return path


VOCAB = 320
SPECIALS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|bom|>", "<|eom|>", "<|system|>", "<|user|>",
            "<|assistant|>"]
CORPUS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "Ünïcödé façade — naïve café 日本語 テキスト 🙂 emoji and tabs\tand\nnewlines",
]

# Shapes small enough for CPU tests; each schedule mirrors a released family (see the README table).
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, num_experts=4, num_experts_per_tok=2,
            initializer_range=0.15, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    # attention 1-in-8 at offset 4, MoE on every odd layer (Jamba v0.1 / 1.5-1.7 Mini / Large)
    "mini": dict(num_hidden_layers=16, attn_layer_period=8, attn_layer_offset=4,
                 expert_layer_period=2, expert_layer_offset=1),
    # attention and MoE on the same layers, MHA, mamba_proj_bias on and conv bias off
    "overlap": dict(num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=3,
                    expert_layer_offset=1, num_key_value_heads=4, mamba_proj_bias=True, mamba_conv_bias=False),
    # Reasoning-3B: tied embeddings, one K/V head (MQA), dense MLP everywhere
    "reasoning": dict(num_hidden_layers=6, attn_layer_period=4, attn_layer_offset=2, num_experts=1,
                      num_key_value_heads=1, tie_word_embeddings=True),
    # top-1 routing, 8 experts, dt_rank given explicitly
    "top1": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2,
                 expert_layer_offset=0, num_experts=8, num_experts_per_tok=1, mamba_dt_rank=7),
}


def build_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A", pair="<|startoftext|> $A $B",
                                                       special_tokens=[("<|startoftext|>", 1)])
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))


def make_hf_model(seed: int = 0, **overrides):
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = JambaConfig(**{**BASE, **overrides})
    model = JambaForCausalLM(cfg).eval()
    with torch.no_grad():  # make norms, biases, D and A non-trivial so a mistake in any of them shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".D", "bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(d)
    return d


def save_checkpoint(model, directory: Path, tokenizer_dir: Path, max_shard_size: str | None = None) -> Path:
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, tuple[Path, object]]:
    """name -> (checkpoint directory, the transformers model it was saved from)."""
    out = {}
    for name, overrides in CONFIGS.items():
        model = make_hf_model(**overrides)
        out[name] = (save_checkpoint(model, tmp_path_factory.mktemp(name), tokenizer_dir), model)
    return out


@pytest.fixture(scope="session")
def mini(checkpoints):
    from jamba_cli.loader import load

    model, tokenizer = load(checkpoints["mini"][0], dtype="fp32", device="cpu")
    return model, tokenizer


@pytest.fixture(scope="session")
def sharded_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A real checkpoint in two ~14.5 MB safetensors shards. Each shard is larger than huggingface_hub's
    10 MiB download chunk, so a transfer cut mid-shard leaves resumable bytes behind (see test_hub.py)."""
    model = make_hf_model(**{**CONFIGS["reasoning"], "intermediate_size": 6144})
    return save_checkpoint(model, tmp_path_factory.mktemp("sharded"), tokenizer_dir, max_shard_size="15MB")


@pytest.fixture(scope="session")
def small(checkpoints):
    """The 4-layer checkpoint, loaded: the cheapest model for generation and CLI tests."""
    from jamba_cli.loader import load

    return load(checkpoints["top1"][0], dtype="fp32", device="cpu")


SHAKESPEARE_VAL = Path(__file__).resolve().parent / "data" / "shakespeare_val.txt"


def build_fitted_lm(directory: Path, tokenizer_dir: Path) -> torch.Tensor:
    """Write a small random Jamba whose lm_head is fitted by ridge regression on its own final hidden states
    to the bigram statistics of Shakespeare, so that its perplexity means something (about 70, against
    320 for a uniform guess) without a training run; experts stacked on disk. Returns held-out ids (2, 256)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from jamba_cli.config import JambaConfig
    from jamba_cli.model import JambaForCausalLM

    text = SHAKESPEARE_VAL.read_text()  # the first half fits the head, the last 4000 characters are held out
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    train = torch.tensor(tok.encode(text[:8000]).ids)
    held = torch.tensor(tok.encode(text[-4000:]).ids[:512]).view(2, 256)
    cfg = JambaConfig(**{**BASE, "initializer_range": 0.05, "intermediate_size": 128}, num_hidden_layers=8,
                      attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1)
    torch.manual_seed(0)
    model = JambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                p.normal_(0, cfg.initializer_range)
        hidden = []
        model.lm_head.register_forward_hook(lambda m, args, out: hidden.append(args[0].flatten(0, 1)))
        x = train[:len(train) // 256 * 256].view(-1, 256)
        model(x)
        counts = torch.full((VOCAB, VOCAB), 0.1).index_put_((train[:-1], train[1:]), torch.ones(len(train) - 1),
                                                          accumulate=True)
        target = (counts / counts.sum(1, keepdim=True)).log()[x.flatten()]  # log p(next | this token)
        h = hidden[0]
        head = torch.linalg.solve(h.T @ h + 1e-2 * torch.eye(h.shape[1]), h.T @ target).T
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = head.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    return held


@pytest.fixture(scope="session")
def fitted_lm(tmp_path_factory, tokenizer_dir) -> tuple[Path, torch.Tensor]:
    """(checkpoint, held-out ids (2, 256)) of `build_fitted_lm`."""
    directory = tmp_path_factory.mktemp("fitted")
    return directory, build_fitted_lm(directory, tokenizer_dir)


# -- the `jamba` process and the local Hub (tests/hubserver.py), for the CLI, process and download tests --

@pytest.fixture(scope="session")
def ckpt(checkpoints) -> str:
    """The 4-layer checkpoint's directory: the cheapest model for CLI runs."""
    return str(checkpoints["top1"][0])


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The environment of a `jamba` process: this checkout importable, one thread, its history under tmp_path,
    and none of the variables that change what it prints."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", XDG_STATE_HOME=str(tmp_path / "state"))
    for name in ("NO_COLOR", "FORCE_COLOR", "JAMBA_DEBUG", "JAMBA_NOHISTORY", "JAMBA_MODEL"):
        out.pop(name, None)
    return out


@pytest.fixture(scope="module")
def repo_files(sharded_checkpoint) -> dict[str, bytes]:
    """The files of helpers.REPO: the sharded checkpoint and what real repos carry next to the weights."""
    files = {p.name: p.read_bytes() for p in sharded_checkpoint.iterdir()}
    # the default selection must leave out the duplicates
    files.update({"pytorch_model.bin": b"\x80\x02pickle" * 300, "model-q4_0.gguf": b"GGUF" + bytes(4000),
                  "README.md": b"# jamba-tiny\n", ".gitattributes": b"*.safetensors filter=lfs\n",
                  "chat_template.jinja": b"{{ messages[0]['content'] }}",
                  "tokenizer.model": b"stand-in bytes: the loader reads tokenizer.json"})
    return files


@pytest.fixture(scope="module")
def server():
    # one server (one port) per module: huggingface_hub 0.x copies the resolve URL template at import
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture
def hub(server, monkeypatch, tmp_path, repo_files):
    """The local Hub serving helpers.REPO, with huggingface_hub and a fresh cache under tmp_path pointed at it.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: in this process long
    ago (transformers imports it). So this sets the environment, which jamba_cli.hub reads per call, and also
    the values huggingface_hub took from it."""
    import huggingface_hub.constants

    server.reset()
    server.add_commit(REPO, repo_files)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    # what huggingface_hub read at import; its own side requests (the agent registry) must stay local too
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # loader.resolve's
    return server
