"""Generation: a token generator over the hybrid cache, and `generate`, which joins its output into text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .cache import HybridCache, make_cache
from .model import JambaForCausalLM
from .sample import LogitsProcessor, Sampler, make_sampler
from .tokenizer import Tokenizer


@torch.inference_mode()
def generate_step(model: JambaForCausalLM, prompt: torch.Tensor, *, cache: HybridCache | None = None,
                  sampler: Sampler | None = None, logits_processors: Sequence[LogitsProcessor] = (),
                  max_tokens: int = 256, prefill_chunk: int = 2048,
                  attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield sampled tokens (B,) one step at a time, forever or for `max_tokens` steps.

    Args:
        prompt: token ids (T,) or (B, T): the tokens to add to `cache` (a new one when None).
        prefill_chunk: the prompt goes through the model this many tokens at a time (bounded memory).
        attention_mask: (B, T) with 0 on left padding of a batched prompt.
    """
    if prompt.dim() == 1:
        prompt = prompt[None]
    prompt = prompt.to(model.device)
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty: there is no token to continue from")
    if cache is None:
        cache = make_cache(model.config, prompt.shape[0], dtype=model.dtype, device=model.layer_devices(),
                           capacity=prompt.shape[1] + max_tokens)
    sampler = sampler or make_sampler()
    history = prompt
    for start in range(0, prompt.shape[1], prefill_chunk):
        chunk = slice(start, start + prefill_chunk)
        mask = None if attention_mask is None else attention_mask[:, chunk]
        logits = model(prompt[:, chunk], cache, attention_mask=mask, last_only=True)
    for _ in range(max_tokens):
        logits = logits[:, -1].float()
        for process in logits_processors:
            logits = process(history, logits)
        token = sampler(logits)
        yield token
        if logits_processors:
            history = torch.cat([history, token[:, None]], dim=1)
        logits = model(token[:, None], cache)


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
