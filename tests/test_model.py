"""Our model against transformers' JambaForCausalLM on checkpoints it saved itself."""

import pytest
import torch

from jamba_cli.generation import generate_step
from jamba_cli.loader import load
from conftest import CONFIGS, assert_close


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers(checkpoints, name):
    directory, reference = checkpoints[name]
    model, _ = load(directory, dtype="fp32", device="cpu")
    ids = torch.randint(3, 300, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids).logits
        got = model(ids)
    assert got.shape == want.shape == (2, 45, model.config.vocab_size)
    assert_close(got, want)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_equals_transformers(checkpoints, name):
    directory, reference = checkpoints[name]
    model, _ = load(directory, dtype="fp32", device="cpu")
    prompt = torch.tensor([1, 40, 41, 42, 43, 44, 45])
    with torch.no_grad():
        want = reference.generate(prompt[None], max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 7:]
    got = torch.cat(list(generate_step(model, prompt, max_tokens=32)))
    assert got.tolist() == want.tolist()
    assert len(set(got.tolist())) > 4  # a real continuation, not one token repeated


def test_bf16_as_close_to_fp32_as_transformers_bf16(checkpoints):
    # A random 16-layer model amplifies rounding (MoE routes flip), so bf16 is judged against the
    # reference run in bf16: our error must be no larger than transformers' own.
    import copy

    directory, reference = checkpoints["mini"]
    m16, _ = load(directory, dtype="bf16", device="cpu")
    assert m16.dtype == torch.bfloat16
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = reference(ids).logits
        ref16 = copy.deepcopy(reference).to(torch.bfloat16)(ids).logits.float()
        ours = m16(ids).float()
    cos = lambda a: torch.nn.functional.cosine_similarity(a.flatten(), exact.flatten(), dim=0).item()
    assert torch.isfinite(ours).all()
    assert cos(ours) > 0.9 and cos(ours) > cos(ref16) - 0.03


def test_last_only_returns_the_last_position(mini):
    model, _ = mini
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(model(ids, last_only=True), model(ids)[:, -1:], 1e-5)


def test_moe_routing_is_not_renormalised(checkpoints):
    # Jamba weights experts by their raw softmax probabilities; renormalising the top-k would change the
    # output of every MoE layer. Compare one layer with a hand-written reference.
    directory, _ = checkpoints["mini"]
    model, _ = load(directory, dtype="fp32", device="cpu")
    moe = model.model.layers[1].feed_forward
    x = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        probs = moe.router(x[0]).softmax(-1)
        w, idx = probs.topk(2, dim=-1)
        want = torch.zeros(5, model.config.hidden_size)
        for t in range(5):
            for j in range(2):
                e = idx[t, j]
                g, u = (moe.experts.gate_up_proj[e] @ x[0, t]).chunk(2)
                want[t] += w[t, j] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(g) * u))
        assert_close(moe(x)[0], want, 1e-5)
        assert w.sum(-1).max() < 0.999  # the test would not tell the two apart otherwise
