"""jamba-cli: run AI21's Jamba models locally.

    model, tokenizer = jamba_cli.load("path/or/repo-id")
    print(jamba_cli.generate(model, tokenizer, "Hello", max_tokens=32))
    for chunk in jamba_cli.stream_generate(model, tokenizer, [{"role": "user", "content": "Hi"}]):
        print(chunk.text, end="", flush=True)

Attributes are imported on first use so that `import jamba_cli` (and `jamba --help`) stays free of torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "load": ("loader", "load"),
    "generate": ("generation", "generate"),
    "stream_generate": ("generation", "stream_generate"),
    "generate_step": ("generation", "generate_step"),
    "GenerationChunk": ("generation", "GenerationChunk"),
    "GenerationStats": ("generation", "GenerationStats"),
    "SamplingParams": ("sample", "SamplingParams"),
    "StreamingDetokenizer": ("tokenizer", "StreamingDetokenizer"),
    "make_cache": ("cache", "make_cache"),
    "JambaConfig": ("config", "JambaConfig"),
    "JambaForCausalLM": ("model", "JambaForCausalLM"),
    "JambaError": ("errors", "JambaError"),
    "CheckpointError": ("errors", "CheckpointError"),
    "ConfigError": ("errors", "ConfigError"),
    "DeviceMapError": ("errors", "DeviceMapError"),
    "DependencyError": ("errors", "DependencyError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'jamba_cli' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f"jamba_cli.{module}"), attr)
