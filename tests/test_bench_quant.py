"""The GPU benchmark script runs end to end on the CPU with a tiny shape (so a run on a GPU cannot fail on
something a CPU could have caught)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quant_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quant.py"), str(out), "--shape", "tiny",
                    "--prompt-len", "8", "--new-tokens", "2"], check=True, env=os.environ, capture_output=True)
    report = json.loads(out.read_text())
    results = {r["mode"]: r for r in report["results"]}
    assert list(results) == ["bf16", "int8", "fp8", "bnb8", "nf4"]
    sizes = [results[m]["weights_bytes"]["cpu"] for m in ("bf16", "int8", "nf4")]
    assert sizes[0] > sizes[1] > sizes[2]
    assert results["int8"]["weights_bytes"] == results["fp8"]["weights_bytes"]
    assert results["int8"]["weights_by_dtype"]["int8"] == results["fp8"]["weights_by_dtype"]["float8_e4m3fn"] > 0
    assert results["int8"]["bytes_read_per_token"] < results["bf16"]["bytes_read_per_token"]
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["load_s"] > 0 for r in results.values())
    # same seeded weights in every mode: quantized logits stay near bf16's, but are not identical
    for mode in ("int8", "fp8", "bnb8"):
        assert 0 < results[mode]["max_abs_logit_diff_vs_first"] < 0.5
        assert 0.99 < results[mode]["logits_cosine_vs_first"] < 1
