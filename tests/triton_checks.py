"""Our Triton kernels against the PyTorch path, in Triton's CPU interpreter (TRITON_INTERPRET=1).

Run by test_fastpaths.py in a fresh interpreter (the variable must be set before Triton compiles anything);
prints `ok <check>` for each check that passes. Sizes are small and odd so masks and tails are exercised.
"""

import sys

import torch
import torch.nn.functional as F

from jamba_cli import kernels, triton_gemv as G, triton_ops as T

g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g)


def close(a, b, tol):
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err < tol, err


def check_rms_norm():
    x = randn(3, 5, 40)
    xs, w = x[..., 8:32], randn(24)
    close(T.rms_norm(xs, w, 1e-6), kernels.rms_norm(xs, w, 1e-6), 1e-6)
    h, y = randn(7, 40), randn(7, 40)
    total, normed = T.add_rms_norm(h, y, w[:1].expand(40).contiguous(), 1e-6)
    close(total, h + y, 1e-7)
    close(normed, kernels.rms_norm(h + y, w[:1].expand(40), 1e-6), 1e-6)


def check_silu_mul():
    gate, up = randn(7, 2, 50).unbind(1)
    close(T.silu_mul(gate, up), F.silu(gate) * up, 1e-6)


def check_gemv():
    for k in (40, 64):  # a K tail, and K a multiple of BLOCK_K
        x, w = randn(3, k), randn(37, k)
        close(G.gemv(x, w, config=(8, 32, 1, 1)), F.linear(x, w), 1e-6)


def check_swiglu_experts():
    X, I, H, t, k = 5, 48, 32, 3, 2
    gu, dn, xx, router = randn(X, 2 * I, H), randn(X, H, I), randn(t, H), randn(X, H)
    logits = F.linear(xx, router)
    wt, idx = logits.softmax(-1).topk(k)
    ref = torch.zeros(t, H)
    for a in range(t):
        for j in range(k):
            gate, up = F.linear(xx[a], gu[idx[a, j]]).chunk(2)
            ref[a] += wt[a, j] * F.linear(F.silu(gate) * up, dn[idx[a, j]])
    close(G.router_logits(xx, router), logits, 1e-6)
    out = G.swiglu_mlp(xx, gu[:, :I], gu[:, I:], dn, logits, k, configs=((16, 16, 1, 1), (16, 32, 1, 1)))
    close(out, ref, 1e-5)


def check_swiglu_dense():
    for I, H in ((48, 40), (64, 32)):  # K tails, and K a multiple of BLOCK_K
        gate, up, down, x = randn(I, H), randn(I, H), randn(H, I), randn(1, H)
        ref = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
        close(G.swiglu_mlp(x, gate, up, down, configs=((8, 16, 1, 1), (8, 16, 1, 1))), ref, 1e-5)


def check_mamba_step():
    b, e, n, r, k = 2, 40, 8, 7, 4
    xz = randn(b, 2 * e)
    conv_w, conv_b = randn(e, k), randn(e)
    x_proj, dt_proj, dt_bias = randn(r + 2 * n, e) * 0.2, randn(e, r) * 0.3, randn(e)
    norms = [1 + 0.1 * randn(m) for m in (r, n, n)]
    A, D = -torch.exp(randn(e, n)), randn(e)
    conv0, ssm0 = randn(b, e, k - 1), randn(b, e, n)
    # the PyTorch path: the chain MambaMixer._step runs without the fused kernels
    conv, ssm = conv0.clone(), ssm0.clone()
    u, z = xz.chunk(2, dim=-1)
    u = kernels.causal_conv1d_update(u, conv_w, conv_b, conv, "silu")
    dt, Bm, Cm = F.linear(u, x_proj).split([r, n, n], dim=-1)
    dt, Bm, Cm = (kernels.rms_norm(v, w, 1e-6) for v, w in zip((dt, Bm, Cm), norms))
    ref = kernels.selective_state_update(ssm, u, F.linear(dt, dt_proj), A, Bm, Cm, D, z, dt_bias)
    conv2, ssm2 = conv0.clone(), ssm0.clone()
    for config in ((16, (8, 16, 1, 1), 8), (64, (4, 64, 1, 1), 64)):  # several programs per sequence, and one
        conv2.copy_(conv0), ssm2.copy_(ssm0)
        y = T.mamba_step(xz, conv2, conv_w, conv_b, x_proj, *norms, 1e-6, dt_proj, dt_bias, A, D, ssm2, config=config)
        close(y, ref, 1e-5)
        close(ssm2, ssm, 1e-5)
        assert torch.equal(conv2, conv)


def check_moe_combine():
    t, k, h = 9, 2, 40
    idx = torch.randint(0, 4, (t, k), generator=g)
    order = idx.flatten().argsort(stable=True)
    y, w = randn(t * k, h), randn(t, k).softmax(-1)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(t * k)
    close(T.moe_combine(y, slot.view(t, k), w), kernels.moe_combine(y, order, w), 1e-6)


def check_initial_state():
    b, e, n, t = 2, 24, 16, 100
    y0, zf, h0 = randn(b, e, t), randn(b, t, 2 * e), randn(b, e, n)
    cum, A = torch.rand(b, e, t, generator=g).cumsum(-1) * 0.1, -torch.exp(randn(e, n))
    Cf = randn(b, t, 5 + 2 * n)
    z, Cm = zf[..., e:].transpose(1, 2), Cf[..., 5 + n:].transpose(1, 2)  # strided, as the model passes them
    ref = (y0 + torch.einsum("betn,ben,bnt->bet", torch.exp(cum[..., None] * A[:, None]), h0, Cm)) * F.silu(z)
    close(T.add_initial_state(y0, z, cum, A, Cm, h0), ref, 1e-5)


if __name__ == "__main__":
    for name in sys.argv[1:] or [n for n in dir() if n.startswith("check_")]:
        globals()[name]()
        print("ok", name)
