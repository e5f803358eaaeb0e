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
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from .cache import make_cache
from .errors import ChatTemplateError, ContextOverflowError, JambaError
from .files import file_kind, open_regular, remove_stale_temporaries, temporary_name
from .generation import GenerationChunk, on_single_gpu, stream_generate
from .quant import is_quantized
from .sample import SamplingParams

FORMAT = "jamba-chat/1"
ROLES = ("user", "assistant")
# A file read into a conversation (/read, /load) cannot fit the context when it has more bytes than this per
# token of the context: tokens of real text average 3-5 bytes, the longest (runs of spaces) a few dozen. The
# bound keeps /read of /dev/zero or a huge file from growing memory without end.
MAX_BYTES_PER_TOKEN = 64


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
        return self._reply(should_stop, self.sampling, undo=self.messages.pop)

    def regenerate(self, should_stop: Callable[[], bool]) -> Iterator[GenerationChunk]:
        """Stream the last reply again, sampled with a fresh seed, in place of the old one."""
        if not self.messages or self.messages[-1]["role"] != "assistant" or self._snapshot is None:
            raise JambaError("there is no reply to regenerate")
        last = self.messages.pop()
        self._restore(self._snapshot)
        return self._reply(should_stop, replace(self.sampling, seed=secrets.randbelow(2**31)),
                           undo=lambda: self.messages.append(last))

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

    def _reply(self, should_stop, sampling: SamplingParams, undo: Callable[[], object]) -> Iterator[GenerationChunk]:
        """Stream a reply to the conversation; `undo` takes back the change to the messages that asked for it
        when no reply can start (the template fails, or the conversation does not fit the context)."""
        try:
            # a conversation longer than the context is refused before it is tokenized whole
            ids = self.tokenizer.encode_chat(self.conversation(), add_generation_prompt=True,
                                             limit=self.context_size)
        except JambaError:
            undo()
            raise
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
            undo()
            raise
        except BaseException:
            self.seen = None
            raise
        if sampled:
            self.seen = self.seen + new + sampled[:-1]
        else:  # stopped inside the prompt: the cache holds part of it
            self._restore(self._snapshot)
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    @property
    def max_input_bytes(self) -> int:
        """The most bytes a message or a file read into the conversation may have: more cannot fit the context."""
        return MAX_BYTES_PER_TOKEN * self.context_size

    def save(self, path: Path) -> None:
        """Write the conversation to `path` (JSON, mode 0600) and the model state next to it, as `path`.state.

        Either file is replaced only when it is a regular file; both are checked before either is written, and
        each is written atomically (a crash leaves the old file or the new one). A `.state` from an earlier
        save that this one has no state for is removed, so it cannot be taken for this conversation's.

        Raises:
            JambaError: a target exists and is no regular file (nothing was written), or cannot be written
                (the conversation file was not).
        """
        from . import prompt_cache

        path = Path(path)
        existing_targets(path)
        state = _state_path(path)
        data = {"format": FORMAT, "model": self.name, "system": self.system, "messages": self.messages,
                "settings": {**asdict(self.sampling), "stats": self.stats}}
        tmp = None
        try:
            # named after this process, so that one a killed save leaves is removed by the next save here
            remove_stale_temporaries(path.parent)
            tmp = temporary_name(path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, ensure_ascii=False, indent=1))
                f.flush()
                os.fsync(f.fileno())
            if self.seen:  # the state first: if it cannot be written, the conversation file stays as it was
                prompt_cache.save(state, self.model, self.cache, self.seen)
            else:
                state.unlink(missing_ok=True)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            raise JambaError(f"cannot write {path}: {e.strerror or e}") from None
        finally:
            if tmp is not None:
                os.unlink(tmp)

    def load(self, path: Path) -> list[str]:
        """Take the conversation from a `save` file, and the model state too when `path`.state fits this
        model; settings already changed from their defaults (on the command line) win over saved ones.

        Every value in the file is checked (types, the sampling ranges, roles) and the conversation must
        render through the chat template before anything is taken.

        Returns:
            notes for the user: why the saved model state was not used (the conversation is then
            recomputed on the next turn), or nothing.

        Raises:
            JambaError: the file cannot be read, or is not a conversation saved by a chat session; the message
                names the file and the key at fault. The session is unchanged.
        """
        from . import prompt_cache

        path = Path(path)
        raw = read_file(path, self.max_input_bytes)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep, a number too long
            raise JambaError(f"{path} is not a conversation saved by jamba chat (not JSON)") from None
        messages, system, saved, stats = _parse_saved(data, path)
        unset = SamplingParams()
        sampling = replace(self.sampling, **{name: value for name, value in saved.items()
                                             if getattr(self.sampling, name) == getattr(unset, name)})
        system = system or self.system
        try:
            self.tokenizer.encode_chat(([{"role": "system", "content": system}] if system else []) + messages,
                                       add_generation_prompt=True)
        except JambaError as e:
            raise JambaError(f"{path}: {e}") from None
        self.clear()
        self.messages, self.system, self.sampling = messages, system, sampling
        self.stats = self.stats or stats
        state = _state_path(path)
        try:
            regular = stat.S_ISREG(os.stat(state).st_mode)
        except OSError:
            return []  # no state saved: the conversation is computed on the next turn
        if not regular:
            return [f"{state} is not a regular file; the conversation will be recomputed"]
        with torch.inference_mode():  # as in _restore: the cache's buffers may be inference tensors
            try:
                self.seen = prompt_cache.load(state, self.model, self.cache, context_size=self.context_size)
            except JambaError as e:
                self.cache.reset()  # a state refused half way may have filled part of the cache
                return [f"{e}; the conversation will be recomputed"]
        return []


