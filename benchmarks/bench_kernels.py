"""Micro-benchmarks behind the decode-step kernels in jamba_cli/kernels/triton/ (gemv.py, ops.py, mamba.py; one GPU).

    python benchmarks/bench_kernels.py --out kernels.json

At Jamba-Mini shape, batch 1 unless noted, each replayed from a CUDA graph over several weight sets (so
L2 holds none of them) and reported as GB/s of weights read or µs per call:
  - every decode linear: cuBLAS (F.linear) vs our Triton GEMV over a sweep of tile configs;
  - the dense SwiGLU MLP: cuBLAS gate, up, silu_mul, down vs our two fused kernels;
  - MoE experts at batch 1 and 8: our fused kernels (sweep) vs torch's grouped GEMM;
  - router + softmax + top-k, residual add + RMSNorm, and Mamba's step from in_proj to out_proj:
    the PyTorch/mamba-ssm chain vs our fused kernels.
Each fused result is checked against its reference (relative error).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from jamba_cli import kernels
from jamba_cli.kernels.triton import gemv as G, mamba as M, ops as T

H, I, E, N, R, X, K = 4096, 14336, 8192, 16, 256, 16, 2
BF = torch.bfloat16
L2_BYTES = 400e6  # rotate through at least this many bytes of weights


def bench(fn, reps: int = 1) -> float:
    """Median ms of fn replayed from a CUDA graph (launch gaps out of the picture); a small fn is captured
    `reps` times in one graph, so the graph's own launch is spread over them."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return triton.testing.do_bench(g.replay, warmup=5, rep=40, return_mode="median") / reps


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def weights(shape, nbytes_each) -> list[torch.Tensor]:
    sets = max(2, math.ceil(L2_BYTES / nbytes_each))
    return [torch.randn(*shape, dtype=BF, device="cuda") * 0.02 for _ in range(sets)]


def configs(dual: bool):
    for bn, bk, warps, stages in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (3, 4)):
        if bn * bk * (2 if dual else 1) <= 16384 and (warps == 4 or bn * bk >= 4096):
            yield bn, bk, warps, stages


def sweep(run, check, nbytes, dual=False) -> dict:
    """GB/s of `run(config)` (which calls the kernel on every weight set) for each config; rel error of one."""
    out = {}
    for cfg in configs(dual):
        try:
            err = check(cfg)
            ms = bench(lambda: run(cfg))
            out[str(cfg)] = {"gb_s": nbytes / ms / 1e6, "rel_err": err}
        except Exception as exc:  # a config Triton cannot compile for this GPU
            out[str(cfg)] = {"error": str(exc).splitlines()[0][:160]}
    return out


