"""mamba-ssm and causal-conv1d, the compiled CUDA kernels of the `[kernels]` extra, behind our contracts.

Both are optional, each on its own: `mamba_ssm()` / `causal_conv1d_lib()` are None where the package is
missing or its build does not match this torch and CUDA. Each function here has the contract of the one of
the same name in `kernels/reference.py`. What they still add over our Triton kernels is a backward pass
(training through the scan and the conv) and the choices `KernelOptions(scan="mamba_ssm")`,
`conv="causal_conv1d"`, `step="mamba_ssm"`.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .reference import keep_conv_state


@functools.cache
def mamba_ssm() -> SimpleNamespace | None:
    """mamba-ssm's selective scan (CUDA, differentiable) and state update (Triton), or None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception:  # ImportError, or a build that does not match this torch/CUDA
        return None
    return SimpleNamespace(scan=selective_scan_fn, state_update=selective_state_update)


@functools.cache
def causal_conv1d_lib() -> SimpleNamespace | None:
    """causal-conv1d's prompt conv (differentiable) and one-step update, or None."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:
        return None
    return SimpleNamespace(conv=causal_conv1d_fn, update=causal_conv1d_update)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, state: torch.Tensor | None = None,
                   resume: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """mamba-ssm's scan, which always starts from h = 0: a start state's share is added after, by
    linearity (our Triton `add_initial_state`), so that branch has no backward."""
    ops = mamba_ssm()
    h0 = state if resume else None
    # the kernel wants one dtype for u, Δ, B, C and z (under autocast the norms hand back fp32)
    delta, Bm, Cm, z = (t.to(u.dtype) for t in (delta, Bm, Cm, z))
    y, last = ops.scan(u, delta, A, Bm, Cm, D.float(), z if h0 is None else None, delta_bias.float(),
                       delta_softplus=True, return_last_state=True)
    if h0 is not None:
        from .triton.scan import add_initial_state

        cum = F.softplus(delta.float() + delta_bias.float()[:, None]).cumsum(-1)  # (B, E, T)
        y = add_initial_state(y, z, cum, A, Cm, h0)
        last = last + torch.exp(cum[..., -1:] * A) * h0.float()
    if state is not None:
        state.copy_(last)
    return y if out is None else out.copy_(y)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
                  activation: str = "silu", resume: bool = True, length: int | None = None) -> torch.Tensor:
    """causal-conv1d's prompt conv (silu). It takes a start state only in the channel-last layout, so it runs
    from zeros and the first K-1 outputs, the only ones the state reaches, are recomputed from it."""
    k = weight.shape[-1]
    y = causal_conv1d_lib().conv(x, weight, bias, activation="silu")
    if state is not None and resume:
        head = torch.cat([state.to(x.dtype), x[..., :k - 1]], dim=-1)  # (B, E, <= 2K-2)
        y[..., :k - 1] = F.silu(F.conv1d(head, weight.unsqueeze(1), bias, groups=x.shape[1]))
    if state is not None:
        keep_conv_state(x, state, resume, length)
    return y


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                         activation: str = "silu") -> torch.Tensor:
    return causal_conv1d_lib().update(x, state, weight, bias, activation="silu")


def selective_state_update(state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                           Bm: torch.Tensor, Cm: torch.Tensor, D: torch.Tensor, z: torch.Tensor,
                           delta_bias: torch.Tensor) -> torch.Tensor:
    return mamba_ssm().state_update(state, u, delta, A, Bm, Cm, D, z, delta_bias, dt_softplus=True)
