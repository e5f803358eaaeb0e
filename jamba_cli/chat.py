"""A conversation with the model whose state only ever moves forward: the library side of `jamba chat`.

The hybrid cache cannot be trimmed (a Mamba state cannot forget a token), so each turn feeds only the
tokens the cache has not seen. Before a reply the cache is snapshotted; `regenerate`, and a re-rendered
history that no longer extends what the cache saw, restart from that snapshot instead of from zero.
Nothing here prints: the REPL (repl.py) shows what a session returns and raises.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from .cache import make_cache
from .errors import ChatTemplateError, ContextOverflowError, JambaError
from .generation import GenerationChunk, on_single_gpu, stream_generate
from .quant import is_quantized
from .sample import SamplingParams

FORMAT = "jamba-chat/1"


class ChatSession:
    """Messages, the cache that has seen them (`seen` lists its tokens), and a snapshot before the last reply.

    Args:
        name: what to call the model (saved with the conversation).
        system: the system prompt.
        sampling: how replies are sampled; its seed seeds every reply but those of `regenerate`.
        context_size: most tokens the conversation may hold (default: the model's max_position_embeddings).

    Raises:
        ChatTemplateError: the tokenizer has no chat format.
    """

    def __init__(self, model, tokenizer, *, name: str = "", system: str | None = None,
                 sampling: SamplingParams | None = None, context_size: int | None = None):
        if not tokenizer.has_chat_format:
            raise ChatTemplateError("this model has no chat template, so it cannot chat")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.system = system
        self.sampling = sampling or SamplingParams()
        self.stats = False  # whether the REPL prints a stats line after each reply; saved with the conversation
        self.context_size = context_size or model.config.max_position_embeddings
        self.messages: list[dict] = []
        # on one GPU the cache is static, sized by the context, so that every reply decodes as replays of
        # one captured CUDA graph; elsewhere, or where the whole context does not fit, it grows with the
        # conversation
        self.cache = None
        if on_single_gpu(model) and not is_quantized(model):
            try:
                self.cache = make_cache(model.config, 1, dtype=model.dtype, device=model.layer_devices(),
                                        capacity=self.context_size, static=True)
            except torch.OutOfMemoryError:
                pass
        if self.cache is None:
            self.cache = make_cache(model.config, 1, dtype=model.dtype, device=model.layer_devices())
        self.seen: list[int] | None = []  # None: the cache's content is unknown (a turn died half way)
        self._snapshot = None

    @property
    def context_used(self) -> int:
        """Tokens of the context the conversation holds now."""
        return self.cache.offset

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def ask(self, text: str, should_stop: Callable[[], bool]) -> Iterator[GenerationChunk]:
        """Add a user message and stream the reply, which joins the conversation when it ends.

        Raises:
            ContextOverflowError: the conversation with this message does not fit the context; the message
                is not kept.
        """
        self.messages.append({"role": "user", "content": text})
        return self._reply(should_stop, self.sampling)

    def regenerate(self, should_stop: Callable[[], bool]) -> Iterator[GenerationChunk]:
        """Stream the last reply again, sampled with a fresh seed, in place of the old one."""
        if not self.messages or self.messages[-1]["role"] != "assistant" or self._snapshot is None:
            raise JambaError("there is no reply to regenerate")
        self.messages.pop()
        self._restore(self._snapshot)
        return self._reply(should_stop, replace(self.sampling, seed=secrets.randbelow(2**31)))

    @torch.inference_mode()
    def clear(self) -> None:
        self.messages.clear()
        self.cache.reset()
        self.seen, self._snapshot = [], None

    @torch.inference_mode()  # the cache's buffers were made in inference mode; only there can they change
    def _restore(self, snapshot) -> None:
        cache, tokens = snapshot
        self.cache.restore(cache)
        self.seen = list(tokens)

    @torch.inference_mode()
    def _unseen(self, ids: list[int]) -> list[int]:
        """Bring the cache to the longest state it can reuse for `ids`; return the tokens still to feed."""
        if self.seen is not None and len(self.seen) < len(ids) and ids[:len(self.seen)] == self.seen:
            return ids[len(self.seen):]
        if self._snapshot is not None:
            tokens = self._snapshot[1]
            if len(tokens) < len(ids) and ids[:len(tokens)] == tokens:
                self._restore(self._snapshot)
                return ids[len(tokens):]
        self.cache.reset()
        self.seen = []
        return ids

    def _reply(self, should_stop, sampling: SamplingParams) -> Iterator[GenerationChunk]:
        ids = self.tokenizer.encode_chat(self.conversation(), add_generation_prompt=True)
        new = self._unseen(ids)
        with torch.inference_mode():
            self._snapshot = (self.cache.snapshot(), list(self.seen))
        sampled, pieces = [], []
        try:
            for chunk in stream_generate(self.model, self.tokenizer, new, sampling, cache=self.cache,
                                         context_size=self.context_size, should_stop=should_stop):
                if chunk.token is not None:
                    sampled.append(chunk.token)
                pieces.append(chunk.text)
                yield chunk
        except ContextOverflowError:
            self.messages.pop()
            raise
        except BaseException:
            self.seen = None
            raise
        self.seen = self.seen + new + sampled[:-1]
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    def save(self, path: Path) -> None:
        """Write the conversation to `path` (JSON) and the model state next to it, as `path`.state."""
        from . import prompt_cache

        data = {"format": FORMAT, "model": self.name, "system": self.system, "messages": self.messages,
                "settings": {**asdict(self.sampling), "stats": self.stats}}
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise JambaError(f"cannot write {path}: {e.strerror or e}") from None
        if self.seen:
            prompt_cache.save(_state_path(path), self.model, self.cache, self.seen)

    def load(self, path: Path) -> list[str]:
        """Take the conversation from a `save` file, and the model state too when `path`.state fits this
        model; settings already changed from their defaults (on the command line) win over saved ones.

        Returns:
            notes for the user: why the saved model state was not used (the conversation is then
            recomputed on the next turn), or nothing.

        Raises:
            JambaError: the file is not a conversation saved by a chat session; the session is unchanged.
        """
        from . import prompt_cache

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError
            messages = [{"role": str(m["role"]), "content": m["content"]} for m in data["messages"]]
            saved = dict(data.get("settings") or {})
            unset = SamplingParams()
            sampling = replace(self.sampling, **{f.name: saved[f.name] for f in fields(SamplingParams)
                                                 if f.name in saved and getattr(self.sampling, f.name)
                                                 == getattr(unset, f.name)})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # SamplingError is a ValueError
            raise JambaError(f"{path} is not a conversation saved by jamba chat") from None
        self.clear()
        self.messages, self.system, self.sampling = messages, data.get("system") or self.system, sampling
        self.stats = self.stats or bool(saved.get("stats"))
        state = _state_path(Path(path))
        if state.exists():
            try:
                with torch.inference_mode():  # as in _restore: the cache's buffers may be inference tensors
                    self.seen = prompt_cache.load(state, self.model, self.cache)
            except JambaError as e:
                return [f"{e}; the conversation will be recomputed"]
        return []


def _state_path(path: Path) -> Path:
    return path.with_name(path.name + ".state")
