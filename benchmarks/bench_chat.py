"""Decode speed of `jamba chat` turns on one GPU: a static cache and one CUDA graph for all replies, against
a chat on a growing cache decoded eagerly.

    python benchmarks/bench_chat.py --out chat.json [--shape mini] [--turns 3] [--tokens 128]

Builds random bf16 weights of the chosen shape in GPU memory (see common.py) and talks to them with the
bundled model's tokenizer and chat template (its token ids all exist in the shape's vocabulary). Each turn
is timed from the chunks' own statistics: prompt tokens per second and tokens per second after the first;
the first turn of the graph chat also captures the graph (and, on a fresh machine, compiles Triton
kernels), so its time to first token is reported apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build, shape_config  # noqa: E402

from jamba_cli.cache import make_cache  # noqa: E402
from jamba_cli.chat import ChatSession  # noqa: E402
from jamba_cli.config import JambaConfig  # noqa: E402
from jamba_cli.loader import bundled_model_dir  # noqa: E402
from jamba_cli.model import JambaForCausalLM  # noqa: E402
from jamba_cli.sample import SamplingParams  # noqa: E402
from jamba_cli.tokenizer import load_tokenizer  # noqa: E402

QUESTIONS = ["Tell me of the king.", "And what said the queen?", "Who stood by the gate?", "What came next?",
             "How did it end?"]


def turns(model, tokenizer, static: bool, n_turns: int, tokens: int, context: int) -> list[dict]:
    s = ChatSession(model, tokenizer, name="bench", context_size=context,
                    sampling=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    if not static:
        s.cache = make_cache(model.config, 1, dtype=model.dtype, device="cuda")
    out = []
    for q in QUESTIONS[:n_turns]:
        t0 = time.perf_counter()
        last = None
        for last in s.ask(q, lambda: False):
            pass
        out.append({**asdict(last.stats), "wall_s": time.perf_counter() - t0})
        print(("graph" if static else "eager"), out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="mini")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per reply")
    ap.add_argument("--context", type=int, default=8192, help="the chat's context size (the static cache's)")
    args = ap.parse_args()
    cfg = JambaConfig.from_dict(shape_config(args.shape))
    model = build(JambaForCausalLM, cfg, torch.bfloat16, "cuda")
    tokenizer = load_tokenizer(bundled_model_dir())
    res = {"shape": args.shape, "device": torch.cuda.get_device_name(), "tokens_per_reply": args.tokens,
           "context": args.context}
    for static in (True, False):
        res["graph" if static else "eager"] = turns(model, tokenizer, static, args.turns, args.tokens, args.context)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"\n{res['device']}, shape {args.shape}, {args.tokens} tokens per reply: decode tok/s per turn")
    for name in ("graph", "eager"):
        print(f"{name:6s}", "  ".join(f"{t['generation_tps']:.1f}" for t in res[name]),
              f"   (time to first token, turn 1: {res[name][0]['ttft_s']:.2f} s)")


if __name__ == "__main__":
    main()