def existing_targets(path: Path) -> list[Path]:
    """Which of the files `ChatSession.save(path)` writes exist already: the conversation, its `.state`.

    Raises:
        JambaError: one of them exists and is no regular file (a symbolic link, directory, FIFO, device or
            socket: save never replaces those), or its folder cannot be looked into.
    """
    found = [path] if _is_file(path) else []
    state = _state_path(path)  # only now: "/" (a directory, refused) has no name to add .state to
    return found + [state] if _is_file(state) else found


def _is_file(target: Path) -> bool:
    """Whether `target` exists (as a regular file); JambaError where it is something save never replaces."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise JambaError(f"cannot write {target}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(mode):
        raise JambaError(f"will not write {target}: it is {_kind(mode)}, not a regular file")
    return True


def read_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path` (a symbolic link to one is followed), if it has at most `limit`.

    A FIFO, device or directory is refused before it is read: reading one could block or never end.

    Raises:
        JambaError: the file cannot be read, is no regular file, or is larger than `limit`.
    """
    try:
        fd = open_regular(path)
    except (OSError, ValueError) as e:  # NotRegularFile says what it is instead; ValueError: a NUL in the name
        raise JambaError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        info = os.fstat(fd)
        if info.st_size > limit:
            raise JambaError(f"{path} has {info.st_size:,} bytes, more than the context can hold")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise JambaError(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while we read
        raise JambaError(f"{path} has more than {limit:,} bytes, more than the context can hold")
    return data


def _kind(mode: int) -> str:
    kind = file_kind(mode)
    return "not a regular file" if kind is None else f"a {kind}"


def _json_kind(value) -> str:
    return ("null" if value is None else "true/false" if isinstance(value, bool) else
            "a number" if isinstance(value, (int, float)) else "text" if isinstance(value, str) else
            "a list" if isinstance(value, list) else "an object")


def _parse_saved(data, path: Path) -> tuple[list[dict], str | None, dict, bool]:
    """(messages, system prompt, sampling settings, stats) of a saved conversation, each value checked.

    Raises:
        JambaError: naming the file and the key at fault, e.g. `talk.json: settings.top_k must be an integer`.
    """
    def bad(key: str, problem: str) -> JambaError:
        return JambaError(f"{path}: {key} {problem}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise JambaError(f"{path} is not a conversation saved by jamba chat")
    for key in ("model", "system"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise bad(key, f"must be text, not {_json_kind(data[key])}")
    if not isinstance(data.get("messages"), list):
        raise bad("messages", f"must be a list, not {_json_kind(data.get('messages'))}")
    messages = []
    for i, message in enumerate(data["messages"]):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}]", f"must be an object with a role and a content, not {_json_kind(message)}")
        if message.get("role") not in ROLES:
            raise bad(f"messages[{i}].role", f"must be {' or '.join(ROLES)}, not {json.dumps(message.get('role'))}")
        if not isinstance(message.get("content"), str):
            raise bad(f"messages[{i}].content", f"must be text, not {_json_kind(message.get('content'))}")
        messages.append({"role": message["role"], "content": message["content"]})
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise bad("settings", f"must be an object, not {_json_kind(settings)}")
    saved = {}
    for name in (f.name for f in fields(SamplingParams)):
        if name not in settings:
            continue
        value = settings[name]
        if name == "stop":  # saved as a list; one text alone would be taken for a stop string of its own
            if not isinstance(value, list):
                raise bad("settings.stop", f"must be a list of texts, not {_json_kind(value)}")
            value = tuple(value)
        try:
            SamplingParams(**{name: value})  # the rules of the flags and /set (sample.RANGES)
        except (TypeError, ValueError) as e:  # SamplingError is a ValueError
            raise JambaError(f"{path}: settings.{e}") from None
        saved[name] = value
    stats = settings.get("stats", False)
    if not isinstance(stats, bool):
        raise bad("settings.stats", f"must be true or false, not {_json_kind(stats)}")
    return messages, data.get("system"), saved, stats


def _state_path(path: Path) -> Path:
    return path.with_name(path.name + ".state")
