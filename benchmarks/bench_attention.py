"""Attention: our Triton kernels against the paths they replace (one GPU).

    python benchmarks/bench_attention.py --out attn.json [--skip-decode]

Prefill: causal attention over T = 2K, 16K and 64K new tokens, our kernel (a sweep of configs) against
torch's SDPA with FlashAttention-2 (the model's fallback) and cuDNN, errors against an fp32 computation.

Decode: a step over a static cache, the model's PyTorch path vs the fused Triton kernels.

Jamba-Mini's attention shape (A=32 query heads, G=8 K/V heads, Dh=128, bf16) at batch 1 and 8, with
positions 2047 and 65535 cached. Both paths are captured in CUDA graphs, as the decode step is. The
PyTorch path is kernels/reference.py's decode_attention (index_copy_ x2, arange <= pos mask,
attend_one). For each case: time of each path, a sweep of Triton configs, the error of both paths
against an fp32 computation on the same inputs, and a replay of the captured graph after pos moved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton.testing

from jamba_cli.kernels.reference import attend_one
from jamba_cli.kernels.triton import attention as triton_attention

A, G, D = 32, 8, 128
CONFIGS = [(16, 4, 3, 8), (32, 4, 2, 4), (32, 4, 3, 4), (64, 4, 2, 4), (64, 4, 3, 4), (64, 4, 2, 2),
           (64, 4, 2, 8), (64, 8, 2, 4), (128, 4, 2, 4), (128, 4, 3, 4), (128, 8, 2, 4), (128, 8, 3, 4)]
L2_BYTES = 120 << 20  # more than an H200's L2: rotating over this much K/V keeps it from serving the reads


def graph_ms(fns) -> float:
    """Median ms per call of the fns, all replayed from one CUDA graph."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=50, return_mode="median") / len(fns)


def torch_path(q, k, v, ck, cv, pos, key_mask):
    ck.index_copy_(2, pos, k[:, :, None])
    cv.index_copy_(2, pos, v[:, :, None])
    valid = torch.arange(ck.shape[2], device=q.device) <= pos
    return attend_one(q[:, :, None], ck, cv, valid if key_mask is None else valid & key_mask)[:, :, 0]


def fp32_reference(q, k, v, ck, cv, p, key_mask):
    kk, vv = ck[:, :, :p + 1].float().clone(), cv[:, :, :p + 1].float().clone()
    kk[:, :, p], vv[:, :, p] = k.float(), v.float()
    valid = None if key_mask is None else key_mask[:, :p + 1]
    return attend_one(q.float()[:, :, None], kk, vv, valid)[:, :, 0]


def rel(x, ref) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


