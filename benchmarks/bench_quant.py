"""Memory, load time and speed of a Jamba-shaped model in bf16, 8-bit and 4-bit, from random weights.

Modes: bf16; int8 and fp8 (our 8-bit layers, quant8.py); bnb8 (bitsandbytes LLM.int8, formerly "8bit") and
nf4 (bitsandbytes, formerly "4bit"). Per mode: prefill speed, decode speed after a `--decode-prompt`
token prompt, the weight bytes a decode step reads, and that speed as a fraction of its limit: the read
bandwidth of our GEMV on weights of the same storage type, measured in the same run, divided by those bytes.
`--long N` also runs an N-token prompt through chunked prefill (bounded memory) and reports the peak.

No checkpoint is read: the model is built on the meta device, placed by the loader's own `place()` (device
map, max memory, quantized modules), and each parameter is filled with seeded random numbers and, for the
quantized ones, quantized at once, so peak memory stays near the final footprint plus one weight.
Parameters get the same values in every mode and placement (each has its own seed), so the logits of
the modes can be compared: `max_abs_logit_diff_vs_first` is against the first mode of the run.

    python benchmarks/bench_quant.py benchmarks/results/quant_h200.json --shape mini
    python benchmarks/bench_quant.py out.json --shape large --layers 8 --modes 8bit,4bit
    python benchmarks/bench_quant.py out.json --shape mini --device-map auto --max-memory 0=60GiB,cpu=100GiB
    python benchmarks/bench_quant.py out.json --shape mini --modes fp8,int8 --long 262144   # one 80 GB GPU
    python benchmarks/bench_quant.py /tmp/smoke.json --shape tiny --new-tokens 4 --modes bf16,int8,fp8   # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import resource
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jamba_cli import quant, quant8  # noqa: E402
from jamba_cli.cache import make_cache  # noqa: E402
from jamba_cli.config import JambaConfig  # noqa: E402
from jamba_cli.terminal import format_bytes  # noqa: E402
from jamba_cli.generation import generate_step, on_single_gpu  # noqa: E402
from jamba_cli.errors import JambaError  # noqa: E402
from jamba_cli.loader import DTYPE_NAMES, place  # noqa: E402
from jamba_cli.model import JambaForCausalLM  # noqa: E402

SHAPES = {
    "mini": {},  # JambaConfig's defaults are Jamba-Mini (v0.1 / 1.5 / 1.6 / 1.7): 52B total, 12B active
    "large": dict(hidden_size=8192, num_hidden_layers=72, num_attention_heads=64, num_key_value_heads=8,
                  intermediate_size=24576, mamba_dt_rank=512),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, num_experts=4),
}
MODES = {"bf16": None, "int8": dict(bits=8, backend="ours", format="int8"),
         "fp8": dict(bits=8, backend="ours", format="fp8"), "bnb8": dict(bits=8, backend="bitsandbytes"),
         "nf4": dict(bits=4, backend="bitsandbytes")}
MODES.update({"8bit": MODES["bnb8"], "4bit": MODES["nf4"]})
CHUNK = 1 << 26  # elements generated at a time (128 MiB in bf16)


def fill(name: str, t: torch.Tensor, config: JambaConfig, gen_device: torch.device) -> None:
    """Seeded random values for one parameter, generated on `gen_device` whatever device `t` is on."""
    with torch.no_grad():
        if "norm" in name or name.endswith(".D"):
            t.fill_(1.0)
        elif name.endswith("A_log"):
            t.copy_(torch.log(torch.arange(1, config.mamba_d_state + 1, dtype=torch.float32)).expand(t.shape))
        elif name.endswith("dt_proj.bias"):
            t.fill_(math.log(math.expm1(0.01)))  # softplus -> dt = 0.01
        elif name.endswith("bias"):
            t.zero_()
        else:
            std = 0.2 if "conv1d" in name else 0.02
            g = torch.Generator(gen_device).manual_seed(zlib.crc32(name.encode()))
            flat = t.view(-1)
            for start in range(0, flat.numel(), CHUNK):
                part = flat[start:start + CHUNK]
                part.copy_(torch.empty(part.shape, dtype=torch.float32, device=gen_device).normal_(0, std, generator=g))


def build(config: JambaConfig, dtype: torch.dtype, mode: dict | None, args) -> JambaForCausalLM:
    with torch.device("meta"):
        model = JambaForCausalLM(config)
    qc = quant.QuantConfig(skip=quant.parse_skip(args.int8_skip), threshold=args.int8_threshold,
                           **mode) if mode else None
    device = None if args.device_map or args.max_memory else args.device
    shapes = {name: p.shape for name, p in model.named_parameters()}  # named as in the checkpoint
    placer = place(model, dtype=dtype, device=device, device_map=args.device_map, max_memory=args.max_memory,
                   offload_folder=args.offload_folder, quant_config=qc)
    placer.allocate()
    gen_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, shape in shapes.items():  # one at a time: a quantized weight is quantized as soon as it is filled
        stacked = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        for index in [(e,) for e in range(shape[0])] if stacked else [()]:  # experts one by one, as on disk
            t = placer.target(name, index)
            fill(f"{name}.{index[0]}" if index else name, t, config, gen_device)
            placer.written(name, index, t.numel())
    return placer.finish()


def bytes_per_token(model: JambaForCausalLM) -> int:
    """Weight bytes one decode step reads at batch 1: every weight, but only top_k of X experts and one
    row of the embedding."""
    c = model.config
    total = 0
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            n = p.numel() * p.element_size() + quant._scale_bytes(module, p)
            if mname == "model.embed_tokens":
                n //= c.vocab_size
            elif ".experts" in f"{mname}.{pname}":
                n = n * c.num_experts_per_tok // c.num_experts
            total += n
    return total


def gemv_bandwidth(storage: str, device: str) -> float | None:
    """Bytes per second our decode GEMV reads from weights of one expert's gate_up shape of Jamba-Mini,
    stored as `storage` (bf16, int8, fp8): eight such weights in turn, so that none is served from L2."""
    if not torch.cuda.is_available():
        return None
    from jamba_cli.kernels.triton.gemv import gemv

    n, k = 28672, 4096
    ws = []
    for i in range(8):
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        ws.append(w if storage == "bf16" else quant8.quantize_rows(w, storage)[0])
    scale = None if storage == "bf16" else torch.ones(n, device=device)
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    for w in ws:
        gemv(x, w, scale=scale)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for w in ws:
            gemv(x, w, scale=scale)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sum(w.numel() * w.element_size() for w in ws) / sorted(times)[len(times) // 2]


def sync() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def run_mode(mode: str, config: JambaConfig, dtype: torch.dtype, args) -> tuple[dict, torch.Tensor]:
    gc.collect()
    if torch.cuda.is_available():
        torch.empty(1, device="cuda")  # the memory-stats calls below need an initialised CUDA context
    for i in range(torch.cuda.device_count()):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(i)
    t0 = time.perf_counter()
    model = build(config, dtype, MODES[mode], args)
    sync()
    load_s = time.perf_counter() - t0
    peak_load = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}
    prompt = torch.randint(3, config.vocab_size, (1, max(args.prompt_len, args.decode_prompt or 0)),
                           generator=torch.Generator().manual_seed(0))
    devices = model.layer_devices()

    def prefill(n: int) -> tuple[float, torch.Tensor]:
        cache = make_cache(config, 1, dtype=model.dtype, device=devices, capacity=n)
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            logits = model(prompt[:, :n].to(model.device), cache, last_only=True)
            sync()
        return time.perf_counter() - t0, logits[0, -1].float().cpu()

    def decode(n_prompt: int, n_new: int) -> float:
        # as `jamba run` decodes: a CUDA graph on one GPU (bf16 or our 8-bit), eager for bitsandbytes or split
        steps = generate_step(model, prompt[0, :n_prompt], max_tokens=n_new + 1)
        next(steps)  # prefill and the first token
        sync()
        t0 = time.perf_counter()
        for _ in steps:
            pass
        sync()
        return time.perf_counter() - t0

    prefill(min(16, args.prompt_len))  # warm-up: lazy initialisation in torch and bitsandbytes
    decode(min(16, args.prompt_len), 2)
    prefill_s, first_logits = prefill(args.prompt_len)
    decode_prompt = args.decode_prompt or args.prompt_len
    decode_s = decode(decode_prompt, args.new_tokens)
    peak = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}
    long = {}
    if args.long:
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
        ids = torch.randint(3, config.vocab_size, (args.long,), generator=torch.Generator().manual_seed(1))
        sync()
        t0 = time.perf_counter()
        tokens = list(generate_step(model, ids, max_tokens=4))  # chunked prefill, then three decode steps
        sync()
        long = {"long_prompt_tokens": args.long, "long_prompt_s": round(time.perf_counter() - t0, 2),
                "long_prompt_tokens_generated": len(tokens),
                "long_prompt_peak_allocated_bytes": {f"cuda:{i}": torch.cuda.max_memory_allocated(i)
                                                     for i in range(torch.cuda.device_count())}}
    read = bytes_per_token(model)
    storage = {"int8": "int8", "fp8": "fp8"}.get(mode, "bf16")
    bandwidth = gemv_bandwidth(storage, str(model.device)) if model.device.type == "cuda" else None
    result = {
        "mode": mode,
        "load_s": round(load_s, 3),
        "weights_bytes": quant.footprint(model),
        "weights": ", ".join(f"{where} {format_bytes(n, binary=True)}" for where, n in quant.footprint(model).items()),
        "peak_allocated_during_load_bytes": peak_load,
        "peak_allocated_bytes": peak,  # load, prefill and decode (the long prompt's is apart)
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "layer_devices": sorted({str(d) for d in devices}),
        "decode_cuda_graph": on_single_gpu(model) and not quant.is_quantized(model),
        "prefill_tokens": args.prompt_len,
        "prefill_tok_s": round(args.prompt_len / prefill_s, 2),
        "decode_prompt_tokens": decode_prompt,
        "decode_tokens": args.new_tokens,
        "bytes_read_per_token": read,
        "gemv_read_bytes_per_s": bandwidth,
        "gemv_storage": storage,
        "decode_limit_tok_s": round(bandwidth / read, 2) if bandwidth else None,
        "decode_fraction_of_limit": round(args.new_tokens / decode_s / (bandwidth / read), 3) if bandwidth else None,
        "decode_tok_s": round(args.new_tokens / decode_s, 3),
        "decode_ms_per_token": round(1000 * decode_s / args.new_tokens, 2),
        **long,
        "weights_by_dtype": quant.bytes_by_dtype(model),
    }
    del model
    return result, first_logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="JSON file to write")
    p.add_argument("--shape", choices=SHAPES, default="mini")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (the layer schedule is kept)")
    p.add_argument("--modes", default="bf16,int8,fp8,bnb8,nf4", help="comma list of " + ", ".join(MODES))
    p.add_argument("--dtype", default="bf16", help="dtype of unquantized weights and activations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--device-map", help="auto, balanced, sequential, a device, or a JSON file")
    p.add_argument("--max-memory", help='e.g. "0=60GiB,cpu=100GiB"')
    p.add_argument("--offload-folder")
    p.add_argument("--int8-skip", default=",".join(quant.DEFAULT_SKIP))
    p.add_argument("--int8-threshold", type=float, default=6.0)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decode-prompt", type=int, help="prompt tokens before decoding (default: --prompt-len)")
    p.add_argument("--long", type=int, help="also run a prompt of this many tokens through chunked prefill")
    args = p.parse_args()

    config = JambaConfig(**SHAPES[args.shape])
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    dtype = DTYPE_NAMES[args.dtype]
    modes = [m.strip() for m in args.modes.split(",")]
    results, first = [], None
    for mode in modes:
        result, logits = run_mode(mode, config, dtype, args)
        if first is None:
            first = logits
        result["max_abs_logit_diff_vs_first"] = round((logits - first).abs().max().item(), 4)
        result["logits_cosine_vs_first"] = round(torch.nn.functional.cosine_similarity(logits, first, dim=0).item(), 6)
        results.append(result)
        print(f"{mode:>5}: load {result['load_s']:7.1f} s  weights {result['weights']}  prefill "
              f"{result['prefill_tok_s']:9.1f} tok/s  decode {result['decode_tok_s']:7.2f} tok/s  "
              f"max|dlogit| vs {modes[0]} {result['max_abs_logit_diff_vs_first']}", file=sys.stderr)
    try:
        from importlib.metadata import version

        bnb_version = version("bitsandbytes")
    except ImportError:
        bnb_version = None
    report = {
        "shape": args.shape,
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                    "num_experts", "num_attention_heads", "vocab_size")},
        "dtype": args.dtype,
        "device_map": args.device_map or args.device,
        "max_memory": args.max_memory,
        "int8_skip": args.int8_skip,
        "int8_threshold": args.int8_threshold,
        "hardware": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "bitsandbytes": bnb_version,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except JambaError as e:
        sys.exit(f"bench_quant: {e}")
