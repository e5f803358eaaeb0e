"""Perplexity of a Jamba checkpoint on held-out text, next to the best unigram model's on the same tokens.

    python tools/eval_ppl.py                                   # bundled model, tests/data excerpt
    python tools/eval_ppl.py --corpus /work/shared/data/tinyshakespeare.txt   # the whole validation split

The text is cut into windows of `--window` tokens (the training length); each window is read from a
fresh start (BOS, empty cache) and every one of its tokens is scored.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT / "tests" / "data" / "shakespeare_val.txt"


@torch.no_grad()
def mean_nll(model, ids: list[int], bos_id: int, window: int, batch_size: int = 16,
             autocast: bool = False) -> float:
    """Mean negative log-likelihood (nats per token) of `ids`, scored window by window."""
    device = model.device
    chunks = [ids[i:i + window] for i in range(0, len(ids), window)]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    full = [c for c in chunks if len(c) == window]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[c] for c in chunks if len(c) != window]  # a shorter last window on its own
    for group in groups:
        rows = torch.tensor([[bos_id] + c for c in group], device=device)  # (B, W+1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(rows[:, :-1])
        nll = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += rows[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_perplexity(eval_ids: list[int], vocab_size: int, train_ids: list[int] | None = None) -> float:
    """Perplexity of a unigram model: add-one counts from `train_ids`, or, without them, the frequencies
    of `eval_ids` themselves (the best any unigram model can do on that text)."""
    if train_ids is None:
        counts, total, smooth = Counter(eval_ids), len(eval_ids), 0
    else:
        counts, total, smooth = Counter(train_ids), len(train_ids), 1
    denom = total + smooth * vocab_size
    nll = -sum(math.log((counts[t] + smooth) / denom) for t in eval_ids) / len(eval_ids)
    return math.exp(nll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: bundled)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, default=None, help=f"held-out text file (default: {DEFAULT_TEXT})")
    src.add_argument("--corpus", type=Path, default=None,
                     help="whole corpus: score the validation split train_tiny.py held out")
    parser.add_argument("--window", type=int, default=None, help="tokens per window (default: training length)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from jamba_cli.loader import bundled_model_dir, load

    directory = args.model or bundled_model_dir()
    model, tok = load(directory, dtype="fp32", device=args.device)
    info_path = directory / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    window = args.window or info.get("seq_len", 512)
    if args.corpus is not None:
        from tiny_corpus import split_corpus

        train_text, text = split_corpus(args.corpus.read_text(), info.get("val_fraction", 0.1))
        train_ids = tok.encode(train_text, add_special_tokens=False)
    else:
        text, train_ids = (args.text or DEFAULT_TEXT).read_text(), None
    ids = tok.encode(text, add_special_tokens=False)
    ppl = math.exp(mean_nll(model, ids, tok.bos_token_id, window))
    uni = unigram_perplexity(ids, tok.vocab_size, train_ids)
    kind = "unigram fit on the training split" if train_ids is not None else "best unigram fit on this text"
    print(f"perplexity {ppl:.2f} over {len(ids)} tokens ({len(text.encode())} bytes, window {window}); "
          f"{kind}: {uni:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
