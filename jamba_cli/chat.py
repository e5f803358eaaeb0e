"""`jamba chat`: a conversation whose model state only ever moves forward, and the REPL around it.

The hybrid cache cannot be trimmed (a Mamba state cannot forget a token), so each turn feeds only the
tokens the cache has not seen. Before a reply the cache is snapshotted; /regen, and a re-rendered
history that no longer extends what the cache saw, restart from that snapshot instead of from zero.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .cache import make_cache
from .errors import JambaError
from .generation import ContextOverflowError, GenerationChunk, on_single_gpu, stream_generate
from .quant import is_quantized
from .terminal import Interrupt, stats_line

FORMAT = "jamba-chat/1"
EXIT_COMMANDS = ("/bye", "/exit", "/quit")
COMMANDS = ("/help", *EXIT_COMMANDS, "/clear", "/system", "/set", "/show", "/regen", "/read", "/save", "/load")
HELP = """Commands:
  /help                 this help
  /bye  /exit  /quit    leave (Ctrl+D too)
  /clear                forget the conversation (the system prompt stays)
  /system [TEXT]        set the system prompt; without TEXT, remove it
  /set KEY VALUE        temperature, top_k, top_p, min_p, repetition_penalty, seed, max_tokens,
                        stop (TEXT or off), ignore_eos (on/off), stats (on/off)
  /show                 parameters, model, system prompt, context used
  /regen                answer the last message again (a fresh sample; greedy gives the same)
  /read FILE            send FILE's text with your next message
  /save FILE            save the conversation as JSON, and the model state as FILE.state
  /load FILE            continue a conversation saved with /save
  \"\"\"                   start or end a multi-line message;  //text sends text that starts with /
