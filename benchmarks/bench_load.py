"""Load time and peak RSS for a ~1 GB random Jamba checkpoint (bf16, sharded like official ones).

    python benchmarks/bench_load.py [--gb 1.0] [--dir /tmp/jamba-bench-ckpt] [--json out.json]

Writes the checkpoint once (in a child process), then loads it in a fresh child process that reports its
peak RSS, so the figure is what `jamba_cli.load` costs and nothing else. Target: peak RSS <= 1.3 x size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONFIG = dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=10,
              num_attention_heads=16, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
              attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1,
              mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, torch_dtype="bfloat16")


def write_checkpoint(directory: Path, shard_bytes: int) -> None:
    import torch
    from safetensors.torch import save_file

    from jamba_cli.config import JambaConfig
    from jamba_cli.model import JambaForCausalLM

    config = JambaConfig.from_dict(CONFIG)
    with torch.device("meta"):
        model = JambaForCausalLM(config)
    keys = []  # per-expert keys, as official checkpoints store them
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            base = name.rsplit(".", 1)[0]
            for e in range(p.shape[0]):
                keys += [(f"{base}.{e}.gate_proj.weight", (p.shape[1] // 2, p.shape[2])),
                         (f"{base}.{e}.up_proj.weight", (p.shape[1] // 2, p.shape[2]))]
        elif name.endswith("experts.down_proj"):
            base = name.rsplit(".", 1)[0]
            keys += [(f"{base}.{e}.down_proj.weight", tuple(p.shape[1:])) for e in range(p.shape[0])]
        else:
            keys.append((name, tuple(p.shape)))
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        fname = f"model-{n:05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        shard, size = {}, 0

    g = torch.Generator().manual_seed(0)
    for key, shape in keys:
        shard[key] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        size += shard[key].numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config.to_dict()))


def measure(directory: Path) -> dict:
    import resource
    import time

    import torch

    from jamba_cli.loader import load_model

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    model = load_model(directory, dtype=torch.bfloat16, device="cpu")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"load_seconds": seconds, "peak_rss_bytes": peak, "rss_before_load_bytes": base, "param_bytes": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/jamba-bench-ckpt"))
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_write", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._write:
        return write_checkpoint(args.dir, args.shard_mb << 20)
    if args._measure:
        return print(json.dumps(measure(args.dir)))
    if not (args.dir / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, __file__, "--_write", "--dir", str(args.dir),
                        "--shard-mb", str(args.shard_mb)], check=True)
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    out = subprocess.run([sys.executable, __file__, "--_measure", "--dir", str(args.dir)], check=True,
                         capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1]) | {"checkpoint_bytes": size}
    r["peak_rss_over_checkpoint"] = r["peak_rss_bytes"] / size
    print(f"checkpoint {size / 1e9:.3f} GB, load {r['load_seconds']:.2f} s, peak RSS {r['peak_rss_bytes'] / 1e9:.3f} GB "
          f"= {r['peak_rss_over_checkpoint']:.2f} x checkpoint (RSS before loading: "
          f"{r['rss_before_load_bytes'] / 1e9:.3f} GB)")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
