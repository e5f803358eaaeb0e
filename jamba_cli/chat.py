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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from .cache import MambaCache, make_cache
from .errors import ChatTemplateError, ContextOverflowError, JambaError
from .features import Features, Reply, ReplyReader
from .files import file_kind, open_regular, remove_stale_temporaries, temporary_name
from .generation import GenerationStats, on_single_gpu, stream_generate
from .prompt_cache import common_prefix
from .quant import is_quantized
from .reasoning import prompt_opens_thinking, template_thinks
from .sample import SamplingParams

FORMAT = "jamba-chat/1"
ROLES = ("user", "assistant", "tool")
# Tokens that start a message in the two Jamba chat formats: a restore point is kept just before each
MESSAGE_STARTS = ("<|bom|>", "<|im_start|>")
# The deepest restore points kept (each holds every Mamba layer's state; a template rewrites only the last
# few messages, so the deepest are the ones reused)
MAX_RESTORE_POINTS = 8


@dataclass(frozen=True)
class ChatChunk:
    """One step of a reply: its pieces as (kind, text), kind "reasoning" or "content"; the token sampled;
    on the last chunk the finish reason and the finished `Reply` (answer, reasoning, tool calls, citations)."""

    pieces: list
    token: int | None
    finish_reason: str | None
    stats: GenerationStats
    reply: Reply | None = None

    @property
    def text(self) -> str:
        """The answer's text in this chunk (reasoning apart)."""
        return "".join(t for kind, t in self.pieces if kind == "content")

    @property
    def reasoning(self) -> str:
        return "".join(t for kind, t in self.pieces if kind == "reasoning")
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
        features: tools, documents, citation mode and thinking switches for every turn.
        special: keep control tokens (`<|eom|>`, `<|im_start|>`...) in the replies' text.

    Restore points: a template may render earlier turns differently once the conversation goes on (the
    Reasoning-3B template drops the thinking of earlier replies). Before each message-start token the cache
    passes, its Mamba states are kept (attention K/V can be cut at any position), so that a turn whose
    rendering changed restores the deepest point whose tokens are unchanged and computes only the rest.

    Raises:
        ChatTemplateError: the tokenizer has no chat format.
        UsageError: `features` asks for what the chat template cannot do.
    """

    def __init__(self, model, tokenizer, *, name: str = "", system: str | None = None,
                 sampling: SamplingParams | None = None, context_size: int | None = None,
                 features: Features | None = None, special: bool = True):
        if not tokenizer.has_chat_format:
            raise ChatTemplateError("this model has no chat template, so it cannot chat")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.features = features or Features()
        self.features.check(tokenizer)
        self.special = special
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
        # (position, Mamba states there): each has seen exactly seen[:position], whose K/V the cache holds
        self._points: list[tuple[int, list]] = []
        self._starts = {i for i in map(tokenizer.token_to_id, MESSAGE_STARTS) if i is not None}
        self.last_reply: Reply | None = None

    @property
    def context_used(self) -> int:
        """Tokens of the context the conversation holds now."""
        return self.cache.offset

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def ask(self, text: str, should_stop: Callable[[], bool]) -> Iterator[ChatChunk]:
        """Add a user message and stream the reply, which joins the conversation when it ends.

        Raises:
            ContextOverflowError: the conversation with this message does not fit the context; the message
                is not kept.
        """
        self.messages.append({"role": "user", "content": text})
        return self._reply(should_stop, self.sampling, undo=self.messages.pop)

    def tool_result(self, name: str, content, should_stop: Callable[[], bool]) -> Iterator[ChatChunk]:
        """Feed a tool's result (text, or a value sent as JSON) back as a `tool` message and stream the reply
        that continues from it."""
        from .tools import tool_result

        self.messages.append(tool_result(name, content))
        return self._reply(should_stop, self.sampling, undo=self.messages.pop)

    def regenerate(self, should_stop: Callable[[], bool]) -> Iterator[ChatChunk]:
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
        self.seen, self._snapshot, self._points = [], None, []

    @torch.inference_mode()  # the cache's buffers were made in inference mode; only there can they change
    def _restore(self, snapshot) -> None:
        cache, tokens = snapshot
        self.cache.restore(cache)
        self.seen = list(tokens)
        self._points = [p for p in self._points if p[0] <= len(tokens)]

    def _keep_point(self, position: int) -> None:
        """Keep the Mamba states now, the cache holding `position` tokens."""
        states = [(layer.conv.clone(), layer.ssm.clone()) for layer in self.cache.layers
                  if isinstance(layer, MambaCache)]
        self._points = [p for p in self._points if p[0] != position] + [(position, states)]
        self._points = sorted(self._points, key=lambda p: p[0])[-MAX_RESTORE_POINTS:]

    @torch.inference_mode()
    def _restore_point(self, position: int, states: list) -> None:
        layers = [layer for layer in self.cache.layers if isinstance(layer, MambaCache)]
        for layer, (conv, ssm) in zip(layers, states):
            layer.conv.copy_(conv)
            layer.ssm.copy_(ssm)
        self.cache.seek(position)  # K/V before it are those of seen[:position]; later ones are rewritten
        self.seen = self.seen[:position]
        self._points = [p for p in self._points if p[0] <= position]

    @torch.inference_mode()
    def _unseen(self, ids: list[int]) -> list[int]:
        """Bring the cache to the longest state it can reuse for `ids`; return the tokens still to feed: the
        tokens seen extend to `ids`, else the deepest restore point or the snapshot within what `ids` shares
        with them, else nothing is reused."""
        if self.seen is not None and len(self.seen) < len(ids) and ids[:len(self.seen)] == self.seen:
            return ids[len(self.seen):]
        shared = common_prefix(self.seen, ids) if self.seen is not None else 0
        point = max((p for p in self._points if p[0] <= shared and p[0] < len(ids)), default=None,
                    key=lambda p: p[0])
        if self._snapshot is not None:
            tokens = self._snapshot[1]
            if len(tokens) < len(ids) and ids[:len(tokens)] == tokens and (point is None or len(tokens) >= point[0]):
                self._restore(self._snapshot)
                return ids[len(tokens):]
        if point is not None:
            self._restore_point(*point)
            return ids[point[0]:]
        self.cache.reset()
        self.seen, self._points = [], []
        return ids

    def _render(self) -> tuple[list[int], bool]:
        """The conversation's ids with a generation prompt, and whether the prompt leaves `<think>` open."""
        kwargs = self.features.template_kwargs(self.tokenizer)
        # a conversation longer than the context is refused before it is tokenized whole
        ids = self.tokenizer.encode_chat(self.conversation(), add_generation_prompt=True, limit=self.context_size,
                                         **kwargs)
        thinking = template_thinks(self.tokenizer.chat_template) and prompt_opens_thinking(
            self.tokenizer.apply_chat_template(self.conversation(), add_generation_prompt=True, **kwargs))
        return ids, thinking

    def _reply(self, should_stop, sampling: SamplingParams, undo: Callable[[], object]) -> Iterator[ChatChunk]:
        """Stream a reply to the conversation; `undo` takes back the change to the messages that asked for it
        when no reply can start (the template fails, or the conversation does not fit the context)."""
        try:
            ids, thinking = self._render()
        except JambaError:
            undo()
            raise
        new = self._unseen(ids)
        with torch.inference_mode():
            self._snapshot = (self.cache.snapshot(), list(self.seen))
        base = len(self.seen)
        points = [i - base for i in range(base + 1, len(ids)) if ids[i] in self._starts]
        reader = ReplyReader(self.features, thinking)
        sampled, self.last_reply = [], None
        try:
            for chunk in stream_generate(self.model, self.tokenizer, new, sampling, cache=self.cache,
                                         context_size=self.context_size, should_stop=should_stop,
                                         logits_processors=self.features.logits_processors(self.tokenizer, thinking),
                                         special=self.special, restore_points=points,
                                         on_restore_point=lambda p: self._keep_point(base + p)):
                if chunk.token is not None:
                    sampled.append(chunk.token)
                pieces = reader.feed(chunk.text)
                reply = None
                if chunk.finish_reason is not None:
                    more, reply = reader.finish()
                    pieces += more
                    self.last_reply = reply
                yield ChatChunk(pieces, chunk.token, chunk.finish_reason, chunk.stats, reply)
        except ContextOverflowError:
            undo()
            raise
        except BaseException:
            self.seen, self._points = None, []
            raise
        if sampled:
            self.seen = self.seen + new + sampled[:-1]
        else:  # stopped inside the prompt: the cache holds part of it
            self._restore(self._snapshot)
        if self.last_reply is None:  # the stream ended without a last chunk
            self.last_reply = reader.finish()[1]
        message = self.last_reply.message()
        message["content"] = message["content"].strip()
        self.messages.append(message)

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
            raise bad(f"messages[{i}].role", f"must be {', '.join(ROLES[:-1])} or {ROLES[-1]}, "
                                             f"not {json.dumps(message.get('role'))}")
        if not isinstance(message.get("content"), str):
            raise bad(f"messages[{i}].content", f"must be text, not {_json_kind(message.get('content'))}")
        kept = {"role": message["role"], "content": message["content"]}
        for key in ("reasoning_content", "name"):  # a reasoning model's thinking; a tool's name
            if message.get(key) is not None:
                if not isinstance(message[key], str):
                    raise bad(f"messages[{i}].{key}", f"must be text, not {_json_kind(message[key])}")
                kept[key] = message[key]
        if message.get("tool_calls") is not None:
            kept["tool_calls"] = _saved_calls(message["tool_calls"], f"messages[{i}].tool_calls", bad)
        if message.get("citations") is not None:
            cited = message["citations"]
            if not (isinstance(cited, list) and all(isinstance(c, dict) and isinstance(c.get("document_id"), int)
                                                    and not isinstance(c["document_id"], bool) for c in cited)):
                raise bad(f"messages[{i}].citations", "must be a list of {\"document_id\": N} objects")
            kept["citations"] = [{"document_id": c["document_id"]} for c in cited]
        messages.append(kept)
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


def _saved_calls(calls, key: str, bad) -> list[dict]:
    """An assistant message's saved `tool_calls`, as `tools.history_calls` writes them."""
    if not isinstance(calls, list):
        raise bad(key, f"must be a list, not {_json_kind(calls)}")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad(f"{key}[{j}]", "must be an object with a \"function\" that has a \"name\"")
        entry = {"type": "function", "function": {"name": function["name"],
                                                  "arguments": function.get("arguments", {})}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _state_path(path: Path) -> Path:
    return path.with_name(path.name + ".state")
