"""Generation: a token generator over the hybrid cache, and `generate`, which joins its output into text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .cache import HybridCache, make_cache
from .model import JambaForCausalLM
from .sample import LogitsProcessor, Sampler, make_sampler
from .tokenizer import Tokenizer


class CUDAGraphDecoder:
    """One decode step of `model` over a static `cache`, captured once as a CUDA graph and replayed.

    A replay launches every kernel of the step at once (no Python, no launch gaps) and advances the
    cache's device position itself; `__call__` keeps the host-side offset in step.
    """

    def __init__(self, model: JambaForCausalLM, cache: HybridCache):
        if not cache.static:
            raise ValueError("CUDA graphs need a static cache (make_cache(..., static=True))")
        self.cache = cache
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=model.device)
        snapshot = cache.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                model(self.tokens, cache)
        torch.cuda.current_stream().wait_stream(stream)
        cache.copy_(snapshot)  # undo the warm-up steps
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, cache)[:, -1]  # (B, V)
        cache.offset = snapshot.offset  # capturing ran the Python side of the step, not its kernels

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.reserve(1)
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        self.cache.offset += 1
        return self.logits


def prefill_chunk_size(model: JambaForCausalLM) -> int:
    """Tokens per prefill pass: on a GPU as many as fit (up to 64K) in 60% of the free memory, counting
    what one token's activations take in an MoE layer (about 250 KB for Jamba-Mini in bf16, measured)."""
    if model.device.type != "cuda":
        return 4096
    c = model.config
    per_token = model.dtype.itemsize * (c.num_experts_per_tok * (2 * c.hidden_size + 3 * c.intermediate_size)
                                        + 4 * c.d_inner + 2 * c.hidden_size)
    free = torch.cuda.mem_get_info(model.device)[0] + torch.cuda.memory_reserved(model.device) \
        - torch.cuda.memory_allocated(model.device)
    n = 2048
    while n < 65536 and 2 * n * per_token <= 0.6 * free:
        n *= 2
    return n


@torch.inference_mode()
def generate_step(model: JambaForCausalLM, prompt: torch.Tensor, *, cache: HybridCache | None = None,
                  sampler: Sampler | None = None, logits_processors: Sequence[LogitsProcessor] = (),
                  max_tokens: int = 256, prefill_chunk: int | None = None,
                  attention_mask: torch.Tensor | None = None, cuda_graph: bool = True) -> Iterator[torch.Tensor]:
    """Yield sampled tokens (B,) one step at a time, for `max_tokens` steps.

    Args:
        prompt: token ids (T,) or (B, T): the tokens to add to `cache` (a new one when None).
        prefill_chunk: the prompt goes through the model this many tokens at a time (bounded memory;
            default: `prefill_chunk_size(model)`).
        attention_mask: (B, T) with 0 on left padding of a batched prompt.
        cuda_graph: on CUDA with a static cache (the default cache there), replay decode steps as a
            captured CUDA graph.
    """
    if prompt.dim() == 1:
        prompt = prompt[None]
    prompt = prompt.to(model.device)
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty: there is no token to continue from")
    single_gpu = {d.type for d in model.layer_devices()} == {"cuda"} and len(set(model.layer_devices())) == 1
    if cache is None:
        cache = make_cache(model.config, prompt.shape[0], dtype=model.dtype, device=model.layer_devices(),
                           capacity=prompt.shape[1] + max_tokens, static=single_gpu)
    sampler = sampler or make_sampler()
    prefill_chunk = prefill_chunk or prefill_chunk_size(model)
    history = prompt
    for start in range(0, prompt.shape[1], prefill_chunk):
        chunk = slice(start, start + prefill_chunk)
        mask = None if attention_mask is None else attention_mask[:, chunk]
        logits = model(prompt[:, chunk], cache, attention_mask=mask, last_only=True)
    step = None
    if cuda_graph and single_gpu and cache.static and max_tokens > 1:
        step = CUDAGraphDecoder(model, cache)
    logits = logits[:, -1]
    for i in range(max_tokens):
        logits = logits.float()
        for process in logits_processors:
            logits = process(history, logits)
        token = sampler(logits)
        yield token
        if i == max_tokens - 1:
            break
        if logits_processors:
            history = torch.cat([history, token[:, None]], dim=1)
        logits = step(token) if step is not None else model(token[:, None], cache)[:, -1]


def generate(model: JambaForCausalLM, tokenizer: Tokenizer, prompt: str | list[int], *, max_tokens: int,
             temperature: float = 0.0, seed: int | None = None) -> str:
    """Continue `prompt` and return the new text (without the prompt, stopping at an EOS token).

    A string is tokenized the way the checkpoint's tokenizer does by default (BOS included when it adds
    one); a list of ids is used as is: no template, no BOS added.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    sampler = make_sampler(temperature, generator=generator)
    eos = set(model.config.eos_token_ids) | ({tokenizer.eos_token_id} - {None})
    out: list[int] = []
    for token in generate_step(model, torch.tensor(ids), sampler=sampler, max_tokens=max_tokens):
        t = int(token[0])
        if t in eos:
            break
        out.append(t)
    return tokenizer.decode(out)
