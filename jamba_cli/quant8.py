"""Our weight-only 8-bit layers: int8 or float8 (e4m3) weights with one float32 scale per output row.

A weight W (N, K) is stored as Q (N, K) in 8 bits and s (N,), W ≈ Q · s[:, None], with s = max|W[n]| / QMAX
(QMAX = 127 for int8, 448 for e4m3). Activations stay in the model dtype: y = (x · Qᵀ) · s, the scale applied
once per output in the kernels' epilogue. Unlike LLM.int8 nothing depends on the data (no outlier columns),
so the decode step stays one CUDA graph, and a step reads half the bytes of bf16.

The kernels (`kernels/`) read these modules through `weight_format` ("int8" or "fp8"): the decode GEMVs load
8-bit tiles and scale in the epilogue; prompts take float8 GEMMs with per-token activation scales on GPUs
that have them (`kernels.fp8_supported`), our int8 GEMM that dequantizes tile by tile elsewhere on CUDA, and
a dequantizing PyTorch path on the CPU.

The loader swaps the modules to quantize for these (still on the meta device), allocates their 8-bit
weights and scales on their device, and hands each full-precision weight (one expert at a time for the
stacked experts) to `set_weight` as soon as it has streamed in.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels

FORMATS = ("int8", "fp8")
QMAX = {"int8": 127.0, "fp8": 448.0}
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_ROWS = 4096  # rows quantized at a time: bounds the fp32 temporaries of a large weight (lm_head)


def quantize_rows(w: torch.Tensor, fmt: str, out: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization of each row of w (..., N, K) -> (Q (..., N, K) 8-bit, s (..., N) fp32),
    written into `out` and `scale` when given."""
    if out is None:
        out = torch.empty(w.shape, dtype=STORAGE[fmt], device=w.device)
    if scale is None:
        scale = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    flat_w, flat_q, flat_s = w.reshape(-1, w.shape[-1]), out.view(-1, w.shape[-1]), scale.view(-1)
    for start in range(0, flat_w.shape[0], _ROWS):
        rows = flat_w[start:start + _ROWS].float()
        s = rows.abs().amax(dim=-1) / QMAX[fmt]
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale, its values are 0
        q = rows / s[:, None]
        q = q.round_().clamp_(-127, 127) if fmt == "int8" else q.clamp_(-448, 448)
        flat_q[start:start + _ROWS] = q.to(out.dtype)
        flat_s[start:start + _ROWS] = s
    return out, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q · s back in `dtype`: q (..., N, K), scale (..., N)."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear8(nn.Module):
    """A bias-free linear with an 8-bit weight (N, K) and row scales `weight_scale` (N,)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.weight_format = in_features, out_features, fmt
        self.weight = _param((out_features, in_features), STORAGE[fmt], device)
        self.weight_scale = _param((out_features,), torch.float32, device)
        self.bias = _param((out_features,), torch.float32, device) if bias else None  # in the model dtype once loaded

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize the full-precision weight w (N, K) into this module."""
        with torch.no_grad():
            quantize_rows(w, self.weight_format, self.weight.data, self.weight_scale.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias, scale=self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.weight_format}"


class Experts8(nn.Module):
    """Stacked SwiGLU experts (model.Experts) with 8-bit weights: `gate_up_proj` (X, 2I, H) with
    `gate_up_scale` (X, 2I), `down_proj` (X, H, I) with `down_scale` (X, H)."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int, act, fmt: str, device=None):
        super().__init__()
        self.act, self.weight_format = act, fmt
        self.gate_up_proj = _param((n_experts, 2 * intermediate, hidden), STORAGE[fmt], device)
        self.gate_up_scale = _param((n_experts, 2 * intermediate), torch.float32, device)
        self.down_proj = _param((n_experts, hidden, intermediate), STORAGE[fmt], device)
        self.down_scale = _param((n_experts, hidden), torch.float32, device)

    def set_expert(self, kind: str, e: int, w: torch.Tensor) -> None:
        """Quantize expert e's full-precision `gate_up_proj` (2I, H) or `down_proj` (H, I) into this module."""
        q, s = (self.gate_up_proj, self.gate_up_scale) if kind == "gate_up_proj" else (self.down_proj, self.down_scale)
        with torch.no_grad():
            quantize_rows(w, self.weight_format, q.data[e], s.data[e])

    def scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) row scales: (X, I), (X, I), (X, H)."""
        i = self.down_proj.shape[-1]
        return self.gate_up_scale[:, :i], self.gate_up_scale[:, i:], self.down_scale

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (T, H) -> (T, H)."""
        gate, up = kernels.linear(x, self.gate_up_proj[e], scale=self.gate_up_scale[e]).chunk(2, dim=-1)
        return kernels.linear(kernels.act_mul(self.act, gate, up), self.down_proj[e], scale=self.down_scale[e])


def swap(model: nn.Module, names: list[str], fmt: str) -> tuple[set[str], set[str]]:
    """Replace the named Linear / Experts modules of a meta model by 8-bit ones (on meta).

    Returns (staged, allocated): the full-precision weights the loader stages and hands to `set_weight` /
    `set_expert` (one name per expert for stacked experts: `...experts.gate_up_proj.3`), and the names of
    the new modules' own parameters (8-bit weights, fp32 scales), which it allocates in their dtypes."""
    from .model import Experts

    staged, allocated = set(), set()
    for name in names:
        parent, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        if isinstance(old, Experts):
            x, two_i, h = old.gate_up_proj.shape
            new = Experts8(x, h, two_i // 2, old.act, fmt, device="meta")
            staged |= {f"{name}.{kind}.{e}" for kind in ("gate_up_proj", "down_proj") for e in range(x)}
        else:
            new = Linear8(old.in_features, old.out_features, fmt, old.bias is not None, device="meta")
            staged.add(f"{name}.weight")
        allocated |= {f"{name}.{p}" for p, _ in new.named_parameters() if p != "bias"}  # a bias loads as usual
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return staged, allocated


def set_staged(model: nn.Module, name: str, w: torch.Tensor) -> None:
    """Quantize the staged full-precision weight `name` (as `swap` named it) into its 8-bit module."""
    base, _, last = name.rpartition(".")
    if last.isdigit():  # one expert of stacked experts
        experts, _, kind = base.rpartition(".")
        model.get_submodule(experts).set_expert(kind, int(last), w)
    else:
        model.get_submodule(base).set_weight(w)


def is_8bit(module: nn.Module) -> bool:
    return isinstance(module, (Linear8, Experts8))