Ctrl+C stops a reply (the partial reply is kept); Ctrl+C twice quits."""


@dataclass
class ChatSettings:
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stats: bool = False

    def set(self, key: str, value: str) -> None:
        """Set one knob from text (as typed after /set); raises JambaError on a bad key or value."""
        key = {"temp": "temperature", "n": "max_tokens"}.get(key, key).replace("-", "_")
        kinds = {f.name: f.type for f in fields(self)}  # annotations as strings: "int | None", "bool", ...
        if key not in kinds:
            raise JambaError(f"unknown setting {key!r}; settable: {', '.join(kinds)}")
        try:
            if key == "stop":
                parsed = [] if value.lower() in ("", "off", "none") else [value]
            elif kinds[key] == "bool":
                parsed = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}[value.lower()]
            else:
                parsed = (int if kinds[key].startswith("int") else float)(value)
        except (KeyError, ValueError):
            raise JambaError(f"bad value {value!r} for {key}") from None
        if key in _IN_RANGE and not _IN_RANGE[key](parsed):
            raise JambaError(f"{value} is out of range for {key}")
        setattr(self, key, parsed)


_IN_RANGE = {"temperature": lambda v: v >= 0, "top_p": lambda v: 0 < v <= 1, "min_p": lambda v: 0 <= v < 1,
             "repetition_penalty": lambda v: v > 0, "max_tokens": lambda v: v >= 0, "top_k": lambda v: v >= 0}


class ChatSession:
    """Messages, the cache that has seen them (`seen` lists its tokens), and a snapshot before the last reply."""

    def __init__(self, model, tokenizer, *, name: str, system: str | None = None,
                 settings: ChatSettings | None = None, context_size: int | None = None):
        if not tokenizer.has_chat_format:
            raise JambaError("this model has no chat template, so it cannot chat; use: jamba run --raw")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.system = system
        self.settings = settings or ChatSettings()
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

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def ask(self, text: str, should_stop: Callable[[], bool]) -> Iterator[GenerationChunk]:
        self.messages.append({"role": "user", "content": text})
        return self._reply(should_stop, self.settings.seed)

    def regenerate(self, should_stop: Callable[[], bool]) -> Iterator[GenerationChunk]:
        if not self.messages or self.messages[-1]["role"] != "assistant" or self._snapshot is None:
            raise JambaError("there is no reply to regenerate")
        self.messages.pop()
        self._restore(self._snapshot)
        return self._reply(should_stop, secrets.randbelow(2**31))

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

    def _reply(self, should_stop, seed) -> Iterator[GenerationChunk]:
        ids = self.tokenizer.encode_chat(self.conversation(), add_generation_prompt=True)
        new = self._unseen(ids)
        with torch.inference_mode():
            self._snapshot = (self.cache.snapshot(), list(self.seen))
        s = self.settings
        sampled, pieces = [], []
        try:
            for chunk in stream_generate(self.model, self.tokenizer, new, cache=self.cache, seed=seed,
                                         context_size=self.context_size, should_stop=should_stop,
                                         max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                                         top_p=s.top_p, min_p=s.min_p, repetition_penalty=s.repetition_penalty,
                                         stop=s.stop, ignore_eos=s.ignore_eos):
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
        from . import prompt_cache

        data = {"format": FORMAT, "model": self.name, "system": self.system, "messages": self.messages,
                "settings": asdict(self.settings)}
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise JambaError(f"cannot write {path}: {e.strerror or e}") from None
        if self.seen:
            prompt_cache.save(_state_path(path), self.model, self.cache, self.seen)

    def load(self, path: Path, console) -> None:
        """Take the conversation (and the model state, when FILE.state fits this model) from a /save file;
        settings given on the command line win over saved ones."""
        from . import prompt_cache

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError
            messages = [{"role": str(m["role"]), "content": m["content"]} for m in data["messages"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise JambaError(f"{path} is not a conversation saved by jamba chat") from None
        self.clear()
        self.messages, self.system = messages, data.get("system") or self.system
        default = ChatSettings()
        for key, value in (data.get("settings") or {}).items():
            if hasattr(default, key) and getattr(self.settings, key) == getattr(default, key):
                setattr(self.settings, key, value)
        state = _state_path(Path(path))
        if state.exists():
            try:
                with torch.inference_mode():  # as in _restore: the cache's buffers may be inference tensors
                    self.seen = prompt_cache.load(state, self.model, self.cache)
            except JambaError as e:
                console.print(f"note: {e}; the conversation will be recomputed", style="yellow", soft_wrap=True)


def _state_path(path: Path) -> Path:
    return path.with_name(path.name + ".state")


def history_file() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "jamba" / "history"


class _Input:
    """Messages from the terminal (readline editing, history) or, when stdin is not a TTY, from its lines."""

    def __init__(self, interactive: bool, history: bool):
        self.interactive = interactive
        self.history = None
        self.readline = None
        if interactive:
            try:
                import readline
            except ImportError:  # Windows without pyreadline
                return
            self.readline = readline
            readline.set_completer(lambda text, n: ([c for c in COMMANDS if c.startswith(text)] + [None])[n])
            readline.set_completer_delims(" \t\n")
            readline.parse_and_bind("bind ^I rl_complete" if "libedit" in (readline.__doc__ or "")
                                    else "tab: complete")
            if history:
                self.history = history_file()
                self.history.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.close(os.open(self.history, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
                os.chmod(self.history, 0o600)  # private even if it was created otherwise
                readline.set_history_length(1000)
                readline.read_history_file(self.history)

    def line(self, prompt: str) -> str | None:
        if not self.interactive:
            line = sys.stdin.readline()
            return None if line == "" else line.rstrip("\n")
        try:
            if sys.stdout.isatty():
                text = input(prompt)
            else:  # keep stdout for the replies
                sys.stderr.write(prompt)
                text = input()
        except EOFError:
            return None
        if self.history is not None and text.strip():
            self.readline.append_history_file(1, self.history)
        return text

    def message(self) -> str | None:
        """One message: a line, or the lines between \"\"\" marks. None at end of input."""
        line = self.line(">>> ")
        if line is None or not line.startswith('"""'):
            return line
        rest = line[3:]
        if len(rest) >= 3 and rest.rstrip().endswith('"""'):
            return rest.rstrip()[:-3]
        lines = [rest] if rest else []
        while (more := self.line("... ")) is not None:
            if more.rstrip().endswith('"""'):
                if more.rstrip()[:-3]:
                    lines.append(more.rstrip()[:-3])
                break
            lines.append(more)
        return "\n".join(lines)

    def buffer(self) -> str:
        return self.readline.get_line_buffer() if self.readline else ""


