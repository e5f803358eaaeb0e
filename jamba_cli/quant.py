"""Quantized loading, applied while the checkpoint streams in: 8-bit through our own layers (quant8.py:
int8 or float8 weights with row scales, the fast path on CUDA) or bitsandbytes' LLM.int8, and 4-bit (nf4)
through bitsandbytes.

The loader builds the model on the meta device, asks `targets` which modules to quantize, swaps them for
quantized modules with `swap` (still on meta) and hands each weight to `quantize` as soon as all of its
bytes are in, so the full-precision model never exists at once.

Kept in full precision by default (`DEFAULT_SKIP`): every Mamba mixer, the MoE routers and lm_head.
Always kept: the mixer's `in_proj` and `dt_proj` (its forward multiplies by their weights directly) and a
tied lm_head (it is the embedding).
A skip entry matches a module when it equals whole components of its dotted name: "mamba" matches
`model.layers.0.mamba.in_proj`, "layers.3" matches everything in the fourth layer.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .defaults import INT8_SKIP as DEFAULT_SKIP
from .defaults import INT8_THRESHOLD
from .errors import DependencyError, UsageError
from .model import Experts, JambaForCausalLM, Linear
from . import quant8

BACKENDS = ("auto", "ours", "bitsandbytes")  # 8-bit: auto = ours on CUDA, bitsandbytes elsewhere
DIRECT_WEIGHTS = ("mamba.in_proj", "mamba.dt_proj")  # read as tensors by MambaMixer, so never swapped


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    bits: 8 or 4 (nf4 with double-quantized block scales, bitsandbytes).
    backend: 8-bit only: "ours" (quant8.py: weight-only int8 or float8 with row scales), "bitsandbytes"
        (LLM.int8: outlier activation columns in 16-bit) or "auto" (`resolved` picks: ours on CUDA, where
        our kernels run, bitsandbytes elsewhere, where its CPU backend is the faster).
    format: ours only: "int8", "fp8" or None (`resolved` picks: fp8 where the GPU has it, else int8).
    skip: the modules kept in 16-bit (see `skipped`).
    threshold: LLM.int8 only: activation columns with any |x| above this stay in 16-bit.
    only: the modules to quantize, by name, instead of all but `skip`: those an FP8 checkpoint holds in
        8 bits (`from_checkpoint`).
    from_checkpoint: the config comes from an FP8 checkpoint, not from the caller: on a device without
        our 8-bit kernels (the CPU) `resolved` drops it, and the weights are widened as they load.
    """

    bits: int
    skip: tuple[str, ...] = DEFAULT_SKIP
    threshold: float = INT8_THRESHOLD
    backend: str = "auto"
    format: str | None = None
    only: frozenset[str] | None = None
    from_checkpoint: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise UsageError(f"quantization is 8 or 4 bits, not {self.bits}")
        if not self.threshold >= 0:
            raise UsageError(f"`int8_threshold` must be >= 0, got {self.threshold}")
        if self.backend not in BACKENDS:
            raise UsageError(f"`int8_backend` must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.format not in (None, *quant8.FORMATS):
            raise UsageError(f"`quant` must be one of {', '.join(quant8.FORMATS)}, not {self.format!r}")
        if self.bits == 4 and (self.backend == "ours" or self.format):
            raise UsageError("4-bit loading is bitsandbytes' nf4: `quant` and `int8_backend` are for 8-bit")
        if self.backend == "bitsandbytes" and self.format:
            raise UsageError(f"`quant` {self.format} picks our 8-bit layers; it excludes `int8_backend` "
                             f"bitsandbytes")

    @property
    def ours(self) -> bool:
        return self.backend == "ours"

    def resolved(self, device: torch.device) -> QuantConfig | None:
        """The backend and format for weights placed first on `device`: "auto" and None made concrete (None:
        no quantization, for a checkpoint's own FP8 on the CPU).

        Raises:
            UsageError: fp8 asked for on a GPU without float8.
            DependencyError: bitsandbytes is needed and not installed.
        """
        from dataclasses import replace

        from . import kernels

        if self.from_checkpoint and device.type != "cuda":
            return None
        backend = self.backend
        if backend == "auto":
            backend = "ours" if self.bits == 8 and (device.type == "cuda" or self.format) else "bitsandbytes"
        fmt = self.format
        if backend == "ours":
            fp8 = kernels.fp8_supported(device)
            fmt = fmt or ("fp8" if fp8 else "int8")
            if fmt == "fp8" and device.type == "cuda" and not fp8:
                raise UsageError(f"`quant` fp8 needs a GPU with float8 (compute capability 8.9 or newer); "
                                 f"{torch.cuda.get_device_name(device)} has none: use `quant` int8")
        else:
            require_bnb()
        return replace(self, backend=backend, format=fmt)


def parse_skip(text: str) -> tuple[str, ...]:
    """'mamba,router,lm_head' -> ('mamba', 'router', 'lm_head'); an empty string skips nothing."""
    return tuple(part.strip().strip(".") for part in text.split(",") if part.strip())


def require_bnb():
    """Import bitsandbytes, or raise a one-line DependencyError saying how to install it."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        log = logging.getLogger("bitsandbytes")
        level = log.level
        log.setLevel(logging.ERROR)  # its CPU backend logs optional-kernel misses at import time
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DependencyError("8-bit and 4-bit loading need bitsandbytes: pip install 'jamba-cli[quant]'") \
                from None
        finally:
            log.setLevel(level)
    chatty = logging.getLogger("bitsandbytes.autograd._functions")
    if chatty.level < logging.ERROR:  # LLM.int8 casts bf16/fp32 activations to fp16 by design, and says so per call
        chatty.setLevel(logging.ERROR)
    return bnb


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    dotted = f".{name}."
    return any(f".{entry}." in dotted for entry in skip)


def targets(model: JambaForCausalLM, qc: QuantConfig) -> dict[str, list[str]]:
    """Modules to quantize -> the names of their full-precision weights (for sizing and placement)."""
    out = {}
    for name, module in model.named_modules():
        if (name not in qc.only if qc.only is not None else skipped(name, qc.skip)) or name.endswith(DIRECT_WEIGHTS):
            continue
        if name == "lm_head" and model.config.tie_word_embeddings:
            continue
        if isinstance(module, Experts):
            out[name] = [f"{name}.gate_up_proj", f"{name}.down_proj"]
        elif isinstance(module, Linear):
            out[name] = [f"{name}.weight"]
    return out


def weight_dtype(qc: QuantConfig):
    """The storage type of a quantized weight, as accelerate counts bytes when it sizes a device map."""
    from accelerate.utils import CustomDtype

    return torch.int8 if qc.bits == 8 else CustomDtype.INT4


def swap(model: JambaForCausalLM, names: list[str], qc: QuantConfig,
         compute_dtype: torch.dtype) -> tuple[set[str], set[str]]:
    """Replace the named modules of a meta model by quantized ones (on meta). Returns (staged, allocated):
    the full-precision weights the loader stages and hands to `quantize`, and the parameters of the new
    modules that it allocates itself, in their own dtypes (our 8-bit layers; bitsandbytes creates its own)."""
    if qc.ours:
        return quant8.swap(model, names, qc.format)
    bnb = require_bnb()

    def linear(n_in: int, n_out: int, bias: bool = False) -> nn.Module:
        if qc.bits == 8:
            return bnb.nn.Linear8bitLt(n_in, n_out, bias=bias, has_fp16_weights=False, threshold=qc.threshold,
                                       device="meta")
        return bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=compute_dtype, quant_type="nf4",
                                 compress_statistics=True, device="meta")

    weights = set()
    for name in names:
        parent, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        if isinstance(old, Experts):
            new = QuantExperts(old, linear)
            weights |= {f"{name}.{kind}.{e}.weight" for kind in ("gate_up", "down") for e in range(len(new.down))}
        else:
            new = linear(old.in_features, old.out_features, old.bias is not None)
            weights.add(f"{name}.weight")
        setattr(model.get_submodule(parent), attr, new)
    return weights, set()


class QuantExperts(nn.Module):
    """Experts with one quantized linear per expert and projection in place of the stacked weights. It has
    no `weight_format`: the kernels run it expert by expert through `expert`, never the fused paths."""

    def __init__(self, experts: Experts, linear):
        super().__init__()
        x, two_i, h = experts.gate_up_proj.shape
        self.act = experts.act
        self.gate_up = nn.ModuleList(linear(h, two_i) for _ in range(x))  # rows [0:I] gate, [I:2I] up
        self.down = nn.ModuleList(linear(two_i // 2, h) for _ in range(x))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[e](x).chunk(2, dim=-1)
        return self.down[e](self.act(gate) * up)


def quantize(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Quantize the staged full-precision weight `name` (as `swap` named it) into its module, on the device
    `weight` is on."""
    if name.rpartition(".")[2].isdigit() or quant8.is_8bit(model.get_submodule(name.rpartition(".")[0])):
        quant8.set_staged(model, name, weight)  # (a digit: one expert of our stacked 8-bit experts)
        return
    module = model.get_submodule(name.rpartition(".")[0])
    bnb = require_bnb()
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))  # row-wise absmax
        param = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        param.CB, param.SCB = cb, scb
    else:
        if weight.device.type == "cpu" and (weight.shape[0] % 32 or weight.shape[1] % 64):
            module.support_avx512bf16_for_cpu = False  # bnb's packed CPU layout needs these multiples
        param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64,
                                  compress_statistics=True, module=module).to(weight.device)
    module.weight = param


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds bitsandbytes modules (such a model cannot be captured in a CUDA graph: the
    per-expert loop and LLM.int8's outlier columns depend on the data). Our 8-bit layers (quant8.py) can."""
    return any(isinstance(m, QuantExperts) or type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def _weights(model: nn.Module):
    """(parameter, its bytes with any quantization scales held beside it), each parameter once."""
    seen = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield p, p.numel() * p.element_size(), _scale_bytes(module, p)


def bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Bytes of weights per storage type ('bfloat16', 'int8', 'float8_e4m3fn', ...), scales included (as
    float32)."""
    out: dict[str, int] = {}
    for p, n, scales in _weights(model):
        name = str(p.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + n
        if scales:
            out["float32"] = out.get("float32", 0) + scales
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def footprint(model: nn.Module) -> dict[str, int]:
    """Bytes of weights per place ('cuda:0', 'cpu', 'disk'), quantized ones with their scales."""
    out: dict[str, int] = {}
    for p, n, scales in _weights(model):
        where = "disk" if p.untyped_storage().filename else str(p.device)
        out[where] = out.get(where, 0) + n + scales
    return dict(sorted(out.items()))


def _scale_bytes(module: nn.Module, p: torch.Tensor) -> int:
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:  # nf4: block absmax, itself quantized, plus its own absmax and code books
        parts = [quant_state.absmax, quant_state.code, quant_state.offset]
        if getattr(quant_state, "state2", None) is not None:  # gone once bnb repacks it for the CPU
            parts += [quant_state.state2.absmax, quant_state.state2.code]
        return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
    scb = getattr(p, "SCB", None)
    if scb is None and hasattr(module, "state") and p is getattr(module, "weight", None):
        scb = getattr(module.state, "SCB", None)  # int8: bitsandbytes moves the row scales on first use
    return 0 if scb is None else scb.numel() * scb.element_size()

