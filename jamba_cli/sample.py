"""Sampling: its options as one value (`SamplingParams`), and samplers as pure functions on logits (B, V).

Nothing here knows the model, cache or tokenizer. Nothing here imports torch either (the functions use tensor
methods), so the CLI can build and check a `SamplingParams` before anything heavy is loaded.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from .defaults import MAX_TOKENS
from .errors import ConfigError, SamplingError

if TYPE_CHECKING:
    import torch

Sampler = Callable[["torch.Tensor"], "torch.Tensor"]  # logits (B, V) -> tokens (B,)
LogitsProcessor = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # (history (B, L), logits) -> logits

# The rules of the options, here and nowhere else: option -> (kind, test, rule with {0} for the option's name).
# SamplingParams checks them when it is made, so the CLI flags, /set in the chat, a saved chat's settings and
# the Python API all get the same ones. The bounds keep values away from internal errors:
# - temperature: the logits are divided by it in float32. At 1e-45 (subnormal) every logit overflows to inf
#   and sampling fails. 0.01 is the floor (vLLM clamps there too): it turns a logit gap of 0.25 into odds of
#   e^25 to 1, so anything colder is greedy decoding (temperature 0) in all but overflow.
# - repetition_penalty: seen logits are divided or multiplied by it; at 1e-300 they overflow, and beyond
#   0.01..100 a seen token is as good as forced or banned already.
# - seed: what torch.Generator.manual_seed takes (an unsigned 64-bit number); top_k: torch.topk's int32, far
#   beyond any vocabulary (a k at least the vocabulary's size is off).
MIN_TEMPERATURE = 0.01
RANGES = {
    "max_tokens": (int, lambda v: v >= 0, "{0} >= 0"),
    "temperature": (float, lambda v: v == 0 or MIN_TEMPERATURE <= v < math.inf,
                    f"{{0}} = 0 or {MIN_TEMPERATURE} <= {{0}} < inf"),
    "top_k": (int, lambda v: 0 <= v < 2**31, "0 <= {0} < 2^31"),
    "top_p": (float, lambda v: 0 < v <= 1, "0 < {0} <= 1"),
    "min_p": (float, lambda v: 0 <= v < 1, "0 <= {0} < 1"),
    "repetition_penalty": (float, lambda v: 0.01 <= v <= 100, "0.01 <= {0} <= 100"),
    "seed": (int, lambda v: 0 <= v < 2**64, "0 <= {0} < 2^64"),
}
_KINDS = {int: (numbers.Integral, "an integer"), float: (numbers.Real, "a number")}


def check_ranges(**values) -> None:
    """Check options by RANGES; None (not given) passes.

    Raises:
        TypeError: an option is not of its kind (a bool is no number here).
        SamplingError: an option is out of its range (NaN is out of every range).
    """
    for name, value in values.items():
        if value is None:
            continue
        kind, ok, rule = RANGES[name]
        accepted, what = _KINDS[kind]
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise TypeError(f"{name} must be {what}, not {type(value).__name__}")
        if not ok(value):
            raise SamplingError(name, value, rule)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
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
    check_ranges(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if temperature == 0:
        return lambda logits: logits.argmax(-1)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / temperature
        logits = apply_min_p(apply_top_p(apply_top_k(logits, top_k), top_p), min_p)
        return logits.softmax(-1).multinomial(1, generator=generator).squeeze(-1)

    return sample


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """CTRL-style penalty (as in transformers): logits of tokens already seen are divided by `penalty`
    when positive and multiplied by it when negative."""
    check_ranges(repetition_penalty=penalty)

    def process(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if history.numel() == 0 or penalty == 1.0:
            return logits
        seen = logits.gather(-1, history)
        seen = (seen * penalty).where(seen < 0, seen / penalty)
        return logits.scatter(-1, history, seen)

    return process


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a reply: the one value the CLI, the chat session and the Python API pass around.

    A field left None takes the checkpoint's generation_config.json (`resolve`), else greedy decoding and
    `defaults.MAX_TOKENS` (512) new tokens at most. The options are checked on construction by `RANGES`:
    a value of the wrong type is a TypeError, one out of range a SamplingError (a ValueError).
    """

    max_tokens: int | None = None  # most tokens to sample
    temperature: float | None = None  # 0: greedy
    top_k: int | None = None  # sample from the k most likely tokens; 0: off
    top_p: float | None = None  # nucleus: the most likely tokens up to this probability mass; 1: off
    min_p: float | None = None  # drop tokens below this fraction of the top probability; 0: off
    repetition_penalty: float | None = None  # 1: off
    seed: int | None = None  # None: a random one
    stop: tuple[str, ...] = ()  # texts that end the reply; matched on decoded text and left out of it
    ignore_eos: bool = False  # keep going past end-of-text tokens

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop or ()
        stop = tuple(stop) if isinstance(stop, Iterable) else None
        if stop is None or not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop must be a text or a sequence of texts, not {self.stop!r}")
        object.__setattr__(self, "stop", stop)  # a list or None is taken too; a tuple is kept, so the value hashes
        check_ranges(**{name: getattr(self, name) for name in RANGES})
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be True or False, not {type(self.ignore_eos).__name__}")

    @classmethod
    def from_generation_config(cls, config: dict) -> SamplingParams:
        """Every option as a checkpoint's generation_config.json asks, read with transformers' semantics:
        the sampling knobs apply only when `do_sample` is true (else greedy), with transformers' own
        defaults (temperature 1.0, top_k 50) for the ones it leaves out.

        Raises:
            ConfigError: a value in the file is of the wrong type or out of range.
        """
        def get(key, default):
            value = config.get(key)
            return default if value is None else value

        greedy = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
        try:
            knobs = greedy if not config.get("do_sample") else dict(
                temperature=float(get("temperature", 1.0)), top_k=int(get("top_k", 50)),
                top_p=float(get("top_p", 1.0)), min_p=float(get("min_p", 0.0)))
            return cls(max_tokens=int(config.get("max_new_tokens") or MAX_TOKENS),
                       repetition_penalty=float(get("repetition_penalty", 1.0)), **knobs)
        except (SamplingError, TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"generation_config.json: {e}") from None

    def resolve(self, generation_config: dict) -> SamplingParams:
        """A copy with every option left None taken from `generation_config` (`from_generation_config`)."""
        return self.from_generation_config(generation_config).override(
            **{f.name: getattr(self, f.name) for f in fields(self)})

    def override(self, **values) -> SamplingParams:
        """A copy with the given options replaced; None means keep the current value."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def sampler(self, generator: torch.Generator | None = None) -> Sampler:
        """The sampler for these options (one left None is off; temperature None is greedy)."""
        return make_sampler(_given(self.temperature, 0.0), _given(self.top_k, 0), _given(self.top_p, 1.0),
                            _given(self.min_p, 0.0), generator=generator)

    def logits_processors(self) -> list[LogitsProcessor]:
        penalty = _given(self.repetition_penalty, 1.0)
        return [] if penalty == 1.0 else [repetition_penalty(penalty)]


def _given(value, default):
    return default if value is None else value