def repl(session: ChatSession, console, *, history: bool = True, load_s: float | None = None) -> int:
    """Run the conversation until /bye or end of input; returns the exit status."""
    interactive = sys.stdin.isatty()
    reader = _Input(interactive, history)
    if interactive:
        console.print(f"{session.name} is ready. /help lists the commands; /bye or Ctrl+D leaves.", style="dim")
    attachment = ""
    while True:
        try:
            text = reader.message()
        except KeyboardInterrupt:
            if not interactive:
                raise
            console.print("" if reader.buffer().strip() else "(to leave: /bye or Ctrl+D)", style="dim")
            continue
        if text is None:
            if interactive:
                console.print()
            return 0
        if not text.strip():
            continue
        if text.startswith("/") and not text.startswith("//"):
            command, _, arg = text.strip().partition(" ")
            if command in EXIT_COMMANDS:
                return 0
            try:
                if command == "/regen":
                    _show_reply(session, console, session.regenerate)
                elif command == "/read":
                    attachment += _read_file(arg.strip())
                    console.print(f"read {arg.strip()}; it goes with your next message", style="dim")
                else:
                    _command(session, console, command, arg.strip())
            except JambaError as e:
                console.print(f"error: {e}", style="red", soft_wrap=True, markup=False)
            continue
        if text.startswith("//"):
            text = text[1:]
        if attachment:
            text, attachment = f"{attachment}\n\n{text}", ""
        _show_reply(session, console, lambda stop: session.ask(text, stop))


def _read_file(name: str) -> str:
    if not name:
        raise JambaError("usage: /read FILE")
    try:
        return Path(name).expanduser().read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise JambaError(f"cannot read {name}: {e.strerror or e}") from None


def _show_reply(session: ChatSession, console, start) -> None:
    """Stream one reply to stdout; the first Ctrl+C stops it and keeps what was said."""
    out = sys.stdout
    last = None
    with Interrupt() as interrupt:
        try:
            for chunk in start(lambda: interrupt.requested):
                last = chunk
                if chunk.text:
                    out.write(chunk.text)
                    out.flush()
        except ContextOverflowError as e:
            console.print(f"context full: {e}. /clear starts over; --ctx-size raises the limit",
                          style="red", soft_wrap=True, markup=False)
            return
    out.write("\n")
    out.flush()
    if last.finish_reason == "interrupted":
        console.print("[reply interrupted]", style="dim", markup=False)
    elif last.finish_reason == "length" and session.cache.offset + 1 >= session.context_size:
        console.print("context full: the reply was cut. /clear starts over; --ctx-size raises the limit",
                      style="red", soft_wrap=True)
    if session.settings.stats:
        console.print(stats_line(last.stats, last.finish_reason, None, session.model.device.type), style="dim",
                      soft_wrap=True)


def _command(session: ChatSession, console, command: str, arg: str) -> None:
    say = lambda text, **kw: console.print(text, soft_wrap=True, markup=False, highlight=False, **kw)
    if command == "/help":
        say(HELP)
    elif command == "/clear":
        session.clear()
        say("conversation cleared", style="dim")
    elif command == "/system" or (command == "/set" and arg.startswith("system")):
        text = arg.removeprefix("system").strip() if command == "/set" else arg
        session.system = text or None
        say(f"system prompt {'set' if text else 'removed'}", style="dim")
    elif command == "/set":
        key, _, value = arg.partition(" ")
        if not key:
            raise JambaError("usage: /set KEY VALUE (see /help)")
        session.settings.set(key, value.strip())
        say(f"{key} = {value.strip() or 'off'}", style="dim")
    elif command == "/show":
        params = ", ".join(f"{k}={v}" for k, v in asdict(session.settings).items() if v not in (None, [], False))
        say(f"model: {session.name}\nparameters: {params or 'checkpoint defaults'}\n"
            f"system: {session.system or '(none)'}\ncontext: {session.cache.offset} of {session.context_size} "
            f"tokens used, {len(session.messages)} messages")
    elif command in ("/save", "/load"):
        if not arg:
            raise JambaError(f"usage: {command} FILE")
        path = Path(arg).expanduser()
        if command == "/save":
            session.save(path)
            say(f"saved to {path}", style="dim")
        else:
            session.load(path, console)
            say(f"loaded {len(session.messages)} messages from {path}", style="dim")
    else:
        raise JambaError(f"unknown command {command}; /help lists them")
