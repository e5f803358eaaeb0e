"""Prompt GEMMs with 8-bit weights (jamba_cli/kernels/triton/gemm8.py) against bf16 at Jamba-Mini shape.

    python benchmarks/bench_gemm8.py gemm8.json            # a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/bench_gemm8.py --small out.json   # a smoke test on a CPU

Cases: the routed experts' gate_up (16, 2I, H) and down (16, H, I) over M = 16K tokens x 2 experts spread
evenly over the 16 experts (torch._grouped_mm in bf16 vs our grouped kernel), and a dense (2I, H) linear
over 16K tokens (F.linear vs ours). Ours runs with int8 weights and, on sm89+, float8 e4m3 weights, over
every tile of gemm8.TILES. Each timing is the median of 20 runs after warm-up, between CUDA events; the
JSON has TFLOP/s, the ratio to bf16 and the relative error against the dequantized weights in bf16 (on the
first group's rows) per case and tile. Weights are random and built on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from jamba_cli.kernels.triton import gemm8

H, I, X, TOKENS, TOP_K = 4096, 14336, 16, 16384, 2
BF = torch.bfloat16


def timed(fn, device: str, reps: int, warmup: int = 3) -> float:
    """Median ms of fn over `reps` runs after `warmup` (CUDA events on a GPU, wall clock on a CPU)."""
    for _ in range(warmup if reps > 1 else 1):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def quantized(shape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 8-bit weights and per-row scales like a quantized normal(0.02) matrix, built on `device`."""
    if dtype == torch.int8:
        w = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
        scale = torch.full(shape[:-1], 0.02 * 3 / 127, dtype=torch.float32, device=device)
    else:
        w = torch.empty(shape, dtype=BF, device=device).normal_(0.0, 64.0).clamp_(-448, 448).to(dtype)
        scale = torch.full(shape[:-1], 0.02 / 64, dtype=torch.float32, device=device)
    return w, scale


def grouped_bf16(x, w, offs):
    if hasattr(torch, "_grouped_mm") and x.is_cuda:
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    ends = offs.tolist()  # a CPU smoke test only: the loop over groups
    return torch.cat([x[a:b] @ w[g].T for g, (a, b) in enumerate(zip([0] + ends[:-1], ends))])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def case(name: str, m: int, n: int, k: int, groups: int, device: str, fp8: bool, reps: int) -> dict:
    """bf16 vs our kernel with int8 (and float8) weights over the tiles, for one GEMM shape."""
    flops = 2.0 * m * n * k
    grouped = groups > 1
    x = torch.empty(m, k, dtype=BF, device=device).normal_()
    offs = (torch.arange(1, groups + 1, device=device) * (m // groups)).to(torch.int32)
    offs[-1] = m
    first = int(m // groups) if grouped else m  # the first group's rows, for the error check
    result = {"case": name, "M": m, "N": n, "K": k, "groups": groups, "GFLOP": flops / 1e9}

    w = torch.empty((groups, n, k) if grouped else (n, k), dtype=BF, device=device).normal_(0.0, 0.02)
    fn = (lambda: grouped_bf16(x, w, offs)) if grouped else (lambda: F.linear(x, w))
    ms = timed(fn, device, reps)
    result["bf16"] = {"ms": ms, "TFLOPs": flops / ms / 1e9}
    del w, fn
    torch.cuda.empty_cache() if device == "cuda" else None

    for label, dtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        if label == "fp8" and not fp8:
            result[label] = "skipped: float8 e4m3 needs sm89 or later"
            continue
        wq, scale = quantized((groups, n, k) if grouped else (n, k), dtype, device)
        w0 = (wq[0] if grouped else wq).to(BF) * scale[0 if grouped else slice(None)].to(BF)[:, None]
        want = x[:first] @ w0.T
        del w0
        rows = []
        for tile in gemm8.TILES:
            if grouped:
                fn = lambda: gemm8.grouped_linear8(x, wq, scale, offs, config=tile)  # noqa: E731
            else:
                fn = lambda: gemm8.linear8(x, wq, scale, config=tile)  # noqa: E731
            try:
                err = rel(fn()[:first], want)
                ms = timed(fn, device, reps)
            except Exception as e:  # a tile this GPU cannot run (e.g. out of shared memory): say so, go on
                rows.append({"tile": list(tile), "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                continue
            rows.append({"tile": list(tile), "ms": ms, "TFLOPs": flops / ms / 1e9,
                         "vs_bf16": result["bf16"]["ms"] / ms, "rel_err": err})
            print(f"{name:16} {label} {tile}: {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s  "
                  f"x{result['bf16']['ms'] / ms:.2f} of bf16  err {err:.2e}", file=sys.stderr)
        timed_rows = [r for r in rows if "ms" in r]
        result[label] = {"tiles": rows, "best": min(timed_rows, key=lambda r: r["ms"]) if timed_rows else None}
        del wq, scale
        torch.cuda.empty_cache() if device == "cuda" else None
    print(f"{name:16} bf16: {result['bf16']['ms']:8.3f} ms  {result['bf16']['TFLOPs']:7.1f} TFLOP/s", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke test, e.g. on a CPU)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.small:
        parser.error("needs a CUDA GPU (or --small under TRITON_INTERPRET=1)")
    fp8 = device == "cpu" or torch.cuda.get_device_capability() >= (8, 9)
    h, i, x, tokens = (64, 96, 4, 48) if args.small else (H, I, X, TOKENS)
    reps = 1 if args.small else 20  # the interpreter takes seconds a call: a smoke test times once
    cases = [case("experts gate_up", tokens * TOP_K, 2 * i, h, x, device, fp8, reps),
             case("experts down", tokens * TOP_K, h, i, x, device, fp8, reps),
             case("dense gate_up", tokens, 2 * i, h, 1, device, fp8, reps)]
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": triton.__version__,
              "interpreted": os.environ.get("TRITON_INTERPRET") == "1", "small": args.small,
              "default_tile": list(gemm8.DEFAULT_TILE), "cases": cases}
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
