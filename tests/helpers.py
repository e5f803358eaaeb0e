"""What several test modules share that is not a fixture (the fixtures are in conftest.py): the `jamba`
process, a terminal to drive it, a probe of what a command imports, and the repository the test Hub serves."""

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository's root
HEAVY = ("torch", "numpy", "transformers", "huggingface_hub", "safetensors", "tokenizers", "starlette", "uvicorn")

# The repository that conftest's `hub` fixture serves: a real two-shard checkpoint, and what real repos
# carry next to it; DEFAULT is what `jamba download` fetches of it.
REPO = "ai21labs/jamba-tiny"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
DEFAULT = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
           "tokenizer_config.json", "tokenizer.model", "chat_template.jinja", SHARD1, SHARD2}


def jamba(*args) -> list[str]:
    """The command line of the real `jamba ARGS` process."""
    return [sys.executable, "-m", "jamba_cli", *map(str, args)]


PROBE = """import sys
sys.argv = ["jamba", *sys.argv[1:]]
try:
    from jamba_cli.cli import main
    main()
except SystemExit:
    pass
sys.stderr.write("HEAVY=" + ",".join(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""


def probe(env, *args, extra_env=None) -> subprocess.CompletedProcess:
    """Run `jamba ARGS` in a fresh interpreter; its stderr ends with HEAVY= and the heavy modules it imported."""
    code = PROBE.format(heavy=set(HEAVY))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, env={**env, **(extra_env or {})},
                          cwd=ROOT, timeout=60, text=True)


class Terminal:
    """A child process whose controlling terminal is a pty we type into."""

    def __init__(self, args, env, stdout=None):
        """`stdout`: None puts stdout on the terminal too; subprocess.PIPE keeps it apart."""
        self.master, slave = pty.openpty()

        def take_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave if stdout is None else stdout, stderr=slave,
                                     env={**env, "TERM": "xterm"}, cwd=ROOT, preexec_fn=take_terminal)
        os.close(slave)
        self.seen = b""

    def expect(self, text: bytes, timeout=60) -> bytes:
        end = time.monotonic() + timeout
        while text not in self.seen and time.monotonic() < end:
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:
                    break
        assert text in self.seen, self.seen[-500:]
        before, _, self.seen = self.seen.partition(text)
        return before

    def type(self, keys: bytes, pause=0.5):
        time.sleep(pause)  # let readline take the terminal before the keys arrive
        os.write(self.master, keys)

    def close(self):
        self.proc.wait(timeout=60)
        os.close(self.master)
        return self.proc.returncode


def write_compressed_fp8(src_dir, dst_dir, *, strategy="channel", ignore=("lm_head", "re:.*mamba.*", "re:.*router.*"),
                         scale_dtype=None, input_scale=None, save_ignore_as_given=False) -> Path:
    """Write the compressed-tensors FP8 version of the checkpoint in `src_dir` (as transformers' save_pretrained
    writes one) to `dst_dir`, as llm-compressor saves `QuantizationModifier(targets="Linear", ignore=ignore)`:
    each targeted Linear weight not matched by `ignore` (exact names, or "re:" patterns that re.match the module
    name) becomes float8_e4m3fn with absmax scales `M.weight_scale` -- (N, 1) for "channel", (1,) for
    "tensor" -- in `scale_dtype` (default: the weight's own dtype, as llm-compressor does); `input_scale` (a
    float) adds static per-tensor activations and an `M.input_scale` of that value. The saved `ignore` lists
    every Linear left unquantized by its exact name, as llm-compressor's QuantizationConfig.from_pretrained
    does (the recipe's patterns instead with `save_ignore_as_given`). Shards, the index and the tokenizer
    files are kept. Independent of jamba_cli.compressed_tensors, which it serves to test."""
    import json
    import re
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router", "in_proj",
              "x_proj", "dt_proj", "out_proj", "lm_head"}
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)

    def ignored(module):
        return any(re.match(e[3:], module) if e.startswith("re:") else e == module for e in ignore)

    index = json.loads((src / "model.safetensors.index.json").read_text()) \
        if (src / "model.safetensors.index.json").exists() else None
    skipped, added = [], {}
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(shard, framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                tensor = f.get_tensor(key)
                module, _, param = key.rpartition(".")
                if param != "weight" or module.rpartition(".")[2] not in linear:
                    out[key] = tensor
                    continue
                if ignored(module):
                    skipped.append(module)
                    out[key] = tensor
                    continue
                w = tensor.to(torch.float32)
                absmax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
                scale = (absmax / 448.0).clamp_min(1e-12).to(scale_dtype or tensor.dtype)
                rows = scale.to(torch.float32) if strategy == "channel" else scale.to(torch.float32).reshape(1, 1)
                out[key] = (w / rows).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
                out[f"{module}.weight_scale"] = scale
                if input_scale is not None:
                    out[f"{module}.input_scale"] = torch.tensor([input_scale], dtype=scale.dtype)
                added.update({k: shard.name for k in out if k.startswith(f"{module}.") and k != key})
        save_file(out, dst / shard.name, metadata=metadata)
    if index is not None:
        index["weight_map"].update(added)
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy(extra, dst / extra.name)

    def args(kind_strategy, dynamic, observer):
        return {"actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": None, "num_bits": 8,
                "observer": observer, "observer_kwargs": {}, "scale_dtype": None, "strategy": kind_strategy,
                "symmetric": True, "type": "float", "zp_dtype": None}

    activations = args("token", True, None) if input_scale is None else args("tensor", False, "static_minmax")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "config_groups": {"group_0": {"format": "float-quantized", "input_activations": activations,
                                      "output_activations": None, "targets": ["Linear"],
                                      "weights": args(strategy, False, "minmax")}},
        "format": "float-quantized", "global_compression_ratio": None,
        "ignore": list(ignore) if save_ignore_as_given else skipped, "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {}, "version": "0.12.2"}
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return dst


@contextmanager
def running(model, tokenizer, **options):
    """The real application on uvicorn in a thread, on a free port of 127.0.0.1; yields its base URL."""
    import uvicorn

    from jamba_cli import server as srv

    app = srv.create_app(model, tokenizer, name=options.pop("name", "tiny"), **options)
    sock = srv.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = srv.url(sock).removesuffix("/v1")
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield base
    finally:
        app.state.worker.close()
        server.should_exit = True
        thread.join(10)
        sock.close()
