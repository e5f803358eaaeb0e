"""Prefill and decode speed of jamba-cli against transformers, in one run on one GPU.

    python benchmarks/bench_generate.py --out results.json [--shape mini] [--skip-hf]

Builds random bf16 weights of the chosen shape in GPU memory (no checkpoint on disk), measures ours,
frees it, builds transformers' JambaForCausalLM with the same weights (mamba-ssm / causal-conv1d kernels
installed) and measures it the same way. Prefill is timed back to back and one-shot (after the GPU
rests, as a `jamba run` prefill follows model loading): see measure(). Also measures the GPU's GEMV read
bandwidth, so decode speed can be stated as a fraction of the memory-bound limit. Prints a table; writes
everything as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build, shape_config  # noqa: E402

from jamba_cli import kernels  # noqa: E402
from jamba_cli.cache import make_cache  # noqa: E402
from jamba_cli.kernels import KernelOptions  # noqa: E402
from jamba_cli.config import JambaConfig  # noqa: E402
from jamba_cli.generation import CUDAGraphDecoder, prefill_chunk_size  # noqa: E402
from jamba_cli.model import JambaForCausalLM  # noqa: E402

GB = 1e9


def sync():
    torch.cuda.synchronize()
    return time.perf_counter()


def gemv_bandwidth() -> float:
    """Bytes/s of bf16 GEMVs over 1.9 GB of weights (far beyond L2), replayed from a CUDA graph."""
    ws = [torch.randn(28672, 4096, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    outs = [torch.nn.functional.linear(x, w) for w in ws]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w, o in zip(ws, outs):
            o.copy_(torch.nn.functional.linear(x, w))
    for _ in range(3):
        g.replay()
    t0 = sync()
    reps = 20
    for _ in range(reps):
        g.replay()
    seconds = sync() - t0
    nbytes = sum(w.numel() * 2 for w in ws) * reps
    del ws
    return nbytes / seconds


def active_bytes(cfg: JambaConfig) -> int:
    """Weight bytes one decode token must read at batch 1 (bf16): all but the embedding table and the
    experts not chosen."""
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.d_inner
    mlp = 3 * h * i
    mamba = 2 * e * h + e * cfg.mamba_d_conv + e * (cfg.mamba_dt_rank + 2 * cfg.mamba_d_state) \
        + cfg.mamba_dt_rank * e + 2 * e + e * cfg.mamba_d_state + e * h
    attn = 2 * h * h + 2 * h * cfg.num_key_value_heads * cfg.head_dim
    total = cfg.vocab_size * h  # lm_head
    for layer in range(cfg.num_hidden_layers):
        total += attn if cfg.is_attention(layer) else mamba
        total += cfg.num_experts_per_tok * mlp + h * cfg.num_experts if cfg.is_moe(layer) else mlp
    return 2 * total


def repeats(n: int) -> int:
    """Timed prefill runs at n tokens (their median is reported): the GPU's clock moves a few percent
    between runs, so one run is not a measurement."""
    return 5 if n <= 16384 else 3 if n <= 65536 else 1


def gpu_state() -> str | None:
    """SM clock, power draw and temperature now, from nvidia-smi (None where it is missing)."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def measure(once, n: int, rest: float, warm: bool = True) -> dict:
    """Prefill speed at n tokens from `once()`, which runs one prefill and returns its seconds.

    With `warm`, an untimed first run (the allocator grows, cuBLAS picks kernels; its seconds are
    cold_seconds), then the median of repeats(n) runs back to back and, if rest > 0, of as many one-shot
    runs each after `rest` seconds idle. Without, one run. The two medians differ because the H200 holds a
    700 W power cap: back-to-back prefills run it at the cap (SM clock ~1.5 GHz), while a prefill after
    idle, as in `jamba run` after loading a model, starts cooler and faster.
    """
    if not warm:
        seconds = once()
        return {"tok_s": n / seconds, "seconds": seconds, "runs_seconds": [seconds], "cold_seconds": None}
    cold = once()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    runs = [once() for _ in range(repeats(n))]
    out = {"tok_s": n / statistics.median(runs), "seconds": statistics.median(runs), "runs_seconds": runs,
           "cold_seconds": cold, "gpu_after_runs": gpu_state()}
    if rest > 0:
        rested = []
        for _ in range(repeats(n)):
            time.sleep(rest)
            out["gpu_after_rest"] = gpu_state()
            rested.append(once())
        out.update(tok_s_rested=n / statistics.median(rested), seconds_rested=statistics.median(rested),
                   runs_seconds_rested=rested, rest_seconds=rest)
    return out


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / GB


