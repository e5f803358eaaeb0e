"""Micro-benchmarks behind the choices in jamba_cli/triton_ops.py and the attention path (one GPU).

    python benchmarks/bench_kernels.py --out kernels.json

MoE decode at Jamba-Mini shape (X=16, I=14336, H=4096, top-2): our Triton GEMVs over a sweep of tile
configs, torch's grouped GEMM, and a gathered-weights baseline; each as bytes of the chosen experts per
second. Also: which SDPA backends take GQA with a causal mask and with a lower-right causal mask.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from jamba_cli import triton_ops
from jamba_cli.model import Experts


def bench(fn) -> float:
    """Median ms of fn replayed from a CUDA graph (launch gaps out of the picture)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=60, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    r = {}
    X, I, H, k = 16, 14336, 4096, 2
    sets = 4  # rotate weight sets so L2 (60 MB) holds none of them
    gu = [torch.randn(X, 2 * I, H, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(sets)]
    dn = [torch.randn(X, H, I, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(sets)]
    for t in (1, 8):
        x = torch.randn(t, H, dtype=torch.bfloat16, device="cuda")
        w, idx = torch.randn(t, X, device="cuda").softmax(-1).topk(k)
        w = w.bfloat16()
        chosen = idx.unique().numel() * 3 * I * H * 2
        per_pair = t * k * 3 * I * H * 2
        res = {"unique_expert_bytes": chosen}

        def rate(ms):
            return chosen / (ms / sets) / 1e9  # GB/s of distinct expert bytes

        ref = Experts._grouped(_E(gu[0], dn[0]), x, idx, w)
        res["grouped_mm"] = rate(bench(lambda: [Experts._grouped(_E(gu[s], dn[s]), x, idx, w) for s in range(sets)]))
        configs = list(itertools.product((8, 16, 32, 64), (128, 256, 512), (4,), (3, 4)))
        sweep = {}
        for cfg in configs:
            try:
                out = triton_ops.moe_decode(x, gu[0], dn[0], idx, w, gate_up_config=cfg, down_config=cfg)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = bench(lambda: [triton_ops.moe_decode(x, gu[s], dn[s], idx, w, cfg, cfg) for s in range(sets)])
                sweep[str(cfg)] = {"gb_s": rate(ms), "rel_err": err}
            except Exception as exc:  # a config Triton cannot compile for this GPU
                sweep[str(cfg)] = {"error": str(exc).splitlines()[0][:200]}
        res["triton_same_config"] = sweep
        best = max((v["gb_s"], c) for c, v in sweep.items() if "gb_s" in v)
        res["triton_best_same_config"] = {"config": best[1], "gb_s": best[0]}
        # then each kernel on its own, the other held at that best config
        base = tuple(int(v) for v in best[1].strip("()").split(","))
        split = {}
        for cfg in configs:
            for which in ("gate_up", "down"):
                kw = {"gate_up_config": cfg if which == "gate_up" else base,
                      "down_config": cfg if which == "down" else base}
                try:
                    ms = bench(lambda: [triton_ops.moe_decode(x, gu[s], dn[s], idx, w, **kw) for s in range(sets)])
                    split[f"{which} {cfg}"] = rate(ms)
                except Exception as exc:
                    split[f"{which} {cfg}"] = str(exc).splitlines()[0][:100]
        res["triton_split_sweep"] = split
        for which in ("gate_up", "down"):
            top = max((v, c) for c, v in split.items() if c.startswith(which) and isinstance(v, float))
            res[f"best_{which}"] = top
        res["per_pair_bytes"] = per_pair
        r[f"moe_T{t}"] = res
        print(t, {k2: v for k2, v in res.items() if "sweep" not in k2 and k2 != "triton_same_config"}, flush=True)
        args.out.write_text(json.dumps(r, indent=1))

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    q = torch.randn(1, 32, 4096, 128, dtype=torch.bfloat16, device="cuda")
    kv = torch.randn(1, 8, 8192, 128, dtype=torch.bfloat16, device="cuda")
    att = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        for case, kwargs, kk in (("causal_gqa", {"is_causal": True}, kv[:, :, :4096]),
                                 ("lower_right_gqa", {"attn_mask": causal_lower_right(4096, 8192)}, kv)):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, kk, kk, enable_gqa=True, **kwargs)
                    torch.cuda.synchronize()
                att[f"{name} {case}"] = "ok"
            except Exception as exc:
                att[f"{name} {case}"] = str(exc).splitlines()[0][:150]
    r["sdpa"] = att
    print(att)
    args.out.write_text(json.dumps(r, indent=1))


class _E(torch.nn.Module):
    def __init__(self, gu, dn):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act = gu, dn, F.silu


if __name__ == "__main__":
    main()
