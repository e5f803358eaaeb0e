"""The PyTorch reference paths (kernels/reference.py, what the CPU runs): the chunked scan and the conv
against a plain step-by-step recurrence in float64."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from jamba_cli import kernels


def naive_scan(u, delta, A, Bm, Cm, D, z, bias, h):
    dt = F.softplus(delta.double() + bias.double()[:, None])
    h = h.double().clone()
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[..., t, None] * A.double()) * h + (dt[..., t] * u[..., t].double())[..., None] \
            * Bm[:, None, :, t].double()
        ys.append((h * Cm[:, None, :, t].double()).sum(-1) + D.double() * u[..., t].double())
    y = torch.stack(ys, -1) * F.silu(z.double())
    return y, h


def _inputs(b, e, n, t, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return (r(b, e, t), r(b, e, t) - 1, -torch.exp(r(e, n)), r(b, n, t), r(b, n, t), r(e), r(b, e, t), r(e),
            r(b, e, n))


@pytest.mark.parametrize("t", [1, 2, 7, 64, 65, 333, 1100])
def test_scan_matches_sequential_recurrence(t):
    u, delta, A, Bm, Cm, D, z, bias, h0 = _inputs(2, 6, 5, t, seed=t)
    want, want_h = naive_scan(u, delta, A, Bm, Cm, D, z, bias, h0)
    state = h0.clone()
    got = kernels.selective_scan(u, delta, A, Bm, Cm, D, z, bias, state)
    assert_close(got, want, 1e-4)
    assert_close(state, want_h, 1e-4)


def test_scan_without_state_starts_from_zero():
    u, delta, A, Bm, Cm, D, z, bias, _ = _inputs(1, 4, 3, 50, seed=0)
    want, _ = naive_scan(u, delta, A, Bm, Cm, D, z, bias, torch.zeros(1, 4, 3))
    assert_close(kernels.selective_scan(u, delta, A, Bm, Cm, D, z, bias, None), want, 1e-4)


def test_state_update_equals_one_scan_step():
    u, delta, A, Bm, Cm, D, z, bias, h0 = _inputs(3, 8, 4, 1, seed=9)
    s1, s2 = h0.clone(), h0.clone()
    a = kernels.selective_scan(u, delta, A, Bm, Cm, D, z, bias, s1)[..., 0]
    b = kernels.selective_state_update(s2, u[..., 0], delta[..., 0], A, Bm[..., 0], Cm[..., 0], D, z[..., 0], bias)
    assert_close(a, b)
    assert_close(s1, s2)


def test_conv_continues_from_state():
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(2, 5, 20, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    whole = kernels.causal_conv1d(x, w, bias, None, "silu")
    ref = F.silu(F.conv1d(x, w[:, None], bias, padding=3, groups=5)[..., :20])
    assert_close(whole, ref)
    state = torch.zeros(2, 5, 3)
    parts = torch.cat([kernels.causal_conv1d(x[..., a:b], w, bias, state, "silu")
                       for a, b in [(0, 2), (2, 3), (3, 11), (11, 20)]], dim=-1)
    assert_close(parts, whole)
    assert torch.equal(state, x[..., -3:])


def test_scan_gradients_match_sequential_recurrence():
    # training (tools/train_tiny.py) backpropagates through the chunked scan
    inputs = [x.requires_grad_() for x in _inputs(2, 6, 5, 70, seed=3)[:-1]]
    weight = torch.randn(2, 6, 70, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad((kernels.selective_scan(*inputs, None) * weight).sum(), inputs)
    want_y, _ = naive_scan(*inputs, torch.zeros(2, 6, 5))
    want = torch.autograd.grad((want_y * weight.double()).sum(), inputs)
    for g, w in zip(got, want):
        assert_close(g, w, 1e-3)