# Decode and prefill are also timed with other kernel choices, each a KernelOptions active for its run.
# "ours": our Triton kernels everywhere, what runs where mamba-ssm and causal-conv1d are not installed.
OURS = KernelOptions(scan="triton", conv="triton", step="triton")
VARIANTS = {"cublas_linears": KernelOptions(gemv_linears=False), "no_pdl": KernelOptions(pdl=False),
            "gemv_in_proj": KernelOptions(tiles={"linear": {(16384, 4096): (4, 256, 4, 3)}}),
            "moe_16_512_8_1024": KernelOptions(tiles={"moe": ((16, 512, 4, 3), (8, 1024, 4, 3))}),
            "dense_4_512_4_1024": KernelOptions(tiles={"dense": ((4, 512, 4, 4), (4, 1024, 4, 4))})}
BATCH_VARIANTS = {"ours": OURS, "mamba_ssm_step": KernelOptions(step="mamba_ssm")}  # batch > 1
# prefill variants: (options, the prompt lengths to time)
PREFILL_VARIANTS = {"mamba_ssm_scan": (KernelOptions(scan="mamba_ssm"), (2048, 16384, 65536)),
                    "sdpa_attention": (KernelOptions(attention="sdpa"), (2048, 16384, 65536)),
                    "ours": (OURS, (2048, 16384, 65536)),
                    "causal_conv1d_conv": (KernelOptions(conv="causal_conv1d"), (2048, 16384))}


# ----------------------------------------------------------------------------------------------- ours

