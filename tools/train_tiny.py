"""Train the bundled model: a small real Jamba (Mamba + attention layers, MoE + dense MLPs) on a plain-text
corpus and on dialogues built from its speeches, written in the exact Hugging Face checkpoint format.

    python tools/train_tiny.py --device cuda --max-minutes 4            # the bundled model (H200)
    python tools/train_tiny.py --device cpu --max-minutes 1 --size smoke --out /tmp/smoke

The time budget sets the length of the run: the first steps are timed, and the cosine schedule is
stretched over as many steps as the rest of the budget holds.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval_ppl import mean_nll, unigram_perplexity  # noqa: E402
from jamba_cli import kernels  # noqa: E402
from jamba_cli.config import JambaConfig  # noqa: E402
from jamba_cli.loader import BUNDLED_MODEL, load  # noqa: E402
from jamba_cli.model import JambaForCausalLM  # noqa: E402
import tiny_corpus as corpus  # noqa: E402

SIZE_LIMIT = 16_000_000  # bytes, the whole asset directory
EXCERPT = ROOT / "tests" / "data" / "shakespeare_val.txt"
# Jamba's layer pattern in miniature: attention on 2 of 8 layers, MoE (4 experts, top-2) on every odd
# layer, so the MoE layers are Mamba layers and the attention layers dense, as in Jamba 1.5.
SIZES = {
    "default": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                    intermediate_size=224, attn_layer_period=4, attn_layer_offset=2),
    "smoke": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, attn_layer_period=2, attn_layer_offset=1),
}
COMMON = dict(num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
              mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, tie_word_embeddings=True,
              use_mamba_kernels=False, initializer_range=0.02, rms_norm_eps=1e-6)
# Steps timed to size the schedule. The first ones are left out: on CUDA they run slower (kernel autotuning,
# allocator growth), and timing them left half of a 3-minute budget unused on the H200.
CALIBRATION_START, CALIBRATION_STEPS = 10, 20


def make_config(size: str, vocab_size: int, eom_id: int, seq_len: int) -> JambaConfig:
    return JambaConfig(vocab_size=vocab_size, **SIZES[size], **COMMON, pad_token_id=0, bos_token_id=1,
                       eos_token_id=[2, eom_id], max_position_embeddings=seq_len,
                       architectures=["JambaForCausalLM"], torch_dtype="bfloat16")


def init_weights(model: JambaForCausalLM) -> None:
    """GPT-style normal init (residual outputs scaled down by depth) and Mamba's dt initialisation."""
    cfg = model.config
    std = cfg.initializer_range
    resid_std = std / math.sqrt(2 * cfg.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.normal_(0, resid_std)
            elif name.endswith(("proj.weight", "router.weight", "embed_tokens.weight", "experts.gate_up_proj")):
                p.normal_(0, std)
        for layer in model.model.layers:
            if layer.is_attn:
                continue
            dt_proj = layer.mamba.dt_proj
            dt_proj.weight.uniform_(-cfg.mamba_dt_rank ** -0.5, cfg.mamba_dt_rank ** -0.5)
            # softplus(bias) log-uniform in [1e-3, 1e-1]: each channel starts with its own time scale
            dt = torch.exp(torch.rand(cfg.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def add_training_hooks(model: JambaForCausalLM, dropout: float) -> list[torch.Tensor]:
    """Dropout on every residual branch (train mode only) and capture of router logits for the
    load-balancing loss, as forward hooks so the model code stays inference-only."""
    def drop(module, args, output):
        return F.dropout(output, dropout, module.training)

    router_logits: list[torch.Tensor] = []
    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        (layer.self_attn if layer.is_attn else layer.mamba).register_forward_hook(drop)
        layer.feed_forward.register_forward_hook(drop)
        if hasattr(layer.feed_forward, "router"):
            layer.feed_forward.router.register_forward_hook(lambda m, a, out: router_logits.append(out))
    return router_logits


def balance_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-style auxiliary loss: 1.0 when tokens and router probability spread evenly over experts."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)  # (tokens, X)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(1).float()
        losses.append(probs.shape[-1] * (chosen.mean(0) * probs.mean(0)).sum() / top_k)
    return torch.stack(losses).mean()


class Batches:
    """Random training windows of seq_len + 1 tokens, each starting with BOS as a prompt would.

    Text rows start at a speech (half of them) or anywhere in the play; chat rows at a conversation.
    """

    def __init__(self, text_ids: list[int], chat_ids: list[int], chat_starts: list[int], newline: int,
                 bos: int, seq_len: int, batch_size: int, chat_fraction: float, device, seed: int):
        self.text = torch.tensor(text_ids, device=device)
        self.chat = torch.tensor(chat_ids, device=device)
        speech = [0] + [i for i in range(2, len(text_ids)) if text_ids[i - 1] == text_ids[i - 2] == newline]
        self.speech_starts = torch.tensor([s for s in speech if s <= len(text_ids) - seq_len])
        self.chat_starts = torch.tensor([s for s in chat_starts if s <= len(chat_ids) - seq_len - 1])
        self.bos, self.seq_len, self.device = bos, seq_len, device
        self.n_chat = round(batch_size * chat_fraction)
        self.n_text = batch_size - self.n_chat
        self.gen = torch.Generator().manual_seed(seed)

    def _pick(self, starts: torch.Tensor, n: int) -> torch.Tensor:
        return starts[torch.randint(len(starts), (n,), generator=self.gen)]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.n_text // 2
        anywhere = torch.randint(len(self.text) - self.seq_len, (self.n_text - half,), generator=self.gen)
        starts = torch.cat([self._pick(self.speech_starts, half), anywhere]).to(self.device)
        span = torch.arange(self.seq_len, device=self.device)
        text = self.text[starts[:, None] + span]
        text = torch.cat([torch.full_like(text[:, :1], self.bos), text], dim=1)
        chat_starts = self._pick(self.chat_starts, self.n_chat).to(self.device)
        chat = self.chat[chat_starts[:, None] + torch.arange(self.seq_len + 1, device=self.device)]
        rows = torch.cat([text, chat])  # (B, T+1)
        return rows[:, :-1], rows[:, 1:]


def hf_state_dict(model: JambaForCausalLM) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under their on-disk names: experts split per expert, a tied head left out."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        base = name.rsplit(".", 1)[0]
        if name.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = gate[e], up[e]
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{base}.{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in out.items()}


def write_checkpoint(directory: Path, model: JambaForCausalLM, tok) -> None:
    from safetensors.torch import save_file

    cfg = model.config
    save_file(hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(corpus.tokenizer_config(), indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                  "pad_token_id": cfg.pad_token_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


@dataclass
class Data:
    """Token ids: training text and dialogue streams, validation text and dialogues, the test excerpt."""
    train: list[int]
    chat: list[int]
    chat_starts: list[int]  # where each rendered dialogue (which begins with BOS) starts in `chat`
    val: list[int]
    val_chat: list[int]  # as many tokens as `val` (the dialogues overlap: each speech is in several)
    excerpt: list[int]
    excerpt_is_test_data: bool  # the excerpt is the text of tests/data/shakespeare_val.txt


def prepare_data(tok, train_text: str, val_text: str, seed: int) -> Data:
    encode = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    convs = corpus.dialogues(corpus.speeches(train_text), random.Random(seed))
    random.Random(seed).shuffle(convs)
    chat_docs = encode([corpus.render_chat(c) for c in convs])
    val_convs = corpus.dialogues(corpus.speeches(val_text), random.Random(seed))
    excerpt_text = corpus.excerpt(val_text)
    train, val, excerpt = encode([train_text, val_text, excerpt_text])
    return Data(train=train, chat=[t for d in chat_docs for t in d],
                chat_starts=[0, *itertools.accumulate(len(d) for d in chat_docs[:-1])], val=val,
                val_chat=[t for d in encode([corpus.render_chat(c) for c in val_convs]) for t in d][:len(val)],
                excerpt=excerpt, excerpt_is_test_data=EXCERPT.is_file() and EXCERPT.read_text() == excerpt_text)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to 10% of peak


def train(args) -> int:
    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    amp = device.type == "cuda"
    text = args.corpus.read_text()
    train_text, val_text = corpus.split_corpus(text, args.val_fraction)
    tok = corpus.train_tokenizer(train_text, args.vocab_size)
    data = prepare_data(tok, train_text, val_text, args.seed)
    bos, eom, newline = (tok.token_to_id(t) for t in (corpus.BOS, corpus.EOM, "\n"))
    print(f"corpus {len(text)} chars: train {len(data.train)} tokens + {len(data.chat)} chat tokens "
          f"({len(data.chat_starts)} dialogues), validation {len(data.val)} tokens; vocab {tok.get_vocab_size()}",
          flush=True)

    cfg = make_config(args.size, tok.get_vocab_size(), eom, args.seq_len)
    model = JambaForCausalLM(cfg)
    if amp:  # the reference scan's memory cap is for long prompts; one block per window here
        model.kernel_options = kernels.KernelOptions(tiles={"reference_scan_block": 1 << 30})
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    estimate = 2 * n_params + len(tok.to_str().encode()) + 20_000
    print(f"model: {n_params / 1e6:.2f}M parameters, about {estimate / 1e6:.2f} MB on disk", flush=True)
    if estimate > SIZE_LIMIT:
        print(f"error: the model would not fit the {SIZE_LIMIT / 1e6:.0f} MB budget", file=sys.stderr)
        return 1
    model.to(device).train()
    router_logits = add_training_hooks(model, args.dropout)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n and "conv1d" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n and "conv1d" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    batches = Batches(data.train, data.chat, data.chat_starts, newline, bos, args.seq_len, args.batch_size,
                      args.chat_fraction, device, args.seed)
    dev_ids = data.val[len(data.val) // 2:]  # checkpoint choice looks only at the second half of validation

    def evaluate() -> float:
        router_logits.clear()
        loss = mean_nll(model, dev_ids, bos, args.seq_len, batch_size=args.batch_size, autocast=amp)
        router_logits.clear()
        return loss

    budget = args.max_minutes * 60
    t0 = time.time()
    total, warmup, eval_every = None, 100, 1
    best = (float("inf"), -1, None)
    recent: list[float] = []
    step = 0
    while total is None or step < total:
        if step == CALIBRATION_START:
            t_calib = time.time()
        if step == CALIBRATION_START + CALIBRATION_STEPS:
            step_time = (time.time() - t_calib) / CALIBRATION_STEPS
            best = (evaluate(), step, None)
            t_eval = time.time()
            evaluate()  # timed the second time, for the same reason as the steps
            eval_time = time.time() - t_eval
            left = budget - (time.time() - t0) - args.evals * eval_time
            total = max(step + 1, step + int(left / step_time))
            warmup = min(warmup, max(1, total // 10))
            eval_every = max(1, (total - step) // args.evals)
            print(f"{step_time * 1000:.0f} ms/step, eval {eval_time:.1f}s: training {total} steps", flush=True)
        lr = lr_at(step, total or 10 ** 9, warmup, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batches.next()
        router_logits.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss = lm_loss + args.aux_coef * balance_loss(router_logits, cfg.num_experts_per_tok)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [lm_loss.item()])[-50:]
        step += 1
        if total is not None and (step % eval_every == 0 or step == total):
            val = evaluate()
            if val < best[0]:
                best = (val, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            print(f"step {step}/{total}  loss {sum(recent) / len(recent):.3f}  val {val:.3f} "
                  f"(best {best[0]:.3f} @ {best[1]})  lr {lr:.2e}  {time.time() - t0:.0f}s", flush=True)
        elif step % 10 == 0 or step <= 3:
            print(f"step {step}  loss {sum(recent) / len(recent):.3f}  lr {lr:.2e}  {time.time() - t0:.0f}s",
                  flush=True)
        if step != total and time.time() - t0 > budget * 1.05:  # slower than the calibration predicted
            print("time budget spent; stopping early", flush=True)
            break
    train_seconds = time.time() - t0
    if best[2] is not None:
        model.load_state_dict(best[2])
    return save(args, model, tok, {
        "steps": step, "best_step": best[1], "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(sum(recent) / len(recent), 4), "tokens_seen": step * args.batch_size * args.seq_len,
        "train_tokens": len(data.train), "chat_tokens": len(data.chat), "parameters": n_params,
    }, data, text, t_start)


def save(args, model, tok, figures: dict, data: Data, text: str, t_start: float) -> int:
    """Write the checkpoint to a temporary directory, measure it as saved (bf16 weights, read back with
    our loader in fp32), then move it into place: a failed run leaves no half-written model."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        tmp.chmod(0o755)
        write_checkpoint(tmp, model, tok)
        saved, _ = load(tmp, dtype="fp32", device=args.device)
        bos, window, vocab = tok.token_to_id(corpus.BOS), args.seq_len, tok.get_vocab_size()
        val_loss = mean_nll(saved, data.val, bos, window)
        excerpt_loss = mean_nll(saved, data.excerpt, bos, window)
        chat_loss = mean_nll(saved, data.val_chat, bos, window) if data.val_chat else None
        info = {
            "corpus": args.corpus.name, "corpus_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "val_fraction": args.val_fraction, "seed": args.seed, "size": args.size, "seq_len": window,
            "batch_size": args.batch_size, "peak_lr": args.lr, "dropout": args.dropout,
            "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device,
            "torch": torch.__version__, **figures,
            "notes": "final_train_loss: mean LM loss of the last 50 steps (training mode, text and dialogue rows); "
                     "the saved weights are those with the best loss on the second half of the validation "
                     "split; figures below are of the saved bf16 weights computed in fp32, windows of seq_len",
            "validation": {"tokens": len(data.val), "loss": round(val_loss, 4),
                           "perplexity": round(math.exp(val_loss), 2),
                           "unigram_perplexity": round(unigram_perplexity(data.val, vocab, data.train), 1),
                           "chat_loss": None if chat_loss is None else round(chat_loss, 4)},
            "excerpt": {"file": str(EXCERPT.relative_to(ROOT)) if data.excerpt_is_test_data else None,
                        "tokens": len(data.excerpt),
                        "perplexity": round(math.exp(excerpt_loss), 2),
                        "unigram_perplexity": round(unigram_perplexity(data.excerpt, vocab, data.train), 1),
                        "best_unigram_perplexity": round(unigram_perplexity(data.excerpt, vocab), 1)},
        }
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        if size > SIZE_LIMIT:
            print(f"error: the checkpoint is {size} bytes, over the {SIZE_LIMIT} budget", file=sys.stderr)
            return 1
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    v = info["validation"]
    print(f"saved {args.out} ({size} bytes) in {time.time() - t_start:.0f}s: validation perplexity "
          f"{v['perplexity']} (unigram {v['unigram_perplexity']}), chat loss {v['chat_loss']}, "
          f"excerpt perplexity {info['excerpt']['perplexity']}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the small Jamba bundled with jamba-cli.")
    parser.add_argument("corpus", nargs="?", type=Path, default=corpus.default_corpus(),
                        help="plain-text corpus (default: tinyshakespeare.txt in tools/data or shared/data)")
    parser.add_argument("--out", type=Path, default=ROOT / "jamba_cli" / "assets" / BUNDLED_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-minutes", type=float, default=4.0, help="training time budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="default", help="'smoke' for quick CPU checks")
    parser.add_argument("--seq-len", type=int, default=1024, help="training window; the model's context")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--aux-coef", type=float, default=0.01, help="weight of the MoE load-balancing loss")
    parser.add_argument("--chat-fraction", type=float, default=0.3, help="share of each batch from dialogues")
    parser.add_argument("--evals", type=int, default=20, help="validation checks during the run")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--val-fraction", type=float, default=corpus.VAL_FRACTION)
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        print(f"error: no corpus file at {args.corpus}", file=sys.stderr)
        return 2
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
