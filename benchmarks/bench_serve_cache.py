"""Time to first token of `jamba serve`'s engine (jamba_cli/engine.py) with its prefix cache, against the same
turns computed cold.

CPU (the issue's acceptance): a 10-turn conversation over a ~4K-token document (the start of
tests/data/shakespeare_val.txt) with the bundled model, through `Engine.stream` and the chat template. Per
turn: prompt tokens, cached_tokens, time to first token, and the same turn cold (the engine cleared first),
with whether the replies are the same and the largest difference of the logits each token was sampled from.
Then PASS/FAIL lines: turns 2-10 each restore at least the previous turn's prompt; turn 10's time to first
token is at most 1.5x turn 2's; warm and cold replies and logits agree.

    python benchmarks/bench_serve_cache.py                       # -> benchmarks/results/serve_cache_cpu.json

GPU (random weights built in GPU memory, benchmarks/common.py): a first turn of `--prompt` tokens (the document
repeated), then a follow-up turn; its time to first token with the cache and cold.

    python benchmarks/bench_serve_cache.py --shape mini --random --prompt 65536 --out serve_cache_h100.json
    python benchmarks/bench_serve_cache.py --shape tiny --random --prompt 2048 --out /tmp/smoke.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from jamba_cli.engine import Engine  # noqa: E402
from jamba_cli.sample import SamplingParams  # noqa: E402

DOCUMENT = ROOT / "tests" / "data" / "shakespeare_val.txt"
QUESTIONS = ["Who speaks first in this scene?", "What does he ask for?", "How does the other answer him?",
             "Is anyone angry?", "Who enters next?", "What news does he bring?", "What is decided?",
             "Who disagrees?", "How does the scene end?", "Say it again in one line."]


def document(tokenizer, tokens: int) -> str:
    """The first `tokens` tokens of the Shakespeare excerpt as text, repeated as needed."""
    text = DOCUMENT.read_text()
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    return tokenizer.decode(ids)


def boundaries(tokenizer, messages: list[dict]) -> list[int]:
    """Where each message ends in the rendered conversation (what `jamba serve` passes)."""
    return [len(tokenizer.encode_chat(messages[:i + 1])) for i in range(len(messages))]


def turn(engine: Engine, messages: list[dict], params: SamplingParams) -> tuple[dict, str, torch.Tensor]:
    """Stream one turn: (its figures, the reply, the logits each token was sampled from)."""
    ids = engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
    logits, chunks, first = [], [], None

    def keep(module, args, out):  # not inside a CUDA graph's capture, whose replays call no hook
        if not (out.is_cuda and torch.cuda.is_current_stream_capturing()):
            logits.append(out[0, -1].float().cpu())

    hook = engine.model.lm_head.register_forward_hook(keep)
    began = time.perf_counter()
    try:
        for chunk in engine.stream(ids, params, boundaries=boundaries(engine.tokenizer, messages)):
            first = len(logits) if first is None else first
            chunks.append(chunk)
    finally:
        hook.remove()
    wall = time.perf_counter() - began
    sampled = [c.token for c in chunks if c.token is not None]
    stats = chunks[-1].stats
    row = {"prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.cached_tokens, "ttft_s": stats.ttft_s,
           "generation_tokens": stats.generation_tokens, "wall_s": wall, "tokens": sampled}
    # the last prompt position's logits, then each decode step's where the steps run eagerly (on a GPU they
    # replay a CUDA graph: the first token's logits alone)
    return row, "".join(c.text for c in chunks), torch.stack(logits[first - 1:])


def conversation(engine: Engine, doc: str, turns: int, params: SamplingParams, cold: bool) -> list[dict]:
    """`turns` turns over `doc`, each also run cold (after `engine.clear()`) when `cold`; the next turn then
    starts from what the cold run left, which is the same state (the same tokens)."""
    messages, rows = [], []
    for i, question in enumerate(QUESTIONS[:turns]):
        messages.append({"role": "user", "content": (doc + "\n\n" + question) if i == 0 else question})
        warm, reply, warm_logits = turn(engine, messages, params)
        row = {"turn": i + 1, **{k: warm[k] for k in ("prompt_tokens", "cached_tokens", "ttft_s", "wall_s")}}
        if cold:
            engine.clear()
            cold_row, cold_reply, cold_logits = turn(engine, messages, params)
            row.update(cold_ttft_s=cold_row["ttft_s"], cold_cached_tokens=cold_row["cached_tokens"],
                       same_reply=cold_row["tokens"] == warm["tokens"] and cold_reply == reply,
                       max_rel_logit_diff=float((warm_logits - cold_logits).abs().max() / cold_logits.abs().max())
                       if warm_logits.shape == cold_logits.shape else None)
        rows.append(row)
        print(json.dumps(row), flush=True)
        messages.append({"role": "assistant", "content": reply})
    return rows


def checks(rows: list[dict], rtol: float) -> list[tuple[str, bool]]:
    out = []
    for previous, row in zip(rows, rows[1:]):
        out.append((f"turn {row['turn']}: cached_tokens {row['cached_tokens']} >= previous prompt "
                    f"{previous['prompt_tokens']}", row["cached_tokens"] >= previous["prompt_tokens"]))
    if len(rows) >= 10:
        t2, t10 = rows[1]["ttft_s"], rows[9]["ttft_s"]
        out.append((f"time to first token, turn 10 {t10 * 1e3:.1f} ms <= 1.5 x turn 2 {t2 * 1e3:.1f} ms",
                    t10 <= 1.5 * t2))
    if rows and "same_reply" in rows[0]:
        out.append(("every turn's reply equals the cold run's", all(r["same_reply"] for r in rows)))
        diffs = [r["max_rel_logit_diff"] for r in rows]
        out.append((f"logits equal the cold run's within {rtol:g} of their scale (largest difference "
                    f"{max(d or 0 for d in diffs):.2e})", all(d is not None and d <= rtol for d in diffs)))
    return out


def cpu_conversation(args) -> dict:
    import jamba_cli

    model, tokenizer = jamba_cli.load(dtype="fp32", device="cpu")
    engine = Engine(model, tokenizer, context_size=args.context)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    doc = document(tokenizer, args.doc_tokens)
    conversation(engine, document(tokenizer, 256), 2, params, cold=False)  # warm-up: first calls, allocations
    engine.clear()
    rows = conversation(engine, doc, args.turns, params, cold=True)
    stats = engine.stats()
    # the conversation again: each time is the median of the passes (a shared CPU's noise is as large as a
    # warm turn's whole time)
    passes = [rows]
    for _ in range(args.repeat - 1):
        engine.clear()
        passes.append(conversation(engine, doc, args.turns, params, cold=True))
    for i, row in enumerate(rows):
        for key in ("ttft_s", "cold_ttft_s"):
            row[key + "_passes"] = [p[i][key] for p in passes]
            row[key] = statistics.median(row[key + "_passes"])
        row["same_reply"] = all(p[i]["same_reply"] for p in passes)
        row["max_rel_logit_diff"] = max(p[i]["max_rel_logit_diff"] for p in passes)
    return {"model": "bundled jamba-tiny-shakespeare, fp32", "device": "cpu", "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "doc_tokens": args.doc_tokens,
            "max_tokens": args.max_tokens, "passes": args.repeat, "turns": rows, "engine_after_first_pass": stats}


def random_follow_up(args) -> dict:
    from common import build, shape_config

    from jamba_cli.config import JambaConfig
    from jamba_cli.loader import bundled_model_dir
    from jamba_cli.model import JambaForCausalLM
    from jamba_cli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(bundled_model_dir())  # its ids fit every shape's vocabulary (set below)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = shape_config(args.shape, args.layers)
    cfg["vocab_size"] = max(cfg["vocab_size"], tokenizer.vocab_size)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(JambaForCausalLM, JambaConfig.from_dict(cfg), dtype, device)
    engine = Engine(model, tokenizer, context_size=args.prompt + 1024)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # warm-up: Triton's compiles and the CUDA graph's capture stay out of the timings
    conversation(engine, document(tokenizer, min(1024, args.prompt // 4)), 2, params, cold=False)
    engine.clear()
    sync()
    rows = conversation(engine, document(tokenizer, args.prompt), 2, params, cold=True)
    first, follow = rows
    out = {"shape": args.shape, "layers": cfg["num_hidden_layers"], "dtype": str(dtype).removeprefix("torch."),
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "max_tokens": args.max_tokens,
           "first_turn": first, "follow_up": follow,
           "follow_up_ttft_s": {"cached": follow["ttft_s"], "cold": follow["cold_ttft_s"]},
           "speedup": follow["cold_ttft_s"] / follow["ttft_s"], "engine": engine.stats()}
    if device == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="JSON to write (default: benchmarks/results/serve_cache_cpu.json "
                                             "for the CPU conversation)")
    ap.add_argument("--random", action="store_true", help="random weights of --shape instead of the bundled model")
    ap.add_argument("--shape", default="mini", help="with --random: a shape of benchmarks/common.py")
    ap.add_argument("--layers", type=int, help="with --random: fewer layers (the schedule is kept)")
    ap.add_argument("--prompt", type=int, default=65536, help="with --random: tokens of the first turn")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--doc-tokens", type=int, default=4000)
    ap.add_argument("--context", type=int, default=8192, help="context size of the CPU conversation")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per reply")
    ap.add_argument("--repeat", type=int, default=3, help="passes of the CPU conversation (median times)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random:
        result = random_follow_up(args)
        print(f"follow-up turn after {result['first_turn']['prompt_tokens']} tokens: time to first token "
              f"{result['follow_up']['ttft_s'] * 1e3:.1f} ms cached ({result['follow_up']['cached_tokens']} "
              f"restored), {result['follow_up']['cold_ttft_s'] * 1e3:.1f} ms cold")
        rows = [result["first_turn"], result["follow_up"]]
    else:
        result = cpu_conversation(args)
        rows = result["turns"]
        print(f"\n{'turn':>4} {'prompt':>7} {'cached':>7} {'ttft ms':>8} {'cold ms':>8}")
        for r in rows:
            print(f"{r['turn']:>4} {r['prompt_tokens']:>7} {r['cached_tokens']:>7} {r['ttft_s'] * 1e3:>8.1f} "
                  f"{r['cold_ttft_s'] * 1e3:>8.1f}")
    # the tests' tolerances (conftest.RTOL): bf16 prefills chunked otherwise round otherwise
    rtol = 3e-2 if result.get("dtype") == "bfloat16" else 1e-4
    result["checks"] = [{"check": what, "pass": ok} for what, ok in checks(rows, rtol)]
    for what, ok in checks(rows, rtol):
        print(("PASS " if ok else "FAIL ") + what)
    out = args.out or (None if args.random else ROOT / "benchmarks" / "results" / "serve_cache_cpu.json")
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
