"""Sampling as pure functions on logits (B, V): nothing here knows the model, cache or tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits (B, V) -> tokens (B,)
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (history (B, L), logits) -> logits


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # a token is dropped when the tokens before it already reach p; the most likely one always stays
    drop = (probs.cumsum(-1) - probs) >= p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def apply_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below p times that of the most likely token."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.amax(-1, keepdim=True), float("-inf"))


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 generator: torch.Generator | None = None) -> Sampler:
    """A function from logits to tokens; temperature 0 is greedy (argmax) and ignores the other knobs."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")
    if temperature == 0:
        return lambda logits: logits.argmax(-1)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / temperature
        logits = apply_min_p(apply_top_p(apply_top_k(logits, top_k), top_p), min_p)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    return sample


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """CTRL-style penalty (as in transformers): logits of tokens already seen are divided by `penalty`
    when positive and multiplied by it when negative."""
    if penalty <= 0:
        raise ValueError(f"repetition penalty must be > 0, got {penalty}")

    def process(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if history.numel() == 0 or penalty == 1.0:
            return logits
        seen = logits.gather(-1, history)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        return logits.scatter(-1, history, seen)

    return process


@dataclass(frozen=True)
class SamplingParams:
    """The sampling knobs in one value; the defaults are greedy decoding with no penalty."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, config: dict) -> SamplingParams:
        """Defaults a checkpoint's generation_config.json asks for, read with transformers' semantics:
        the sampling knobs apply only when `do_sample` is true (else greedy), with transformers' own
        defaults (temperature 1.0, top_k 50) for the ones it leaves out."""
        def get(key, default):
            value = config.get(key)
            return default if value is None else value

        penalty = float(get("repetition_penalty", 1.0))
        if not config.get("do_sample"):
            return cls(repetition_penalty=penalty)
        return cls(temperature=float(get("temperature", 1.0)), top_k=int(get("top_k", 50)),
                   top_p=float(get("top_p", 1.0)), min_p=float(get("min_p", 0.0)), repetition_penalty=penalty)

    def override(self, **values) -> SamplingParams:
        """A copy with the given knobs replaced; None means keep the current value."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def sampler(self, generator: torch.Generator | None = None) -> Sampler:
        return make_sampler(self.temperature, self.top_k, self.top_p, self.min_p, generator=generator)

    def logits_processors(self) -> list[LogitsProcessor]:
        return [] if self.repetition_penalty == 1.0 else [repetition_penalty(self.repetition_penalty)]
