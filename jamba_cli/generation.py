"""Generation in three layers: `generate_step` yields token ids over the hybrid cache; `stream_generate` turns
them into text chunks (streaming detokenizer, EOS ids, stop strings, timings); `generate` joins the text."""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import torch

from .cache import HybridCache, make_cache
from .errors import ContextOverflowError
from .model import JambaForCausalLM
from .quant import is_quantized
from .sample import LogitsProcessor, Sampler, SamplingParams, make_sampler
from .tokenizer import StreamingDetokenizer, Tokenizer

SAMPLING_OPTIONS = frozenset(f.name for f in fields(SamplingParams))


class CUDAGraphDecoder:
    """One decode step of `model` over a static `cache`, captured once as a CUDA graph and replayed.

    A replay launches every kernel of the step at once (no Python, no launch gaps). The graph holds
    `model.compute`, which reads the position from the cache's device tensor and does not move it; each
    call then advances the cache by one token. The cache is held weakly: it keeps its decoder (`over`),
    and a replay over a freed cache's memory must not happen.
    """

    def __init__(self, model: JambaForCausalLM, cache: HybridCache):
        if not cache.static:
            raise ValueError("CUDA graphs need a static cache (make_cache(..., static=True))")
        self.model, self.key_mask = model, cache.key_mask
        self._cache = weakref.ref(cache)
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=model.device)
        snapshot = cache.snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: Triton compiles, cuBLAS picks its kernels
            for _ in range(min(2, cache.capacity - cache.offset)):  # at the context's end, one step fits
                model(self.tokens, cache)
        torch.cuda.current_stream().wait_stream(stream)
        cache.restore(snapshot)  # undo the warm-up steps
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.compute(self.tokens, cache)[:, -1]  # (B, V)

    @classmethod
    def over(cls, model: JambaForCausalLM, cache: HybridCache) -> CUDAGraphDecoder:
        """The decoder captured over `cache` before, or a new one kept with it: a chat's replies share one
        graph, valid while the cache keeps its buffers (it restores and resets in place)."""
        step = cache.decoder
        if step is None or step.model is not model or step.key_mask is not cache.key_mask:
            step = cache.decoder = cls(model, cache)
        return step

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self._cache()
        if cache is None:
            raise RuntimeError("the cache this decode step was captured over is gone")
        cache.reserve(1)
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        cache.advance(1)
        return self.logits


