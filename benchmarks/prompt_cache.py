"""How much `--prompt-cache` saves: time to first token for a long prompt, without a cache file, when the
file is written, when it is reused as is, when a longer prompt reuses it as a prefix, and when the same
document comes with another question (the README's example: only the question is computed). With
--fingerprint, what the model fingerprint that a cache file records costs for a model of a given size.

    PYTHONPATH=. python benchmarks/prompt_cache.py [--tokens 4000] [--hidden 512] [--layers 8]
    PYTHONPATH=. python benchmarks/prompt_cache.py --fingerprint [--shape 3b --fp-layers 4 --dtype bf16]

Builds a random Jamba checkpoint of the given size with transformers (a test dependency) and the tests'
tiny tokenizer, then times `stream_generate(..., prompt_cache=FILE)` on CPU (or CUDA when available).
The fingerprint is timed on random weights built in memory (common.py), on CUDA when available, and
beside it a SHA-256 of the same bytes (what hashing the files would cost at the least).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000, help="prompt length in tokens")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fingerprint", action="store_true", help="time the model fingerprint instead")
    ap.add_argument("--shape", default="3b", help="with --fingerprint: a shape of common.py")
    ap.add_argument("--fp-layers", type=int, default=4, help="with --fingerprint: layers to build")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--device", default=None, help="with --fingerprint: default cuda when available, else cpu")
    ap.add_argument("--skip-sha", action="store_true", help="with --fingerprint: no SHA-256 for comparison")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    result = fingerprint_cost(args) if args.fingerprint else time_to_first_token(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def time_to_first_token(args) -> dict:
    from conftest import build_tokenizer, make_hf_model, save_checkpoint
    from jamba_cli.generation import stream_generate
    from jamba_cli.loader import load

    work = Path(tempfile.mkdtemp(prefix="jamba-bench-"))
    (work / "tok").mkdir()
    build_tokenizer(work / "tok")
    shape = dict(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=8, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2,
                 expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16)
    ckpt = save_checkpoint(make_hf_model(**shape), work / "model", work / "tok")
    model, tok = load(ckpt)
    ids = (tok.encode("To be, or not to be, that is the question. " * (args.tokens // 8)))[:args.tokens]
    more = ids + tok.encode(" Now is the winter of our discontent.", add_special_tokens=False)
    # the README's example: a document (as `-f` reads it, with its newline), then a question, as chat messages
    document = tok.decode(ids[1:]) + "\n"
    questions = ["How do I reset the device?", "What does the red light mean?"]

    def ask(question):
        return [{"role": "user", "content": document + "\n\n" + question}]

    def ttft(prompt, cache_file=None, parts=None):
        chunk = next(iter(stream_generate(model, tok, prompt, max_tokens=1, prompt_cache=cache_file,
                                          prompt_parts=parts)))
        return chunk.stats.ttft_s, chunk.stats.cached_tokens

    ttft(ids[:64], work / "warm.cache")  # warm-up: imports and first calls stay out of the timings
    ttft(ids[:80], work / "warm.cache")
    rows = []
    for name, run in [("no cache file", lambda i: ttft(ids)),
                      ("first run, writes the file", lambda i: ttft(ids, work / f"c{i}.cache")),
                      ("same prompt, file reused", lambda i: ttft(ids, work / f"c{i}.cache")),
                      ("prompt + 9 tokens, file reused", lambda i: ttft(more, work / f"c{i}.cache")),
                      ("document + question, no file", lambda i: ttft(ask(questions[0]))),
                      ("document + question, writes", lambda i: ttft(ask(questions[0]), work / f"d{i}.cache",
                                                                     [document, questions[0]])),
                      ("same document, another question", lambda i: ttft(ask(questions[1]), work / f"d{i}.cache",
                                                                          [document, questions[1]]))]:
        times = [run(i) for i in range(args.repeat)]
        rows.append((name, statistics.median(t for t, _ in times), times[0][1]))
    base = rows[0][1]
    print(f"model: hidden {args.hidden}, {args.layers} layers, {model.dtype}, {model.device}; "
          f"prompt {len(ids)} tokens; median of {args.repeat}")
    print(f"{'case':34} {'time to first token':>20} {'cached tokens':>14} {'speed-up':>9}")
    for name, t, cached in rows:
        print(f"{name:34} {t * 1000:17.1f} ms {cached:14d} {base / t:8.1f}x")
    return {"model": {"hidden": args.hidden, "layers": args.layers, "dtype": str(model.dtype),
                      "device": str(model.device)}, "prompt_tokens": len(ids), "repeat": args.repeat,
            "rows": [{"case": n, "ttft_s": round(t, 4), "cached_tokens": c} for n, t, c in rows]}


def fingerprint_cost(args) -> dict:
    import torch

    from common import build, shape_config
    from jamba_cli import fingerprint
    from jamba_cli.config import JambaConfig
    from jamba_cli.model import JambaForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    config = JambaConfig(**shape_config(args.shape, args.fp_layers))
    model = build(JambaForCausalLM, config, dtype, device)
    weights = {id(p): p for p in model.parameters()}.values()
    size = sum(p.numel() * p.element_size() for p in weights)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = timed(lambda: fingerprint.fingerprint(model))
    again = timed(lambda: fingerprint.fingerprint(model))  # memoised per model
    fingerprint._fingerprints.clear()
    second = timed(lambda: fingerprint.fingerprint(model))  # coefficients made, nothing memoised

    def sha256():
        h = hashlib.sha256()
        for p in weights:
            t = p.detach().cpu() if p.device.type != "cpu" else p.detach()
            n = t.numel() * t.element_size()
            h.update(memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B"))
    sha = None if args.skip_sha else timed(sha256)
    print(f"model: shape {args.shape}, {args.fp_layers} layers, {dtype}, {device}: {size / 2**30:.2f} GiB of weights")
    print(f"fingerprint: {first:.3f} s the first time, {second:.3f} s again, {again * 1000:.3f} ms memoised; "
          f"{size / second / 2**30:.2f} GiB/s")
    if sha is not None:
        print(f"SHA-256 of the same bytes{' (copied to the CPU)' if device.type != 'cpu' else ''}: {sha:.3f} s")
    return {"shape": args.shape, "layers": args.fp_layers, "dtype": str(dtype), "device": str(device),
            "weights_bytes": size, "fingerprint_first_s": round(first, 4), "fingerprint_s": round(second, 4),
            "memoised_s": round(again, 6), "sha256_s": None if sha is None else round(sha, 4)}


if __name__ == "__main__":
    main()
