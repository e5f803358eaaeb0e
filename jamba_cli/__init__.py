"""jamba-cli: run AI21's Jamba models locally.

    model, tokenizer = jamba_cli.load("path/or/repo-id")
    print(jamba_cli.generate(model, tokenizer, "Hello", max_tokens=32))
    sampling = jamba_cli.SamplingParams(temperature=0.7, top_p=0.9, seed=1)
    for chunk in jamba_cli.stream_generate(model, tokenizer, [{"role": "user", "content": "Hi"}], sampling):
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
    "ChatSession": ("chat", "ChatSession"),
    "make_cache": ("cache", "make_cache"),
    "JambaConfig": ("config", "JambaConfig"),
    "JambaForCausalLM": ("model", "JambaForCausalLM"),
    "KernelOptions": ("kernels", "KernelOptions"),
    **{name: ("errors", name) for name in (
        "JambaError", "UsageError", "SamplingError", "DeviceMapError", "ConfigError", "CheckpointError",
        "ChatTemplateError", "ContextOverflowError", "PromptCacheError", "HubError", "DependencyError")},
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'jamba_cli' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f"jamba_cli.{module}"), attr)