def prefill_chunk_size(model: JambaForCausalLM) -> int:
    """Tokens per prefill pass: on a GPU as many as fit (up to 64K) in 60% of the free memory, counting
    what one token's activations take in an MoE layer (the experts' gathered rows and their SwiGLU dominate).
    Elsewhere 4096 (`prefill` starts smaller when it must answer Ctrl+C quickly)."""
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
def prefill(model: JambaForCausalLM, tokens: torch.Tensor, cache: HybridCache, *, chunk: int | None = None,
            attention_mask: torch.Tensor | None = None,
            should_stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """Run `tokens` (B, T) through the model into `cache`, `chunk` tokens at a time (bounded memory;
    default: `prefill_chunk_size(model)`). `should_stop` is polled before each chunk.

    Returns:
        the logits of the last position, (B, 1, V); None when `should_stop` stopped it (the cache then
        holds the chunks before).
    """
    logits = None
    chunk = chunk or prefill_chunk_size(model)
    # with a stop to poll on a CPU, where a pass of a large model takes long: start at 512 tokens and double
    # while a pass takes under a quarter second, so Ctrl+C is answered within about a second
    step = chunk if should_stop is None or model.device.type == "cuda" else min(chunk, 512)
    start = 0
    while start < tokens.shape[1]:
        if should_stop is not None and should_stop():
            return None
        began = time.perf_counter()
        part = slice(start, start + step)
        mask = None if attention_mask is None else attention_mask[:, part]
        logits = model(tokens[:, part], cache, attention_mask=mask, last_only=True)
        start += step
        if step < chunk and time.perf_counter() - began < 0.25:
            step = min(chunk, 2 * step)
    return logits


@torch.inference_mode()
def generate_step(model: JambaForCausalLM, prompt: torch.Tensor, *, cache: HybridCache | None = None,
                  sampler: Sampler | None = None, logits_processors: Sequence[LogitsProcessor] = (),
                  max_tokens: int = 256, prefill_chunk: int | None = None,
                  attention_mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                  cuda_graph: bool = True, should_stop: Callable[[], bool] | None = None) -> Iterator[torch.Tensor]:
    """Yield sampled tokens (B,) one step at a time, for `max_tokens` steps.

    A token is fed to the model only when the next one is asked for, so a consumer that stops early
    leaves the cache holding the prompt and every yielded token but the last.

    Args:
        prompt: token ids (T,) or (B, T): the tokens to add to `cache` (a new one when None).
        prefill_chunk: the prompt goes through the model this many tokens at a time (bounded memory;
            default: `prefill_chunk_size(model)`).
        attention_mask: (B, T) with 0 on left padding of a batched prompt.
        context: ids (B, S) already in `cache`; logits processors see them before the prompt.
        cuda_graph: on CUDA with a static cache (the default cache there), replay decode steps as a
            captured CUDA graph.
        should_stop: polled between the prompt's chunks; True ends the stream before any token.
    """
    if prompt.dim() == 1:
        prompt = prompt[None]
    prompt = prompt.to(model.device)
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty: there is no token to continue from")
    single_gpu = on_single_gpu(model)
    if cache is None:
        cache = make_cache(model.config, prompt.shape[0], dtype=model.dtype, device=model.layer_devices(),
                           capacity=prompt.shape[1] + max_tokens, static=single_gpu)
    sampler = sampler or make_sampler()
    history = prompt if context is None else torch.cat([context.to(prompt.device).view(prompt.shape[0], -1),
                                                        prompt], dim=1)
    logits = prefill(model, prompt, cache, chunk=prefill_chunk, attention_mask=attention_mask,
                     should_stop=should_stop)
    if logits is None:
        return
    step = None
    if cuda_graph and single_gpu and cache.static and max_tokens > 1 and not is_quantized(model):
        step = CUDAGraphDecoder.over(model, cache)
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


def on_single_gpu(model: JambaForCausalLM) -> bool:
    """Whether every layer sits on one CUDA device (where static caches and CUDA graphs apply)."""
    devices = set(model.layer_devices())
    return len(devices) == 1 and next(iter(devices)).type == "cuda"


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int  # tokens of this prompt (those restored from a prompt cache included)
    cached_tokens: int  # of which restored from a prompt cache rather than computed
    generation_tokens: int  # sampled tokens, an ending EOS not counted
    ttft_s: float  # time to first token: prompt processing and the first sample
    prompt_tps: float  # computed prompt tokens per second
    generation_tps: float  # tokens per second after the first one
    peak_memory_bytes: int  # peak accelerator memory, or the process's peak RSS on CPU


@dataclass(frozen=True)
class GenerationChunk:
    """One step of a stream: the text it releases, the token sampled (None on a final chunk that sampled
    nothing), and on the last chunk the reason generation ended: stop (an EOS token), length (max_tokens
    or the context is full), stop_string, or interrupted (`should_stop` returned True)."""

    text: str
    token: int | None
    finish_reason: str | None
    stats: GenerationStats


class StopStrings:
    """Find stop strings in streamed text, across chunk boundaries. Text that could be the start of a stop
    string is withheld until it no longer can be; text from a stop string on is dropped."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was found)."""
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.pending = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int] | Sequence[dict],
               limit: int | None = None, template_kwargs: dict | None = None) -> list[int]:
    """A string is tokenized as the tokenizer does by default (BOS included when it adds one), a list of
    messages goes through the chat template with a generation prompt (and `template_kwargs`: tools,
    documents, knobs), and a list of ids is used as is.
    A prompt of more than `limit` tokens raises ContextOverflowError, before a long text is tokenized whole."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, limit=limit)
    if prompt and isinstance(prompt[0], dict):
        return tokenizer.encode_chat(list(prompt), add_generation_prompt=True, limit=limit,
                                     **(template_kwargs or {}))
    return [int(i) for i in prompt]


def stream_generate(model: JambaForCausalLM, tokenizer: Tokenizer, prompt: str | Sequence[int] | Sequence[dict],
                    sampling: SamplingParams | None = None, *, eos_token_ids: Sequence[int] | None = None,
                    cache: HybridCache | None = None, context_size: int | None = None,
                    prompt_cache: str | os.PathLike | None = None, prompt_parts: Sequence[str] | None = None,
                    should_stop: Callable[[], bool] | None = None, prefill_chunk: int | None = None,
                    template_kwargs: dict | None = None, logits_processors: Sequence[LogitsProcessor] = (),
                    special: bool = True, restore_points: Sequence[int] = (),
                    on_restore_point: Callable[[int], None] | None = None,
                    **knobs) -> Iterator[GenerationChunk]:
    """Continue `prompt` and yield a `GenerationChunk` per sampled token; the texts joined are the reply.

    Args:
        prompt: text, chat messages (rendered with the chat template), or token ids (see `prompt_ids`).
        sampling: how to sample; options left None take the checkpoint's generation_config.json, else
            greedy decoding and 512 new tokens at most.
        eos_token_ids: tokens that end generation; default: the model's, the tokenizer's and the
            chat format's end-of-message token.
        cache: continue from this cache (it holds earlier turns); it is appended to. On return it holds
            the prompt and every sampled token but the last.
        context_size: most positions the cache may hold (default: the model's max_position_embeddings).
        prompt_cache: a file with the model state of an earlier prompt (see prompt_cache.py): the longest
            start this prompt shares with it, down to the last position where the file kept the Mamba
            states, is restored and only the rest is computed; then this prompt's state is written back
            (a regular file, mode 0600, replaced atomically).
        prompt_parts: with `prompt_cache`, the texts `prompt` was made of, in order (a document, then a
            question): the file also keeps the state at the end of each, so that a later prompt starting
            with the same parts reuses them whatever follows.
        should_stop: polled between tokens and between the prompt's chunks; True ends the stream with
            finish_reason "interrupted" (stopped in the prompt: on a final chunk with no token, and the cache
            holds part of the prompt).
        template_kwargs: more chat template variables for a prompt of messages (`tools`, `documents`,
            `knobs`, `enable_thinking`: see features.Features.template_kwargs).
        logits_processors: applied after the sampling options' own (a reasoning budget, a grammar).
        special: False leaves control tokens (`tokenizer.control_ids`: `<|eom|>`, `<|pad|>`...) out of the
            chunks' text; their ids are still in `token`.
        restore_points: positions in the prompt where `on_restore_point(position)` is called with the
            cache holding exactly the prompt's first `position` tokens (the prefill stops there), so the
            caller can keep the Mamba states (a chat's message boundaries).
        **knobs: `SamplingParams` fields as keywords (`max_tokens=64, temperature=0.7`), a shorthand
            for `sampling`; one given here (not None) wins over the same one in `sampling`.

    Raises:
        TypeError: a knob is not a `SamplingParams` field (at the call, not at the first chunk).
        SamplingError: a sampling option is out of its range (at the call).
        ContextOverflowError: the prompt does not fit in `context_size`.
        UsageError, PromptCacheError: `prompt_cache` is no regular file, was made by another model or dtype,
            is malformed or cannot be written.
    """
    unknown = sorted(set(knobs) - SAMPLING_OPTIONS)
    if unknown:
        raise TypeError(f"stream_generate() got an unexpected keyword argument {unknown[0]!r}")
    params = (sampling or SamplingParams()).override(**knobs).resolve(tokenizer.generation_config)
    # the stream is a generator, which runs nothing until the first chunk is asked for; the checks above
    # are done here so that a bad argument fails at the call, as Python's own argument errors do
    return _stream(model, tokenizer, prompt, params, eos_token_ids=eos_token_ids, cache=cache,
                   context_size=context_size, prompt_cache=prompt_cache, prompt_parts=prompt_parts,
                   should_stop=should_stop, prefill_chunk=prefill_chunk, template_kwargs=template_kwargs,
                   logits_processors=list(logits_processors), special=special, restore_points=restore_points,
                   on_restore_point=on_restore_point)


def _stream(model, tokenizer, prompt, params: SamplingParams, *, eos_token_ids, cache, context_size, prompt_cache,
            prompt_parts, should_stop, prefill_chunk, template_kwargs, logits_processors, special, restore_points,
            on_restore_point) -> Iterator[GenerationChunk]:
    start = time.perf_counter()
    context_size = context_size or model.config.max_position_embeddings
    # the prompt alone must fit the whole context (a long text is refused before it is tokenized whole);
    # with the tokens already in the cache, below
    ids = prompt_ids(tokenizer, prompt, limit=context_size, template_kwargs=template_kwargs)
    if not ids:
        raise ValueError("the prompt is empty: there is no token to continue from")
    head_device = model.lm_head.weight.device
    sampler = params.sampler(make_generator(params.seed, head_device) if params.temperature > 0 else None)
    if eos_token_ids is None:
        eos_token_ids = [*model.config.eos_token_ids, *tokenizer.eos_token_ids, *tokenizer.end_of_turn_ids]
    eos = set() if params.ignore_eos else set(eos_token_ids)
    interrupted = False

    def stop() -> bool:  # remembered, so that a stop inside the prompt is reported as one
        nonlocal interrupted
        interrupted = interrupted or (should_stop is not None and bool(should_stop()))
        return interrupted

    if prompt_cache is not None and cache is not None:
        raise ValueError("pass either a cache or a prompt cache file, not both")
    used = cache.offset if cache is not None else 0
    if used + len(ids) > context_size:
        raise ContextOverflowError(f"the prompt needs {used + len(ids)} tokens but the context holds {context_size}")
    max_tokens = min(params.max_tokens, context_size - used - len(ids) + 1)  # the last token is never fed back
    if cache is None:
        static = on_single_gpu(model)  # a static cache holds the whole reply; a growing one starts modest
        cache = make_cache(model.config, 1, dtype=model.dtype, device=model.layer_devices(),
                           capacity=len(ids) + (max_tokens if static else min(max_tokens, 4096)), static=static)
    cached = 0
    if prompt_cache is not None:
        from . import prompt_cache as pc

        path = pc.check_target(prompt_cache)  # before any work: a directory, a link or a pipe is refused
        reused = pc.restore(path, model, ids, cache, context_size=context_size)
        cached = reused.length
    _reset_peak_memory(head_device)
    new = torch.tensor(ids[cached:], device=model.device)[None]
    context = torch.tensor(ids[:cached], device=model.device)[None] if cached else None
    if prompt_cache is not None:
        # the file keeps the state before the last prompt token (the model has to see one token to sample),
        # and the Mamba states at the save points: the prefill stops at each to copy them, as a Mamba state
        # cannot be recovered from a later one
        whole = torch.tensor(ids, device=model.device)[None]
        states, done = reused.states, cached
        for point in pc.save_points(tokenizer, prompt, ids, prompt_parts, start=cached,
                                    template_kwargs=template_kwargs):
            prefill(model, whole[:, done:point], cache, chunk=prefill_chunk, should_stop=stop)
            if interrupted:  # the cache holds part of this stretch: nothing of it is saved
                break
            done = point
            if point < len(ids) - 1:
                states[point] = pc.mamba_states(cache)
        if done > cached and not interrupted:  # something was computed: this prompt's state replaces the file's
            pc.save(path, model, cache, ids[:-1], states)
        context, new = whole[:, :-1], whole[:, -1:]
    elif restore_points:
        whole, done = torch.tensor(ids, device=model.device)[None], 0
        for point in sorted(p for p in set(restore_points) if 0 < p < len(ids)):
            prefill(model, whole[:, done:point], cache, chunk=prefill_chunk, should_stop=stop)
            if interrupted:
                break
            done = point
            if on_restore_point is not None:
                on_restore_point(point)
        context, new = (whole[:, :done] if done else None), whole[:, done:]

    steps = generate_step(model, new, cache=cache, sampler=sampler,
                          logits_processors=params.logits_processors() + logits_processors,
                          max_tokens=max_tokens, prefill_chunk=prefill_chunk, context=context, should_stop=stop)
    detok = StreamingDetokenizer(tokenizer, skip=() if special else tokenizer.control_ids)
    stops = StopStrings(params.stop)
    first = last = None
    count = 0

    def stats() -> GenerationStats:
        ttft = (first or time.perf_counter()) - start
        decode_time = (last - first) if first is not None and last is not None else 0.0
        # with no token sampled, the prompt may have been stopped part way: count what the cache took
        computed = len(ids) - cached if first is not None else cache.offset - used - cached
        return GenerationStats(len(ids), cached, count, ttft, computed / ttft if ttft > 0 else 0.0,
                               (count - 1) / decode_time if count > 1 and decode_time > 0 else 0.0,
                               _peak_memory(head_device))

    try:
        for step in steps:
            token = int(step[0])
            last = time.perf_counter()
            first = first or last
            if token in eos:
                yield GenerationChunk(_finish(detok, stops), token, "stop", stats())
                return
            count += 1
            text, hit = stops.feed(detok.add(token))
            if hit:
                yield GenerationChunk(text, token, "stop_string", stats())
                return
            if count == max_tokens:
                yield GenerationChunk(text + _finish(detok, stops), token, "length", stats())
                return
            if stop():
                yield GenerationChunk(text + _finish(detok, stops), token, "interrupted", stats())
                return
            yield GenerationChunk(text, token, None, stats())
        # stopped inside the prompt, or max_tokens was 0
        yield GenerationChunk(_finish(detok, stops), None, "interrupted" if interrupted else "length", stats())
    finally:
        steps.close()


def _finish(detok: StreamingDetokenizer, stops: StopStrings) -> str:
    # the tail the detokenizer held back may itself complete a stop string
    text, hit = stops.feed(detok.flush())
    return text if hit else text + stops.flush()


def generate(model: JambaForCausalLM, tokenizer: Tokenizer, prompt: str | Sequence[int] | Sequence[dict],
             sampling: SamplingParams | None = None, **knobs) -> str:
    """Continue `prompt` and return the new text; takes the same arguments as `stream_generate`.

    A string is tokenized the way the checkpoint's tokenizer does by default (BOS included when it adds
    one); a list of ids is used as is: no template, no BOS added; a list of messages gets the chat template.
    """
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, sampling, **knobs))


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
