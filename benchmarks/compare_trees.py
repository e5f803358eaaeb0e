"""Generation speed of two checkouts of jamba-cli, and of this one without mamba-ssm and causal-conv1d, in one
session on one GPU: did a change keep the numbers?

    python benchmarks/compare_trees.py --old ../old-checkout --out compare.json [--shape mini]

Runs each tree's own `benchmarks/bench_generate.py` (ours only, no transformers) in a fresh process, in the
order old, new, new without the compiled kernels (the same process environment minus the PYTHONPATH entries
that hold mamba_ssm / causal_conv1d: what `pip install jamba-cli` without the [kernels] extra runs), then
old and new once more, so that a drift of the GPU's clock over the session shows up as a difference
between the two runs of one tree rather than between trees. Reports decode (batch 1 and 8) and prefill
(back to back and one-shot) per tree as the median of its runs, and the ratios new / old and
without / with the compiled kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW = HERE.parent


def run_tree(tree: Path, out: Path, args, extra_env: dict | None = None, extra_args: tuple = ()) -> dict:
    env = {**os.environ, **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    cmd = [sys.executable, str(tree / "benchmarks" / "bench_generate.py"), "--out", str(out), "--skip-hf",
           "--shape", args.shape, "--lengths", args.lengths, "--steps", str(args.steps), *extra_args]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-1500:]
    if proc.returncode != 0:
        print(tail, flush=True)
        return {"error": tail, "wall_s": time.monotonic() - t0}
    result = json.loads(out.read_text())
    result.get("ours", {}).pop("logits_512", None)  # 64K floats a run: kept in the run's own file only
    result["wall_s"] = time.monotonic() - t0
    return result


def figures(result: dict) -> dict:
    """The compared numbers of one bench_generate result: decode tok/s per batch, prefill tok/s per length."""
    ours = result.get("ours", {})
    out = {}
    for batch, d in ours.get("decode", {}).items():
        out[f"decode_b{batch}"] = d["tok_s_per_seq"]
    for n, p in ours.get("prefill", {}).items():
        if "tok_s" in p:
            out[f"prefill_{n}"] = p["tok_s"]
        if "tok_s_rested" in p:
            out[f"prefill_{n}_one_shot"] = p["tok_s_rested"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the other checkout (its benchmarks/ and jamba_cli/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="mini")
    ap.add_argument("--layers", type=int, help="build only this many layers of the shape (a smaller GPU)")
    ap.add_argument("--lengths", default="2048,16384")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each tree with the compiled kernels")
    ap.add_argument("--budget", type=float, default=0, help="seconds: start no run that would end past this "
                    "(judged by the longest run so far); 0: no limit")
    args = ap.parse_args()
    start = time.monotonic()
    work = args.out.parent / (args.out.stem + "_runs")
    work.mkdir(parents=True, exist_ok=True)
    without = {"PYTHONPATH": os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                             if p and not any((Path(p) / m).exists()
                                                              for m in ("mamba_ssm", "causal_conv1d")))}
    runs: dict[str, list[dict]] = {"old": [], "new": [], "new_without_compiled": []}
    report = {"shape": args.shape, "layers": args.layers, "old_tree": str(args.old), "runs": runs}
    plan = [("old", 0), ("new", 0), ("new_without_compiled", 0)]
    plan += [(name, r) for r in range(1, args.rounds) for name in ("old", "new")]
    longest = 0.0
    for name, r in plan:
        if args.budget and time.monotonic() - start + longest > args.budget:
            print(f"stopping before {name} run {r}: the budget of {args.budget:.0f} s would be passed", flush=True)
            break
        if name == "old":
            result = run_tree(args.old.resolve(), work / f"old_{r}.json", args)
        elif name == "new":
            result = run_tree(NEW, work / f"new_{r}.json", args)
        else:
            result = run_tree(NEW, work / "new_without.json", args, without, ("--no-variants",))
        runs[name].append(result)
        longest = max(longest, result["wall_s"])
        args.out.write_text(json.dumps(report, indent=1))
    medians = {}
    for name, results in runs.items():
        per_run = [figures(x) for x in results if "error" not in x]
        keys = sorted({k for f in per_run for k in f})
        medians[name] = {k: statistics.median(f[k] for f in per_run if k in f) for k in keys}
        medians[name + "_all"] = {k: [round(f[k], 1) for f in per_run if k in f] for k in keys}
    report["median"] = medians
    ratio = lambda a, b: {k: medians[a][k] / medians[b][k] for k in medians[a] if k in medians[b]}
    report["new_over_old"] = ratio("new", "old")
    report["without_over_with_compiled"] = ratio("new_without_compiled", "new")
    for name in runs:
        if runs[name] and "error" not in runs[name][0]:
            report[name + "_kernels_available"] = runs[name][0]["ours"].get("kernels_available")
    if runs["new"] and "error" not in runs["new"][0]:
        report["device"] = runs["new"][0]["device"]
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{report.get('device')}, shape {args.shape}: tok/s (median of runs; every run in the JSON)")
    print(f"{'':22s} {'old':>10s} {'new':>10s} {'new/old':>8s} {'no compiled':>12s} {'ratio':>7s}")
    for k in medians["new"]:
        o, n, w = medians["old"].get(k), medians["new"][k], medians["new_without_compiled"].get(k)
        print(f"{k:22s} {o or float('nan'):10.1f} {n:10.1f} {n / o if o else float('nan'):8.3f} "
              f"{w or float('nan'):12.1f} {w / n if w else float('nan'):7.3f}")


if __name__ == "__main__":
    main()
