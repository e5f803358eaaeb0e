"""float8 matrix products for prompts, through PyTorch's scaled GEMMs (cuBLASLt / CUTLASS on sm89+).

A prompt's linears run on the tensor cores in float8 when the weight is float8 (quant8.py, or an FP8
checkpoint): each token's activations are quantized to e4m3 with their own scale (max|x| / 448, computed
on the fly, so nothing is calibrated), the product accumulates in fp32 and both scales are applied in the
GEMM's epilogue. The error this adds is that of rounding x to e4m3, the scheme vLLM and AI21's FP8
checkpoints use.
"""

from __future__ import annotations

import functools

import torch

E4M3_MAX = 448.0


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def supported(device: torch.device | str) -> bool:
    """Whether `device` runs float8 GEMMs (CUDA compute capability 8.9 or newer: Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def shapes_ok(k: int, n: int) -> bool:
    """The scaled GEMMs want both dimensions in multiples of 16."""
    return k % 16 == 0 and n % 16 == 0


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (e4m3 (M, K), scales (M, 1) float32) with x ≈ q · s row by row; on CUDA in one pass of
    our Triton kernel (these PyTorch steps would read and write the activations several times)."""
    if x.is_cuda and x.shape[-1] <= 65536:
        try:
            from .triton.ops import quantize_tokens_fp8
        except ImportError:
            pass
        else:
            return quantize_tokens_fp8(x)
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12) / E4M3_MAX
    return (x.float() / s).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), s


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (weight (N, K) e4m3 · scale (N,))ᵀ -> (M, N) in x's dtype."""
    q, s = quantize_tokens(x)
    return torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=scale.view(1, -1), out_dtype=x.dtype)


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   offs: torch.Tensor) -> torch.Tensor:
    """Rows (M, K) sorted by group, group g (ending at row offs[g]) times weight[g] (N, K) e4m3 with its row
    scales scale[g] (N,) -> (M, N) in rows' dtype; the float8 counterpart of torch._grouped_mm."""
    q, s = quantize_tokens(rows)
    return torch._scaled_grouped_mm(q, weight.transpose(1, 2), s.view(-1), scale, offs=offs, out_dtype=rows.dtype)