def bench_ours(cfg_dict: dict, lengths: list[int], chunk: int, steps: int, log, profile: int = 0,
               warm_max: int = 65536, rest: float = 0.0, variants_on: bool = True, batches=(1, 8)) -> dict:
    config = JambaConfig.from_dict(cfg_dict)
    t0 = time.perf_counter()
    model = build(JambaForCausalLM, config, torch.bfloat16, "cuda")
    out = {"build_seconds": time.perf_counter() - t0, "weights_gb": torch.cuda.memory_allocated() / GB,
           "kernels_available": kernels.available(), "kernel_options": repr(kernels.current())}
    log(f"ours: built in {out['build_seconds']:.1f} s, {out['weights_gb']:.1f} GB")
    g = torch.Generator(device="cuda").manual_seed(0)

    def prefill(ids, cache):
        step = chunk or prefill_chunk_size(model)  # the library's choice unless --chunk is given
        out.setdefault("chunks", {})[ids.shape[1]] = step
        for s in range(0, ids.shape[1], step):
            logits = model(ids[:, s:s + step], cache, last_only=True)
        return logits

    def timed_prefill(n, warm, rest=0.0):
        """measure() of prefilling n random tokens into a fresh cache."""
        ids = torch.randint(0, config.vocab_size, (1, n), device="cuda", generator=g)
        cache = make_cache(config, 1, dtype=torch.bfloat16, device="cuda", capacity=n)

        def once():
            t0 = sync()
            prefill(ids, cache)
            seconds = sync() - t0
            cache.reset()
            return seconds

        return measure(once, n, rest, warm)

    def timed_steps(step, tok):
        """(last token, seconds) of `steps` graph-replayed decode steps after 3 untimed ones."""
        for _ in range(3):
            tok = step(tok).argmax(-1)
        t0 = sync()
        for _ in range(steps):
            tok = step(tok).argmax(-1)
        return tok, sync() - t0

    with torch.inference_mode():
        ids = torch.randint(0, config.vocab_size, (1, 512), device="cuda", generator=g)
        out["logits_512"] = model(ids, last_only=True)[0, -1].float().cpu().tolist()  # parity with transformers
        prefill(torch.randint(0, config.vocab_size, (1, 4096), device="cuda", generator=g),
                make_cache(config, 1, dtype=torch.bfloat16, device="cuda", capacity=4096))  # warm-up
        out["prefill"] = {}
        for n in lengths:
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                out["prefill"][n] = {**timed_prefill(n, n <= warm_max, rest), "peak_gb": peak_gb()}
            except torch.OutOfMemoryError:
                out["prefill"][n] = {"error": "out of memory", "peak_gb": peak_gb()}
            log(f"ours: prefill {n}: {out['prefill'][n]}")
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            ids = torch.randint(0, config.vocab_size, (1, profile), device="cuda", generator=g)
            cache = make_cache(config, 1, dtype=torch.bfloat16, device="cuda", capacity=profile)
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                prefill(ids, cache)
                torch.cuda.synchronize()
            out["profile"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
            log("ours: prefill profile\n" + "\n".join(out["profile"].splitlines()[:28]))
            del cache
        out["decode"] = {}
        for batch in batches:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            prompt = 2048
            ids = torch.randint(0, config.vocab_size, (batch, prompt), device="cuda", generator=g)
            t0 = sync()
            cache = make_cache(config, batch, dtype=torch.bfloat16, device="cuda",
                               capacity=prompt + (4 + len(VARIANTS) + len(BATCH_VARIANTS)) * steps + 64, static=True)
            tok = prefill(ids, cache)[:, -1].argmax(-1)
            tok.cpu()
            ttft = time.perf_counter() - t0
            t0 = sync()
            step = CUDAGraphDecoder(model, cache)
            capture = sync() - t0
            tok, graph_s = timed_steps(step, tok)
            t0 = sync()
            for _ in range(steps):  # as the CLI does: the token goes to the host every step
                tok = step(tok).argmax(-1)
                tok.cpu()
            synced_s = sync() - t0
            variants = {}
            chosen = (VARIANTS if batch == 1 else BATCH_VARIANTS) if variants_on else {}
            for name, options in chosen.items():  # the same step, other kernels
                try:
                    with kernels.using(options):
                        tok, seconds = timed_steps(CUDAGraphDecoder(model, cache), tok)
                    variants[name] = steps / seconds
                except Exception as exc:
                    variants[name] = str(exc).splitlines()[0][:200]
            if profile and batch == 1:
                from torch.profiler import ProfilerActivity, profile as torch_profile

                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(8):
                        tok = model(tok[:, None], cache)[:, -1].argmax(-1)
                    torch.cuda.synchronize()
                out["decode_profile"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
            eager_steps = 16
            t0 = sync()
            for _ in range(eager_steps):
                tok = model(tok[:, None], cache)[:, -1].argmax(-1)
            eager_s = sync() - t0
            out["decode"][batch] = {
                "prompt": prompt, "ttft_s": ttft, "graph_capture_s": capture,
                "tok_s_per_seq": steps / graph_s, "tok_s_total": batch * steps / graph_s,
                "tok_s_per_seq_host_sync": steps / synced_s, "tok_s_per_seq_eager": eager_steps / eager_s,
                "tok_s_per_seq_variants": variants,
                "peak_gb": peak_gb()}
            log(f"ours: decode batch {batch}: {out['decode'][batch]}")
            del cache, step
        out["prefill_variants"] = {}
        for name, (options, sizes) in PREFILL_VARIANTS.items() if variants_on else ():  # last: may crash
            res = out["prefill_variants"][name] = {}
            for n in (n for n in lengths if n in sizes):
                try:
                    torch.cuda.empty_cache()
                    with kernels.using(options):
                        res[n] = timed_prefill(n, warm=True)
                except Exception as exc:
                    res[n] = {"error": str(exc).splitlines()[0][:200]}
                log(f"ours: prefill {n}, {name}: {res[n]}")
    del model
    return out


# ----------------------------------------------------------------------------------------- transformers

def bench_hf(cfg_dict: dict, lengths: list[int], steps: int, log, warm_max: int = 65536, rest: float = 0.0,
             batches=(1, 8)) -> dict:
    import warnings

    from transformers import JambaConfig as HFConfig
    from transformers import JambaForCausalLM as HFModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_cfg = HFConfig(**cfg_dict, use_mamba_kernels=True)
    t0 = time.perf_counter()
    model = build(HFModel, hf_cfg, torch.bfloat16, "cuda")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = {"build_seconds": time.perf_counter() - t0}
    log(f"hf: built in {out['build_seconds']:.1f} s")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        ids = torch.randint(0, hf_cfg.vocab_size, (1, 512), device="cuda", generator=g)
        out["logits_512"] = model(ids, logits_to_keep=1).logits[0, -1].float().cpu().tolist()
        model(torch.randint(0, hf_cfg.vocab_size, (1, 4096), device="cuda", generator=g), logits_to_keep=1)
        out["prefill"] = {}
        for n in lengths:
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                ids = torch.randint(0, hf_cfg.vocab_size, (1, n), device="cuda", generator=g)

                def once():
                    t0 = sync()
                    model(ids, use_cache=True, logits_to_keep=1)
                    return sync() - t0

                out["prefill"][n] = {**measure(once, n, rest, n <= warm_max), "peak_gb": peak_gb()}
            except torch.OutOfMemoryError:
                out["prefill"][n] = {"error": "out of memory", "peak_gb": peak_gb()}
            log(f"hf: prefill {n}: {out['prefill'][n]}")
            gc.collect()
            torch.cuda.empty_cache()
        out["decode"] = {}
        for batch in batches:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ids = torch.randint(0, hf_cfg.vocab_size, (batch, 2048), device="cuda", generator=g)
            mask = torch.ones_like(ids)
            run = lambda n: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                           do_sample=False)
            t0 = sync()
            run(1)
            ttft = sync() - t0
            t0 = sync()
            run(steps + 1)
            total = sync() - t0
            out["decode"][batch] = {"prompt": 2048, "ttft_s": ttft, "tok_s_per_seq": steps / (total - ttft),
                                    "tok_s_total": batch * steps / (total - ttft), "peak_gb": peak_gb()}
            log(f"hf: decode batch {batch}: {out['decode'][batch]}")
    del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="mini")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--lengths", default="2048,2047,16384,16383,65536,262144",
                    help="prompt lengths to prefill; the odd ones show lengths that are no multiple of 8")
    ap.add_argument("--hf-lengths", default="2048,2047,16384,16383,65536,262144")
    ap.add_argument("--chunk", type=int, default=0, help="prefill chunk in tokens (default: the library's)")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--hf-steps", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--profile", type=int, default=0, help="also profile a prefill of this many tokens")
    ap.add_argument("--warm-max", type=int, default=65536,
                    help="prompts up to this length run once untimed first (steady-state prefill)")
    ap.add_argument("--rest", type=float, default=2.0,
                    help="seconds idle before each one-shot prefill run, timed after the back-to-back ones "
                         "(0: none)")
    ap.add_argument("--no-variants", action="store_true", help="time only the default kernel choices")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes")
    ap.add_argument("--kernels", choices=("default", "ours"), default="default",
                    help="ours: every run on our Triton kernels (as without mamba-ssm and causal-conv1d)")
    args = ap.parse_args()
    cfg = shape_config(args.shape, args.layers)
    results = {"shape": args.shape, "config": cfg, "device": torch.cuda.get_device_name(),
               "torch": torch.__version__}

    def log(msg):
        print(msg, flush=True)
        args.out.write_text(json.dumps(results, indent=1))

    results["gemv_bandwidth_gb_s"] = gemv_bandwidth() / GB
    config = JambaConfig.from_dict(cfg)
    results["decode_bytes_per_token_gb"] = active_bytes(config) / GB
    results["decode_limit_tok_s"] = results["gemv_bandwidth_gb_s"] / results["decode_bytes_per_token_gb"]
    log(f"GEMV bandwidth {results['gemv_bandwidth_gb_s']:.0f} GB/s; {results['decode_bytes_per_token_gb']:.2f} "
        f"GB/token -> decode limit {results['decode_limit_tok_s']:.1f} tok/s")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    batches = [int(x) for x in args.batches.split(",") if x]
    try:
        with kernels.using(OURS if args.kernels == "ours" else KernelOptions()):
            results["ours"] = bench_ours(cfg, lengths, args.chunk, args.steps, log, args.profile, args.warm_max,
                                         args.rest, not args.no_variants, batches)
    except Exception:
        results["ours_error"] = traceback.format_exc()
        log(results["ours_error"])
    gc.collect()
    torch.cuda.empty_cache()
    if not args.skip_hf:
        try:
            results["hf"] = bench_hf(cfg, [int(x) for x in args.hf_lengths.split(",") if x], args.hf_steps, log,
                                     args.warm_max, args.rest, batches)
        except Exception:
            results["hf_error"] = traceback.format_exc()
            log(results["hf_error"])
    if "ours" in results and "hf" in results:
        a, b = torch.tensor(results["ours"]["logits_512"]), torch.tensor(results["hf"]["logits_512"])
        results["logits_cosine_vs_hf"] = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        results["logits_argmax_equal"] = bool(a.argmax() == b.argmax())
    for who in ("ours", "hf"):  # a vocabulary of floats each: the comparison above is what is kept
        results.get(who, {}).pop("logits_512", None)
    log("done")
    print_table(results)