def best(res: dict):
    ok = [(v["gb_s"], c) for c, v in res.items() if "gb_s" in v]
    return max(ok) if ok else (0.0, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sections", default="linears,dense,moe,small,mamba")
    args = ap.parse_args()
    sections = args.sections.split(",")
    r: dict = {"device": torch.cuda.get_device_name()}
    summary = []

    def save():
        args.out.write_text(json.dumps(r, indent=1))

    # every linear of a decode step at batch 1
    shapes = {"in_proj": (2 * E, H), "out_proj": (H, E), "q_o_proj": (H, H), "k_v_proj": (1024, H),
              "lm_head": (65536, H), "dense_gate": (I, H), "dense_down": (H, I)}
    r["linears"] = {}
    for name, (n, k) in shapes.items() if "linears" in sections else ():
        ws = weights((n, k), n * k * 2)
        x = torch.randn(1, k, dtype=BF, device="cuda")
        nbytes = n * k * 2 * len(ws)
        res = {"cublas_gb_s": nbytes / bench(lambda: [F.linear(x, w) for w in ws]) / 1e6}
        res["triton"] = sweep(lambda c: [G.gemv(x, w, c) for w in ws],
                              lambda c: rel(G.gemv(x, ws[0], c), F.linear(x, ws[0])), nbytes)
        res["triton_best"] = best(res["triton"])
        r["linears"][name] = res
        summary.append(f"{name:12s} ({n}x{k}): cuBLAS {res['cublas_gb_s']:6.0f} GB/s, "
                       f"Triton {res['triton_best'][0]:6.0f} GB/s {res['triton_best'][1]}")
        print(summary[-1], flush=True)
        del ws
        save()

    for name, section in (("dense", dense), ("moe", moe), ("small", small), ("mamba", mamba)):
        if name in sections:
            section(r, summary)
            save()
    print("\n".join(summary))


def dense(r, summary):
    # dense SwiGLU MLP, one token
    gs, us, ds = weights((I, H), 3 * I * H * 2), weights((I, H), 3 * I * H * 2), weights((H, I), 3 * I * H * 2)
    x = torch.randn(1, H, dtype=BF, device="cuda")
    nbytes = 3 * I * H * 2 * len(gs)

    def dense_ref(s):
        return F.linear(T.silu_mul(F.linear(x, gs[s]), F.linear(x, us[s])), ds[s])

    res = {"cublas_gb_s": nbytes / bench(lambda: [dense_ref(s) for s in range(len(gs))]) / 1e6}
    base_down = G.DENSE_TILES[1]
    res["swiglu"] = sweep(lambda c: [G.swiglu_mlp(x, gs[s], us[s], ds[s], configs=(c, base_down))
                                     for s in range(len(gs))],
                          lambda c: rel(G.swiglu_mlp(x, gs[0], us[0], ds[0], configs=(c, base_down)), dense_ref(0)),
                          nbytes, dual=True)
    sw = tuple(int(v) for v in best(res["swiglu"])[1].strip("()").split(","))
    res["down"] = sweep(lambda c: [G.swiglu_mlp(x, gs[s], us[s], ds[s], configs=(sw, c)) for s in range(len(gs))],
                        lambda c: rel(G.swiglu_mlp(x, gs[0], us[0], ds[0], configs=(sw, c)), dense_ref(0)), nbytes)
    res["best"] = {"swiglu": sw, "down": best(res["down"])}
    r["dense_mlp"] = res
    summary.append(f"dense MLP: cuBLAS {res['cublas_gb_s']:6.0f} GB/s, fused best {res['best']}")
    print(summary[-1], flush=True)


def moe(r, summary):
    gu, dn = weights((X, 2 * I, H), X * 3 * I * H * 2), weights((X, H, I), X * 3 * I * H * 2)
    gu, dn = gu[:3], dn[:3]  # 3 x 5.6 GB: far beyond L2, and what memory allows
    r["moe"] = {}
    base_down = G.MOE_TILES[1]
    for t in (1, 8):
        x = torch.randn(t, H, dtype=BF, device="cuda")
        logits = torch.randn(t, X, device="cuda").to(BF).float()
        w, idx = logits.softmax(-1).topk(K)
        w = w.to(BF)
        nbytes = idx.unique().numel() * 3 * I * H * 2 * len(gu)
        ref = kernels.grouped_experts(x, idx, w, gu[0], dn[0])

        def run(s, sc=G.MOE_TILES[0], dc=base_down):
            return G.swiglu_mlp(x, gu[s][:, :I], gu[s][:, I:], dn[s], logits, K, configs=(sc, dc))

        res = {"grouped_mm_gb_s": nbytes / bench(lambda: [kernels.grouped_experts(x, idx, w, gu[s], dn[s])
                                                          for s in range(len(gu))]) / 1e6}
        res["swiglu"] = sweep(lambda c: [run(s, c, base_down) for s in range(len(gu))],
                              lambda c: rel(run(0, c), ref), nbytes, dual=True)
        sw = tuple(int(v) for v in best(res["swiglu"])[1].strip("()").split(","))
        res["down"] = sweep(lambda c: [run(s, sw, c) for s in range(len(gu))],
                            lambda c: rel(run(0, sw, c), ref), nbytes)
        res["best"] = {"swiglu": sw, "down": best(res["down"])}
        r["moe"][t] = res
        summary.append(f"MoE T={t}: grouped_mm {res['grouped_mm_gb_s']:6.0f} GB/s, fused best {res['best']}")
        print(summary[-1], flush=True)


def small(r, summary):
    # router, add+norm: µs per call (small weights: one set each, 20 calls per graph)
    x = torch.randn(1, H, dtype=BF, device="cuda")
    router = torch.randn(X, H, dtype=BF, device="cuda") * 0.02

    def route_ref():
        w, idx = torch.topk(F.softmax(F.linear(x, router), dim=-1, dtype=torch.float32), K, dim=-1)
        return idx, w.to(BF)

    r["router"] = {"torch_us": 1e3 * bench(route_ref, 20),
                   "logits_kernel_us": 1e3 * bench(lambda: G.router_logits(x, router), 20),
                   "rel_err": rel(G.router_logits(x, router), F.linear(x, router))}
    h, y, nw = (torch.randn(1, 1, H, dtype=BF, device="cuda") for _ in range(3))
    r["add_norm"] = {"torch_us": 1e3 * bench(lambda: kernels.rms_norm(h + y, nw[0, 0], 1e-6), 20),
                     "fused_us": 1e3 * bench(lambda: T.add_rms_norm(h, y, nw[0, 0], 1e-6), 20)}
    summary.append(f"router {r['router']}; add+norm {r['add_norm']}")
    print(summary[-1], flush=True)


def mamba(r, summary):

    xz = torch.randn(1, 2 * E, dtype=BF, device="cuda")
    conv_w, conv_b = torch.randn(E, 4, dtype=BF, device="cuda") * 0.3, torch.randn(E, dtype=BF, device="cuda")
    x_proj = torch.randn(R + 2 * N, E, dtype=BF, device="cuda") * 0.02
    dt_proj, dt_bias = torch.randn(E, R, dtype=BF, device="cuda") * 0.05, torch.randn(E, dtype=BF, device="cuda")
    norms = [torch.ones(m, dtype=BF, device="cuda") for m in (R, N, N)]
    A, D = -torch.exp(torch.randn(E, N, device="cuda")), torch.randn(E, dtype=BF, device="cuda")
    conv0 = torch.randn(1, E, 3, dtype=BF, device="cuda")
    ssm0 = torch.randn(1, E, N, device="cuda")

    def chain(conv, ssm):
        u, z = xz.chunk(2, dim=-1)
        u = kernels.causal_conv1d_update(u, conv_w, conv_b, conv, "silu")
        dt, Bm, Cm = F.linear(u, x_proj).split([R, N, N], dim=-1)
        dt, Bm, Cm = (kernels.rms_norm(v, w, 1e-6) for v, w in zip((dt, Bm, Cm), norms))
        return kernels.selective_state_update(ssm, u, F.linear(dt, dt_proj), A, Bm, Cm, D, z, dt_bias)

    def fused(conv, ssm, cfg=None):
        return M.mamba_step(xz, conv, conv_w, conv_b, x_proj, *norms, 1e-6, dt_proj, dt_bias, A, D, ssm, config=cfg)

    ref_conv, ref_ssm = conv0.clone(), ssm0.clone()
    ref = chain(ref_conv, ref_ssm)
    conv1, ssm1 = conv0.clone(), ssm0.clone()  # states the timed runs advance (their values do not matter)
    res = {"torch_us": 1e3 * bench(lambda: chain(conv1, ssm1), 20), "fused": {}}
    for cfg in itertools.product((64, 128, 256), ((4, 1024, 4, 3), (2, 1024, 4, 3), (4, 512, 4, 3)), (16, 32, 64)):
        c, s = conv0.clone(), ssm0.clone()
        try:
            out = fused(c, s, cfg)
            res["fused"][str(cfg)] = {"us": 1e3 * bench(lambda: fused(conv1, ssm1, cfg), 20),
                                      "rel_err": rel(out, ref), "state_err": rel(s, ref_ssm),
                                      "conv_equal": bool(torch.equal(c, ref_conv))}
        except Exception as exc:
            res["fused"][str(cfg)] = {"error": str(exc).splitlines()[0][:160]}
    ok = [(v["us"], c) for c, v in res["fused"].items() if "us" in v]
    res["best"] = min(ok) if ok else None
    r["mamba_step"] = res
    summary.append(f"mamba step: chain {res['torch_us']:.1f} us, fused best {res['best']}")
    print(summary[-1], flush=True)


if __name__ == "__main__":
    main()
