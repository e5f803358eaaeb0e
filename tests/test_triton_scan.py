"""jamba_cli/triton_scan.py against the PyTorch selective scan of kernels.py, in Triton's CPU interpreter.
(Its speed against mamba-ssm is measured by benchmarks/bench_scan.py on a GPU.)"""

from conftest import interpret

# Triton's interpreter must be chosen before triton compiles anything, so the checks run in a fresh
# interpreter. The interpreter scans element by element in Python: sizes are small, and only one case
# uses the model's N = 16.
CODE = r'''
import torch, torch.nn.functional as F
from jamba_cli import kernels, triton_scan as S
g = torch.Generator().manual_seed(0)

def inputs(b, e, t, n):
    xz = torch.randn(b, 2 * e, t, generator=g)  # u and z are row-strided halves, as in the model
    bc = torch.randn(b, t, 2 * n + 3, generator=g)  # B and C: (B, N, T) views with stride(-1) = 2N + 3
    A = -torch.exp(torch.randn(e, n, generator=g))
    delta = torch.randn(b, e, t, generator=g) * 0.5
    return (xz[:, :e], delta, A, bc[..., 3:3 + n].transpose(1, 2), bc[..., 3 + n:].transpose(1, 2),
            torch.randn(e, generator=g), xz[:, e:], torch.randn(e, generator=g) * 0.5 - 1)

def check(b, e, t, n, with_h0, gated, **config):
    u, delta, A, Bm, Cm, D, z, bias = inputs(b, e, t, n)
    h0 = torch.randn(b, e, n, generator=g) if with_h0 else None
    state = torch.zeros(b, e, n) if h0 is None else h0.clone()
    ref = kernels.selective_scan(u, delta, A, Bm, Cm, D, z, bias, state, resume=True)  # CPU: the torch path
    y, last = S.selective_scan(u, delta, A, Bm, Cm, D, z if gated else None, bias, h0=h0, **config)
    if not gated:
        y = y * F.silu(z)
    scale = ref.abs().max()
    assert (y - ref).abs().max() <= 1e-4 * scale, (config, (y - ref).abs().max() / scale)
    assert (last - state).abs().max() <= 1e-4 * state.abs().max(), config

# T = 100 is no multiple of the tile; E = 12 leaves part of a channel block empty
check(2, 12, 100, 4, False, True, block_e=8, block_t=32)
check(1, 12, 100, 16, True, True)  # the GPU's config
check(2, 12, 100, 4, True, False, block_e=16, block_t=8, num_warps=1, stages=1)
check(1, 16, 48, 16, True, True)  # whole tiles and channel blocks only: no bounds checks anywhere
print("ok")
'''


def test_triton_scan_in_the_interpreter():
    assert interpret("-c", CODE) == "ok"
