"""Launch helpers shared by our Triton kernels: programmatic dependent launch (PDL) and the SM count.

With PDL (Hopper and later) a decode-step kernel may be launched while the kernel before it finishes: it
reads what does not depend on that kernel (its first weight tile), then waits for that kernel's results.
A kernel launched with `launch_pdl=pdl()` calls `pdl_enter(USE_PDL)` before its first dependent read.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..options import current

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def pdl_supported() -> bool:
    """Whether this Triton and GPU can launch with PDL (never under Triton's CPU interpreter)."""
    return (gdc_wait is not None and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 9)


def pdl() -> bool:
    """Whether to launch the next decode-step kernel with PDL: supported, and on in the active options."""
    return current().pdl and pdl_supported()


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    # the first dependent read of a kernel launched with PDL: wait for the previous kernel's results, then
    # let the next kernel start launching
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU (4 elsewhere: the interpreter's stand-in)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
