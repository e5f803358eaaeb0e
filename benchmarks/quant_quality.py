"""How far 8-bit and 4-bit weights move a model from fp32 on the CPU: bitsandbytes' LLM.int8 ("8bit") and
nf4 ("4bit"), and our own 8-bit layers ("int8", "fp8": weight-only, one scale per output row). Max, mean
and relative |Δ| of the logits and perplexity on held-out text.

    python benchmarks/quant_quality.py CHECKPOINT_DIR --out benchmarks/results/quant_quality.json
    python benchmarks/quant_quality.py --fitted-lm --out /tmp/q.json   # the tests' model (tests/conftest.py)

With a checkpoint, the held-out text is the end of --text (tests/data/shakespeare_val.txt, which the
bundled model never saw), tokenized by the checkpoint's tokenizer, in --windows windows of --window tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jamba_cli.loader import load  # noqa: E402
from jamba_cli.tokenizer import load_tokenizer  # noqa: E402

MODES = {"bf16": dict(dtype="bf16"), "8bit": dict(dtype="fp32", load_in_8bit=True),
         "8bit-bf16": dict(dtype="bf16", load_in_8bit=True), "4bit": dict(dtype="fp32", load_in_4bit=True),
         "4bit-bf16": dict(dtype="bf16", load_in_4bit=True), "int8": dict(dtype="fp32", quant="int8"),
         "int8-bf16": dict(dtype="bf16", quant="int8"), "fp8": dict(dtype="fp32", quant="fp8")}


def held_out(directory: Path, text_path: Path, n_windows: int, window: int) -> torch.Tensor:
    text = text_path.read_text()
    ids = load_tokenizer(directory).encode(text[-20 * n_windows * window:], add_special_tokens=False)
    ids = ids[-n_windows * window:]
    if len(ids) < n_windows * window:
        raise SystemExit(f"{text_path} holds too little text for {n_windows} windows of {window} tokens")
    return torch.tensor(ids).view(n_windows, window)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", type=Path)
    p.add_argument("--fitted-lm", action="store_true", help="build and use the tests' fitted model")
    p.add_argument("--text", type=Path, default=ROOT / "tests" / "data" / "shakespeare_val.txt")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.fitted_lm:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_fitted_lm, build_tokenizer

        tmp = Path(tempfile.mkdtemp())
        build_tokenizer(tmp)
        args.checkpoint = tmp / "fitted"
        ids = build_fitted_lm(args.checkpoint, tmp)
    elif args.checkpoint is None:
        p.error("give a checkpoint directory or --fitted-lm")
    else:
        ids = held_out(args.checkpoint, args.text, args.windows, args.window)

    def run(**kwargs) -> torch.Tensor:
        model, _ = load(args.checkpoint, device="cpu", **kwargs)
        with torch.no_grad():
            return model(ids[:, :-1]).float()

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item())

    ref = run(dtype="fp32")
    from importlib.metadata import version

    report = {"checkpoint": "fitted-lm (tests/conftest.py)" if args.fitted_lm else str(args.checkpoint),
              "tokens": ids.numel(), "torch": torch.__version__, "bitsandbytes": version("bitsandbytes"),
              "fp32_perplexity": round(ppl(ref), 4), "modes": {}}
    for mode, kwargs in MODES.items():
        logits = run(**kwargs)
        diff = (logits - ref).abs()
        report["modes"][mode] = {
            "perplexity": round(ppl(logits), 4),
            "perplexity_delta_pct": round(100 * (ppl(logits) / ppl(ref) - 1), 3),
            "max_abs_logit_diff": round(diff.max().item(), 4),
            "mean_abs_logit_diff": round(diff.mean().item(), 5),
            "mean_abs_logit": round(ref.abs().mean().item(), 4),
            "relative_logit_error": round(((logits - ref).norm() / ref.norm()).item(), 5),
        }
        print(f"{mode:>10}: ppl {report['modes'][mode]['perplexity']:9.3f} "
              f"({report['modes'][mode]['perplexity_delta_pct']:+.2f}% vs fp32 {report['fp32_perplexity']:.3f})  "
              f"max|Δlogit| {report['modes'][mode]['max_abs_logit_diff']:.4f}  "
              f"mean|Δlogit| {report['modes'][mode]['mean_abs_logit_diff']:.5f}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
