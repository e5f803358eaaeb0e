"""The runtime switches of the kernel seam, in one value.

A model carries its `KernelOptions` (`model.kernel_options`, set by `load(..., kernels=...)`) and makes
them the active ones for the length of each forward call; code that calls the kernels directly (tests,
benchmarks) does the same with `using(options)`. Nothing flips a module global: a variant is a new value,
`dataclasses.replace(options, pdl=False)`, active inside a `with` block.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("auto", "torch")


@dataclass(frozen=True)
class KernelOptions:
    """Which implementation runs each operation.

    Attributes:
        backend: "auto" runs the fastest kernels installed for the tensors' device (ours in Triton on CUDA,
            mamba-ssm / causal-conv1d where they are installed and chosen below); "torch" runs the PyTorch
            reference paths everywhere.
        scan: the prompt's selective scan on CUDA, when both are installed: "triton" (ours: one pass, takes
            a start state) or "mamba_ssm" (its CUDA kernel, plus a correction pass for a start state).
        conv: the prompt's causal conv on CUDA, when both are installed: "triton" (ours) or
            "causal_conv1d".
        step: the Mamba decode step on CUDA at batch > 1, when both are installed: "triton" (ours, fused)
            or "mamba_ssm" (causal-conv1d's conv update and mamba-ssm's state update). Batch 1 always
            takes ours.
        attention: causal prompt attention on CUDA: "triton" (ours) or "sdpa" (torch's).
        gemv_linears: one-token linears of the shapes our GEMV was tuned for take it instead of cuBLAS.
        pdl: launch decode-step kernels with programmatic dependent launch where the GPU has it (Hopper+).
        tiles: overrides of the kernels' tile tables by name (benchmarks): "linear" {(N, K): tile}, "dense",
            "moe", "mamba_step", "scan", "conv", "attention_decode", "attention_prefill", "reference_scan_block".
        A choice whose package is not installed falls back to ours, and ours to PyTorch where Triton is
        missing.
    """

    backend: str = "auto"
    scan: str = "triton"
    conv: str = "causal_conv1d"  # where installed: alone, the faster on long prompts (results/conv_h100.json)
    step: str = "triton"
    attention: str = "triton"
    gemv_linears: bool = True
    pdl: bool = True
    tiles: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name, allowed in (("backend", BACKENDS), ("scan", ("triton", "mamba_ssm")),
                              ("conv", ("triton", "causal_conv1d")), ("step", ("triton", "mamba_ssm")),
                              ("attention", ("triton", "sdpa"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"kernels {name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")

    def tile(self, name: str, default: Any, key: Any = None) -> Any:
        """The tile override `tiles[name]` (or `tiles[name][key]` for a keyed table), else `default`."""
        value = self.tiles.get(name)
        if value is None:
            return default
        if key is None:
            return value
        return value.get(key, default) if isinstance(value, Mapping) else default


_ACTIVE: contextvars.ContextVar[KernelOptions] = contextvars.ContextVar("jamba_kernel_options",
                                                                        default=KernelOptions())


def current() -> KernelOptions:
    """The options in force: those of the innermost `using` block, else the defaults."""
    return _ACTIVE.get()


@contextmanager
def using(options: KernelOptions | None) -> Iterator[KernelOptions]:
    """Make `options` the active ones inside the block (per thread and task; blocks nest). None keeps
    the active ones."""
    if options is None:
        yield current()
        return
    token = _ACTIVE.set(options)
    try:
        yield options
    finally:
        _ACTIVE.reset(token)
