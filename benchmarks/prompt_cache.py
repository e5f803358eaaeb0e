"""How much `--prompt-cache` saves: time to first token for a long prompt, without a cache file, when the
file is written, when it is reused as is, and when a longer prompt reuses it as a prefix.

    PYTHONPATH=. python benchmarks/prompt_cache.py [--tokens 4000] [--hidden 512] [--layers 8]

Builds a random Jamba checkpoint of the given size with transformers (a test dependency) and the tests'
tiny tokenizer, then times `stream_generate(..., prompt_cache=FILE)` on CPU (or CUDA when available).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000, help="prompt length in tokens")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

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

    def ttft(prompt, cache_file=None):
        chunk = next(iter(stream_generate(model, tok, prompt, max_tokens=1, prompt_cache=cache_file)))
        return chunk.stats.ttft_s, chunk.stats.cached_tokens

    rows = []
    for name, run in [("no cache file", lambda i: ttft(ids)),
                      ("first run, writes the file", lambda i: ttft(ids, work / f"c{i}.cache")),
                      ("same prompt, file reused", lambda i: ttft(ids, work / f"c{i}.cache")),
                      ("prompt + 9 tokens, file reused", lambda i: ttft(more, work / f"c{i}.cache"))]:
        times = [run(i) for i in range(args.repeat)]
        rows.append((name, statistics.median(t for t, _ in times), times[0][1]))
    base = rows[0][1]
    print(f"model: hidden {args.hidden}, {args.layers} layers, {model.dtype}, {model.device}; "
          f"prompt {len(ids)} tokens; median of {args.repeat}")
    print(f"{'case':34} {'time to first token':>20} {'cached tokens':>14} {'speed-up':>9}")
    for name, t, cached in rows:
        print(f"{name:34} {t * 1000:17.1f} ms {cached:14d} {base / t:8.1f}x")


if __name__ == "__main__":
    main()