def run_case(b: int, p: int) -> dict:
    cap = p + 1 + 1024
    set_bytes = 2 * b * G * cap * D * 2
    sets = max(1, min(8, -(-L2_BYTES // set_bytes)))
    gen = torch.Generator(device="cuda").manual_seed(b * 100003 + p)
    dev, dt = "cuda", torch.bfloat16
    caches = [(torch.randn(b, G, cap, D, device=dev, generator=gen).to(dt),
               torch.randn(b, G, cap, D, device=dev, generator=gen).to(dt)) for _ in range(sets)]
    q = torch.randn(b, A, D, device=dev, generator=gen).to(dt)
    k, v = (torch.randn(b, G, D, device=dev, generator=gen).to(dt) for _ in range(2))
    pos = torch.tensor([p], device=dev)
    key_mask = torch.rand(b, cap, device=dev, generator=gen) > 0.1
    key_mask[:, p] = True
    read_bytes = 2 * b * G * (p + 1) * D * 2  # K and V rows 0..pos
    res = {"batch": b, "pos": p, "capacity": cap, "sets": sets, "kv_bytes_read": read_bytes}

    ref32 = fp32_reference(q, k, v, *caches[0], p, None)
    out_torch = torch_path(q, k, v, *caches[0], pos, None)
    res["torch_ms"] = graph_ms([lambda c=c: torch_path(q, k, v, *c, pos, None) for c in caches])
    res["torch_rel_err_vs_fp32"] = rel(out_torch, ref32)
    sweep = {}
    for cfg in CONFIGS:
        try:
            out = triton_attention.decode_attention(q, k, v, *caches[0], pos, config=cfg)
            ms = graph_ms([lambda c=c: triton_attention.decode_attention(q, k, v, *c, pos, config=cfg)
                           for c in caches])
            sweep[str(cfg)] = {"ms": ms, "tb_s": read_bytes / ms / 1e9, "rel_err_vs_torch": rel(out, out_torch.float()),
                               "rel_err_vs_fp32": rel(out, ref32)}
        except Exception as exc:  # a config Triton cannot compile for this GPU
            sweep[str(cfg)] = {"error": str(exc).splitlines()[0][:200]}
    res["triton_sweep"] = sweep
    best = min((s["ms"], c) for c, s in sweep.items() if "ms" in s)[1]
    default = str(triton_attention.DECODE_TILE)
    res["triton_best"] = {"config": best, **sweep[best]}
    if default in sweep:
        res["triton_default"] = {"config": default, **sweep[default]}

    # with left-padding mask, best config
    cfg = tuple(int(x) for x in best.strip("()").split(","))
    ref32 = fp32_reference(q, k, v, *caches[0], p, key_mask)
    out_torch = torch_path(q, k, v, *caches[0], pos, key_mask)
    out = triton_attention.decode_attention(q, k, v, *caches[0], pos, key_mask, config=cfg)
    res["masked"] = {
        "torch_ms": graph_ms([lambda c=c: torch_path(q, k, v, *c, pos, key_mask) for c in caches]),
        "triton_ms": graph_ms([lambda c=c: triton_attention.decode_attention(q, k, v, *c, pos, key_mask, config=cfg)
                               for c in caches]),
        "rel_err_vs_torch": rel(out, out_torch.float()), "torch_rel_err_vs_fp32": rel(out_torch, ref32),
        "triton_rel_err_vs_fp32": rel(out, ref32)}

    # the captured graph replayed after pos moved back: it must read pos on the device
    ck, cv = caches[0]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_graph = triton_attention.decode_attention(q, k, v, ck, cv, pos, config=cfg)
    p2 = p - 700
    pos.fill_(p2)
    ck[:, :, p2], cv[:, :, p2] = 0, 0
    g.replay()
    written = bool(torch.equal(ck[:, :, p2], k) and torch.equal(cv[:, :, p2], v))
    res["replay_at_moved_pos"] = {"pos": p2, "cache_row_written": written,
                                  "rel_err_vs_torch": rel(out_graph, torch_path(q, k, v, ck, cv, pos, None).float())}
    pos.fill_(p)
    del caches
    torch.cuda.empty_cache()
    return res


PREFILL_CONFIGS = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3),
                   (128, 32, 4, 3)]


def prefill_case(t: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    gen = torch.Generator(device="cuda").manual_seed(t)
    # as the model makes them: (B, T, heads, Dh) projections seen as (B, heads, T, Dh)
    q = torch.randn(1, t, A, D, device="cuda", generator=gen).bfloat16().transpose(1, 2)
    k, v = torch.randn(2, 1, t, G, D, device="cuda", generator=gen).bfloat16().transpose(2, 3)
    flops = 4 * t * t / 2 * D * A  # causal: half of QK^T and of PV
    rep = 30 if t > 20000 else 200

    def time_ms(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")

    n = min(t, 4096)  # the fp32 reference on the last n queries (all keys): memory stays small
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, -n:].float(), k.float().repeat_interleave(A // G, 1), v.float().repeat_interleave(A // G, 1),
        attn_mask=causal_lower_right(n, t))
    res = {"T": t, "sdpa": {}, "ours": {}}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                def fn():
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                out = fn()
                ms = time_ms(fn)
            res["sdpa"][name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_fp32": rel(out[:, :, -n:], ref)}
        except Exception as exc:
            res["sdpa"][name] = {"error": str(exc).splitlines()[0][:200]}
    for cfg in PREFILL_CONFIGS:
        try:
            out = triton_attention.prefill_attention(q, k, v, 0, config=cfg).transpose(1, 2)
            ms = time_ms(lambda: triton_attention.prefill_attention(q, k, v, 0, config=cfg))
            res["ours"][str(cfg)] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_fp32": rel(out[:, :, -n:], ref)}
        except Exception as exc:
            res["ours"][str(cfg)] = {"error": str(exc).splitlines()[0][:200]}
    out = triton_attention.prefill_attention(q, k, v, 0).transpose(1, 2)  # the config the library picks
    ms = time_ms(lambda: triton_attention.prefill_attention(q, k, v, 0))
    res["ours_default"] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_fp32": rel(out[:, :, -n:], ref)}
    del q, k, v, ref, out
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name(), "shape": {"A": A, "G": G, "Dh": D, "dtype": "bfloat16"},
               "prefill": [], "cases": []}
    for t in (2048, 16384, 65536):
        results["prefill"].append(prefill_case(t))
        args.out.write_text(json.dumps(results, indent=1))
    print(f"{'prefill T':>9} {'flash ms':>9} {'cudnn ms':>9} {'ours ms':>8} {'TFLOP/s':>8} {'x flash':>8} "
          f"{'rel err':>8}")
    for r in results["prefill"]:
        o, f, c = r["ours_default"], r["sdpa"]["flash"], r["sdpa"]["cudnn"]
        print(f"{r['T']:>9} {f.get('ms', float('nan')):>9.3f} {c.get('ms', float('nan')):>9.3f} {o['ms']:>8.3f} "
              f"{o['tflops']:>8.0f} {f.get('ms', float('nan')) / o['ms']:>8.2f} {o['rel_err_vs_fp32']:>8.1e}")
    if args.skip_decode:
        return
    for b in (1, 8):
        for p in (2047, 65535):
            results["cases"].append(run_case(b, p))
            args.out.write_text(json.dumps(results, indent=1))
    print(f"{'B':>2} {'pos':>6} {'torch µs':>9} {'triton µs':>10} {'x':>5} {'TB/s':>5} {'best config':>16} "
          f"{'rel err':>8} {'masked µs torch/triton':>23}")
    for r in results["cases"]:
        t = r["triton_best"]
        m = r["masked"]
        print(f"{r['batch']:>2} {r['pos']:>6} {r['torch_ms'] * 1e3:>9.1f} {t['ms'] * 1e3:>10.1f} "
              f"{r['torch_ms'] / t['ms']:>5.1f} {t['tb_s']:>5.2f} {t['config']:>16} {t['rel_err_vs_torch']:>8.1e} "
              f"{m['torch_ms'] * 1e3:>11.1f}/{m['triton_ms'] * 1e3:<11.1f}")


if __name__ == "__main__":
    main()
