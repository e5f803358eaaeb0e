"""The `jamba chat` REPL around a `ChatSession`: messages and slash commands in, replies streamed to stdout.

Input comes from the terminal (readline editing, a private history file, \"\"\" blocks) or, when stdin is not
a TTY, from its lines. The slash commands are one table, `COMMANDS`; /help and tab completion are made from it.
Everything but the replies goes to stderr.
"""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .chat import ChatSession
from .errors import ContextOverflowError, JambaError
from .sample import SamplingParams
from .terminal import Interrupt, stats_line

SAMPLING = tuple(f.name for f in fields(SamplingParams))
SETTINGS = (*SAMPLING, "stats")  # what /set takes; stats is the REPL's own
ALIASES = {"temp": "temperature", "n": "max_tokens"}
_ON_OFF = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


class Repl:
    """One chat on the terminal: the session, where messages come from, and a file read for the next message.

    `translate` turns a library message into the command line's words (flags where it names parameters).
    """

    def __init__(self, session: ChatSession, console, reader: _Input, translate: Callable[[str], str] = str):
        self.session, self.console, self.reader, self.translate = session, console, reader, translate
        self.attachment = ""

    def say(self, text: str, **style) -> None:
        self.console.print(text, soft_wrap=True, markup=False, highlight=False, **style)

    def run(self) -> int:
        """Take messages until /bye or the end of input; returns the exit status."""
        interactive = self.reader.interactive
        if interactive:
            self.say(f"{self.session.name} is ready. /help lists the commands; /bye or Ctrl+D leaves.", style="dim")
        while True:
            try:
                text = self.reader.message()
            except KeyboardInterrupt:
                if not interactive:
                    raise
                self.say("" if self.reader.buffer().strip() else "(to leave: /bye or Ctrl+D)", style="dim")
                continue
            if text is None:
                if interactive:
                    self.console.print()
                return 0
            if not text.strip():
                continue
            if text.startswith("/") and not text.startswith("//"):
                name, _, arg = text.strip().partition(" ")
                try:
                    command = TABLE.get(name)
                    if command is None:
                        raise JambaError(f"unknown command {name}; /help lists them")
                    if command.run(self, arg.strip()):
                        return 0
                except JambaError as e:
                    self.say(f"error: {self.translate(str(e))}", style="red")
                continue
            if text.startswith("//"):
                text = text[1:]
            if self.attachment:
                text, self.attachment = f"{self.attachment}\n\n{text}", ""
            self.reply(lambda stop: self.session.ask(text, stop))

    def reply(self, start) -> None:
        """Stream one reply to stdout; the first Ctrl+C stops it and keeps what was said."""
        out, session = sys.stdout, self.session
        last = None
        with Interrupt() as interrupt:
            try:
                for chunk in start(lambda: interrupt.requested):
                    last = chunk
                    if chunk.text:
                        out.write(chunk.text)
                        out.flush()
            except ContextOverflowError as e:
                self.say(f"context full: {e}. /clear starts over; --ctx-size raises the limit", style="red")
                return
        out.write("\n")
        out.flush()
        if last.finish_reason == "interrupted":
            self.say("[reply interrupted]", style="dim")
        elif last.finish_reason == "length" and session.context_used + 1 >= session.context_size:
            self.say("context full: the reply was cut. /clear starts over; --ctx-size raises the limit", style="red")
        if session.stats:
            self.say(stats_line(last.stats, last.finish_reason, None, session.model.device.type), style="dim")


# -- the slash commands: each takes the REPL and the text after the command; True ends the chat --

def _help(repl: Repl, arg: str) -> None:
    repl.say(help_text())


def _leave(repl: Repl, arg: str) -> bool:
    return True


def _clear(repl: Repl, arg: str) -> None:
    repl.session.clear()
    repl.say("conversation cleared", style="dim")


def _system(repl: Repl, arg: str) -> None:
    repl.session.system = arg or None
    repl.say(f"system prompt {'set' if arg else 'removed'}", style="dim")


def _set(repl: Repl, arg: str) -> None:
    key, _, value = arg.partition(" ")
    value = value.strip()
    if not key:
        raise JambaError("usage: /set KEY VALUE (see /help)")
    if key == "system":  # /set system TEXT is /system TEXT
        return _system(repl, value)
    name = ALIASES.get(key, key).replace("-", "_")
    if name not in SETTINGS:
        raise JambaError(f"unknown setting {name!r}; settable: {', '.join(SETTINGS)}")
    try:
        parsed = _parse(name, value)
    except (KeyError, ValueError):
        raise JambaError(f"bad value {value!r} for {name}") from None
    session = repl.session
    if name == "stats":
        session.stats = parsed
    else:
        session.sampling = replace(session.sampling, **{name: parsed})  # SamplingError: out of range
    repl.say(f"{key} = {value or 'off'}", style="dim")


