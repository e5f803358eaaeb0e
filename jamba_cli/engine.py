"""The generation engine under `jamba serve`: one request at a time over one cache, resuming each prompt from
the longest exact state already computed for its first tokens.

Like a chat session (chat.py), the engine keeps one working cache, static with one CUDA graph on a single
GPU, and knows which tokens it holds (`seen`). A request is served from the longest of two starts: the
working cache itself when the prompt extends what it holds (a conversation's next turn), or an entry of the
prefix cache (prefix_cache.py) restored into it in place. Only the rest of the prompt is computed, stopping to
store the state at:

- the `boundaries` the caller gives (where a message ends: a system prompt, a document shared by requests);
- every `snapshot_every` tokens of a long prompt (positions that are multiples of it, so that prompts sharing
  a long start line up);
- the prompt's last position but one (a regenerate: the same prompt again computes one token);
- the end of the prompt, once the first token is sampled (a next turn extends the prompt, whatever the
  reply's tokens are when the client sends them back), and the end of the reply (the next turn when the
  reply comes back as it was sampled).

Generation itself is `stream_generate` over the working cache, so sampling, stop strings, EOS and the chunks
are exactly those of a cold run; the statistics are made the request's (`cached_tokens`: positions not
computed for it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch

from .cache import HybridCache, make_cache
from .errors import ContextOverflowError, UsageError
from .generation import (GenerationChunk, GenerationStats, _peak_memory, _reset_peak_memory, on_single_gpu,
                         prefill, stream_generate)
from .prefix_cache import PrefixCache
from .quant import is_quantized
from .sample import LogitsProcessor, SamplingParams

# Entries kept by default: for Jamba Mini a 64K-token conversation is about 1 GiB of K/V plus 16 MiB per Mamba
# snapshot, so this holds a few long conversations or many short ones
DEFAULT_CACHE_BUDGET = 4 << 30
SNAPSHOT_EVERY = 4096


def _seeing(prefix: Sequence[int], processors: Sequence[LogitsProcessor]) -> list[LogitsProcessor]:
    """`processors` given the history with `prefix` before it: the tokens the cache held before the ones
    `stream_generate` is given, which a cold run's processors see as prompt."""
    if not processors or not prefix:
        return list(processors)
    held: list[torch.Tensor] = []

    def seeing(process: LogitsProcessor) -> LogitsProcessor:
        def run(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            if not held:
                held.append(torch.tensor(prefix, device=history.device).view(1, -1))
            return process(torch.cat([held[0].expand(history.shape[0], -1), history], dim=1), logits)
        return run

    return [seeing(p) for p in processors]


@dataclass(frozen=True)
class _Continued(SamplingParams):
    """Sampling options whose own logits processors (the repetition penalty) also see `prefix`."""

    prefix: tuple[int, ...] = ()

    def logits_processors(self) -> list[LogitsProcessor]:
        return _seeing(self.prefix, super().logits_processors())


class Engine:
    """Streams replies to whole prompts (token ids), reusing the hybrid states of earlier ones.

    Args:
        context_size: most positions a prompt and its reply may take (default: the model's
            max_position_embeddings).
        cache_budget: most bytes the prefix cache keeps (K/V and Mamba states; 0: none); the working cache
            is apart from it.
        snapshot_every: tokens between the states kept inside a long prompt.
        cache_device: where the prefix cache keeps entries ("cpu": host memory); default beside each layer.

    Not thread-safe: one request at a time.
    """

    def __init__(self, model, tokenizer, *, context_size: int | None = None,
                 cache_budget: int = DEFAULT_CACHE_BUDGET, snapshot_every: int = SNAPSHOT_EVERY,
                 cache_device: str | torch.device | None = None):
        if snapshot_every < 1:
            raise UsageError(f"`snapshot_every` must be at least 1, not {snapshot_every}")
        if cache_budget < 0:
            raise UsageError(f"`cache_budget` must be >= 0 bytes, not {cache_budget}")
        self.model, self.tokenizer = model, tokenizer
        self.context_size = context_size or model.config.max_position_embeddings
        self.snapshot_every = snapshot_every
        self.prefix = PrefixCache(cache_budget, cache_device)
        self.cache = self._working_cache()
        self.seen: list[int] | None = []  # the tokens `cache` holds; None: unknown (a request failed half way)
        self._requests = self._hits = self._reused = 0
        self._current = 0  # the request whose stream may still move the cache (an older one left open may not)

    def _working_cache(self) -> HybridCache:
        # as in a chat session: static (sized by the context) on one GPU, so that every reply replays one
        # captured CUDA graph; else, or where the whole context does not fit, growing with the requests
        with torch.inference_mode():  # the buffers change in place, in inference mode only
            if on_single_gpu(self.model) and not is_quantized(self.model):
                try:
                    return make_cache(self.model.config, 1, dtype=self.model.dtype,
                                      device=self.model.layer_devices(), capacity=self.context_size, static=True)
                except torch.OutOfMemoryError:
                    pass
            return make_cache(self.model.config, 1, dtype=self.model.dtype, device=self.model.layer_devices())

    def stats(self) -> dict:
        """entries and bytes (per device) of the prefix cache, its budget, requests served, hits (requests that
        reused a state) and tokens_reused (prompt positions not computed)."""
        return {**self.prefix.stats(), "requests": self._requests, "hits": self._hits,
                "tokens_reused": self._reused}

    @torch.inference_mode()
    def clear(self) -> None:
        """Forget every state: the prefix cache's entries and what the working cache holds."""
        self.prefix.clear()
        self.cache.reset()
        self.seen = []
        self._current = 0  # a stream still open cannot go on over the cleared cache

    def stream(self, ids: Sequence[int], params: SamplingParams, *, boundaries: Sequence[int] = (),
               should_stop: Callable[[], bool] = lambda: False, special: bool = True,
               logits_processors: Sequence[LogitsProcessor] = ()) -> Iterator[GenerationChunk]:
        """Stream the reply to the prompt `ids` (the chat template already applied), as `stream_generate`
        does for it cold: the same chunks, texts and tokens; `stats.cached_tokens` counts the prompt
        positions restored rather than computed.

        Args:
            params: how to sample; options left None take the checkpoint's generation_config.json.
            boundaries: positions in `ids` where a message ends: states are kept there for later prompts.
            should_stop: polled between the prompt's chunks and between tokens; True ends the stream with
                finish_reason "interrupted".
            special, logits_processors: as for `stream_generate` (the processors see the whole prompt).

        Raises (at the call, before any work):
            UsageError: `ids` is empty.
            ContextOverflowError: the prompt does not fit `context_size`.
        """
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("the prompt is empty: there is no token to continue from")
        if len(ids) > self.context_size:
            raise ContextOverflowError(f"the prompt needs {len(ids)} tokens but the context holds {self.context_size}")
        params = (params or SamplingParams()).resolve(self.tokenizer.generation_config)
        return self._run(ids, params, [int(b) for b in boundaries], should_stop,
                         dict(special=special, logits_processors=list(logits_processors)))

    def _run(self, ids: list[int], params: SamplingParams, boundaries: list[int], should_stop: Callable[[], bool],
             options: dict) -> Iterator[GenerationChunk]:
        start = time.perf_counter()
        head = self.model.lm_head.weight.device
        _reset_peak_memory(head)
        self._requests += 1
        self._current = request = self._requests
        cached = self._resume(ids)
        if cached:
            self._hits += 1
            self._reused += cached
        end = len(ids) - 1  # the last prompt token is left to stream_generate, which samples from its logits
        points = sorted(p for p in {*boundaries, *range(self.snapshot_every, end, self.snapshot_every), end}
                        if cached < p <= end)
        done, sampled = cached, []
        whole = torch.tensor(ids, device=self.model.device)[None]
        self.seen = None  # until the cache is known again
        try:
            for point in points:
                if prefill(self.model, whole[:, done:point], self.cache, should_stop=should_stop) is None:
                    break
                done = point
                self.prefix.insert(ids[:done], self.cache)
            if done < end:  # stopped inside the prompt: nothing sampled
                self.seen = ids[:self.cache.offset]
                self._store(self.seen)
                ttft = time.perf_counter() - start
                yield GenerationChunk("", None, "interrupted",
                                      GenerationStats(len(ids), cached, 0, ttft, (self.cache.offset - cached) / ttft,
                                                      0.0, _peak_memory(head)))
                return
            sampling = _Continued(**{f.name: getattr(params, f.name) for f in fields(SamplingParams)},
                                  prefix=tuple(ids[:done]))
            peak = _peak_memory(head)  # stream_generate measures its own part from a reset
            offset = time.perf_counter() - start
            inner = stream_generate(self.model, self.tokenizer, ids[done:], sampling, cache=self.cache,
                                    context_size=self.context_size, should_stop=should_stop,
                                    special=options["special"],
                                    logits_processors=_seeing(ids[:done], options["logits_processors"]))
            try:
                for chunk in inner:
                    if chunk.token is not None:
                        sampled.append(chunk.token)
                    yield replace(chunk, stats=self._request_stats(chunk.stats, ids, cached, offset, peak))
                    if request != self._current:
                        raise RuntimeError("a later request has taken the engine's cache: this stream cannot go on")
                    if len(sampled) == 1:  # the state after the whole prompt, before the first token goes in
                        self._store(ids)
            finally:
                inner.close()
        except GeneratorExit:  # the consumer stopped: the cache holds what was fed, consistently
            if request == self._current:  # not a stream left open that another request has overtaken
                self._finish(ids + sampled)
            raise
        except BaseException:
            if request == self._current:
                self.seen = None  # an error part way through a step may leave the layers inconsistent
            raise
        self._finish(ids + sampled)

    def _request_stats(self, inner: GenerationStats, ids: list[int], cached: int, offset: float,
                       peak: int) -> GenerationStats:
        """`stream_generate`'s statistics of the prompt's tail, made those of the whole request."""
        ttft = inner.ttft_s + offset
        computed = min(self.cache.offset, len(ids)) - cached  # less where stopped inside the prompt
        return replace(inner, prompt_tokens=len(ids), cached_tokens=cached, ttft_s=ttft,
                       prompt_tps=computed / ttft if ttft > 0 else 0.0,
                       peak_memory_bytes=max(peak, inner.peak_memory_bytes))

    def _finish(self, tokens: list[int]) -> None:
        self.seen = tokens[:self.cache.offset]
        self._store(self.seen)

    def _store(self, tokens: list[int]) -> None:
        if tokens and self.cache.offset == len(tokens):
            self.prefix.insert(tokens, self.cache)

    @torch.inference_mode()
    def _resume(self, ids: list[int]) -> int:
        """Bring the working cache to the longest state it can start `ids` from, leaving at least the last
        token to compute; return that state's position."""
        limit = len(ids) - 1
        entry = self.prefix.lookup(ids, limit)
        stored = entry.end if entry is not None else 0
        seen = self.seen
        if seen is not None and stored <= len(seen) <= limit and ids[:len(seen)] == seen:
            return len(seen)  # the cache holds a start of this prompt already: continue in place
        self.seen = None
        if entry is not None:
            n = self.prefix.restore(entry, self.cache)
        else:
            self.cache.reset()
            n = 0
        self.seen = ids[:n]
        return n