def print_table(r: dict) -> None:
    print(f"\n{r['device']}, shape {r['shape']}, limit {r['decode_limit_tok_s']:.1f} tok/s "
          f"({r['gemv_bandwidth_gb_s']:.0f} GB/s GEMV)")
    for who in ("ours", "hf"):
        res = r.get(who)
        if not res:
            continue
        for n, p in res.get("prefill", {}).items():
            tok = f"{p['tok_s']:.0f} tok/s" if "tok_s" in p else p["error"]
            rested = f"  one-shot {p['tok_s_rested']:.0f} tok/s" if "tok_s_rested" in p else ""
            print(f"{who:5s} prefill {int(n):>7d}: {tok:>14s}{rested}  peak {p['peak_gb']:.1f} GB")
        for bsz, d in res.get("decode", {}).items():
            pct = 100 * d["tok_s_per_seq"] / r["decode_limit_tok_s"] if int(bsz) == 1 else math.nan
            print(f"{who:5s} decode  batch {bsz}: {d['tok_s_per_seq']:.1f} tok/s/seq ({d['tok_s_total']:.0f} total)"
                  f"  TTFT {d['ttft_s'] * 1000:.0f} ms  {'' if math.isnan(pct) else f'{pct:.0f}% of limit'}")
    if "logits_cosine_vs_hf" in r:
        print(f"last-token logits, ours vs transformers: cosine {r['logits_cosine_vs_hf']:.5f}, "
              f"argmax equal {r['logits_argmax_equal']}")


if __name__ == "__main__":
    main()