def _parse(name: str, text: str):
    """A /set value: on/off for flags, a stop string (or off), else a number of the option's type."""
    if name == "stop":
        return () if text.lower() in ("", "off", "none") else (text,)
    kind = bool if name == "stats" else typing.get_type_hints(SamplingParams)[name]
    if kind is bool:
        return _ON_OFF[text.lower()]
    return (int if int in typing.get_args(kind) else float)(text)


def _show(repl: Repl, arg: str) -> None:
    s = repl.session
    values = {**{name: getattr(s.sampling, name) for name in SAMPLING}, "stats": s.stats}
    params = ", ".join(f"{k}={list(v) if k == 'stop' else v}" for k, v in values.items()
                       if v not in (None, (), False))
    repl.say(f"model: {s.name}\nparameters: {params or 'checkpoint defaults'}\n"
             f"system: {s.system or '(none)'}\ncontext: {s.context_used} of {s.context_size} "
             f"tokens used, {len(s.messages)} messages")


def _regen(repl: Repl, arg: str) -> None:
    repl.reply(repl.session.regenerate)


def _read(repl: Repl, arg: str) -> None:
    if not arg:
        raise JambaError("usage: /read FILE")
    try:
        repl.attachment += Path(arg).expanduser().read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise JambaError(f"cannot read {arg}: {e.strerror or e}") from None
    repl.say(f"read {arg}; it goes with your next message", style="dim")


def _save(repl: Repl, arg: str) -> None:
    if not arg:
        raise JambaError("usage: /save FILE")
    path = Path(arg).expanduser()
    repl.session.save(path)
    repl.say(f"saved to {path}", style="dim")


def _load(repl: Repl, arg: str) -> None:
    if not arg:
        raise JambaError("usage: /load FILE")
    path = Path(arg).expanduser()
    for note in repl.session.load(path):
        repl.say(f"note: {repl.translate(note)}", style="yellow")
    repl.say(f"loaded {len(repl.session.messages)} messages from {path}", style="dim")


@dataclass(frozen=True)
class Command:
    names: tuple[str, ...]  # the first is shown first; the others are aliases
    args: str  # what follows the name, as /help shows it
    help: str  # continuation lines line up under the first in /help
    run: Callable[[Repl, str], bool | None]


COMMANDS = (
    Command(("/help",), "", "this help", _help),
    Command(("/bye", "/exit", "/quit"), "", "leave (Ctrl+D too)", _leave),
    Command(("/clear",), "", "forget the conversation (the system prompt stays)", _clear),
    Command(("/system",), "[TEXT]", "set the system prompt; without TEXT, remove it", _system),
    Command(("/set",), "KEY VALUE", "temperature, top_k, top_p, min_p, repetition_penalty, seed, max_tokens,\n"
            "stop (TEXT or off), ignore_eos (on/off), stats (on/off)", _set),
    Command(("/show",), "", "parameters, model, system prompt, context used", _show),
    Command(("/regen",), "", "answer the last message again (a fresh sample; greedy gives the same)", _regen),
    Command(("/read",), "FILE", "send FILE's text with your next message", _read),
    Command(("/save",), "FILE", "save the conversation as JSON, and the model state as FILE.state", _save),
    Command(("/load",), "FILE", "continue a conversation saved with /save", _load),
)
TABLE = {name: command for command in COMMANDS for name in command.names}
_INPUT_HELP = ('"""', 'start or end a multi-line message;  //text sends text that starts with /')
_FOOTER = "Ctrl+C stops a reply (the partial reply is kept); Ctrl+C twice quits."


def help_text() -> str:
    rows = [("  ".join(c.names) + (f" {c.args}" if c.args else ""), c.help) for c in COMMANDS]
    lines = ["Commands:"]
    for usage, text in [*rows, _INPUT_HELP]:
        first, *rest = text.split("\n")
        lines += [f"  {usage:<22}{first}", *(" " * 24 + line for line in rest)]
    return "\n".join([*lines, _FOOTER])


def complete(text: str) -> list[str]:
    """The command names that start with `text` (readline's tab completion)."""
    return [name for name in TABLE if name.startswith(text)]


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
            readline.set_completer(lambda text, n: (complete(text) + [None])[n])
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


def repl(session: ChatSession, console, *, history: bool = True, translate: Callable[[str], str] = str) -> int:
    """Chat on stdin/stdout until /bye or the end of input; returns the exit status.

    Args:
        console: where everything but the replies goes (a rich Console on stderr).
        history: keep the input history in `history_file()` (on a terminal).
        translate: turns a library message into the command line's words.
    """
    return Repl(session, console, _Input(sys.stdin.isatty(), history), translate).run()
