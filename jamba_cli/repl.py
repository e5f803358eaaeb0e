"""The `jamba chat` REPL around a `ChatSession`: messages and slash commands in, replies streamed to stdout.

Input comes from the terminal (readline editing, a private history file, \"\"\" blocks) or, when stdin is not
a TTY, from its lines. The slash commands are one table, `COMMANDS`; /help and tab completion are made from it.
Everything but the replies goes to stderr, through `terminal.plain`: file names, the model's name, a system
prompt and typed text may hold markup or escape sequences, and are shown as they are. A command that fails, a
line that is not UTF-8 and a reply that cannot start are one line each; the chat goes on.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .chat import ChatSession, existing_targets, read_file
from .errors import ContextOverflowError, JambaError
from .sample import SamplingParams
from .reply_view import ReplyView
from .terminal import Interrupt, plain, printable, stats_line

SAMPLING = tuple(f.name for f in fields(SamplingParams))
SETTINGS = (*SAMPLING, "stats")  # what /set takes; stats is the REPL's own
ALIASES = {"temp": "temperature", "n": "max_tokens"}
_ON_OFF = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8, as surrogateescape keeps it


class Repl:
    """One chat on the terminal: the session, where messages come from, and a file read for the next message.

    `translate` turns a library message into the command line's words (flags where it names parameters).
    """

    def __init__(self, session: ChatSession, console, reader: _Input, translate: Callable[[str], str] = str,
                 show_thinking: bool = False):
        self.session, self.console, self.reader, self.translate = session, console, reader, translate
        self.show_thinking = show_thinking
        self.attachment = ""

    def say(self, text: str, style: str = "", *, multiline: bool = False) -> None:
        """Print `text` on stderr as it is (`terminal.plain`); `multiline` keeps its newlines and tabs."""
        self.console.print(plain(text, style, multiline=multiline), soft_wrap=True)

    def error(self, message: str) -> None:
        self.say(f"error: {self.translate(message)}", "red")

    def notes(self) -> None:
        while self.reader.notes:
            self.say(f"note: {self.reader.notes.pop(0)}", "yellow")

    def run(self) -> int:
        """Take messages until /bye or the end of input; returns the exit status."""
        interactive = self.reader.interactive
        self.notes()
        if interactive:
            self.say(f"{self.session.name} is ready. /help lists the commands; /bye or Ctrl+D leaves.", "dim")
        while True:
            try:
                text = self.reader.message()
            except KeyboardInterrupt:
                if not interactive:
                    raise
                self.say("" if self.reader.buffer().strip() else "(to leave: /bye or Ctrl+D)", "dim")
                continue
            except JambaError as e:  # a line that is not UTF-8, or too long to send
                self.error(str(e))
                continue
            finally:
                self.notes()
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
                    self.error(str(e))
                continue
            if text.startswith("//"):
                text = text[1:]
            if self.attachment:
                text, self.attachment = f"{self.attachment}\n\n{text}", ""
            try:
                self.reply(lambda stop: self.session.ask(text, stop))
            except JambaError as e:  # the template refused the conversation: the message was not kept
                self.error(str(e))

    def reply(self, start) -> None:
        """Stream one reply to stdout; the first Ctrl+C stops it and keeps what was said.

        Raises:
            JambaError: the reply could not start (the conversation is as it was).
        """
        session = self.session
        # the answer on stdout (inert on a terminal), thinking dim on stderr, tool calls and sources after it
        view = ReplyView(self.console, show_thinking=self.show_thinking)
        last = None
        with Interrupt() as interrupt:
            try:
                for chunk in start(lambda: interrupt.requested):
                    last = chunk
                    view.pieces(chunk.pieces)
            except ContextOverflowError as e:
                self.say(f"context full: {e}. /clear starts over; --ctx-size raises the limit", "red")
                return
        view.finish(last.reply if last is not None else None, newline=True)
        if last.finish_reason == "interrupted":
            self.say("[reply interrupted]", "dim")
        elif last.finish_reason == "length" and session.context_used + 1 >= session.context_size:
            self.say("context full: the reply was cut. /clear starts over; --ctx-size raises the limit", "red")
        if session.stats:
            self.say(stats_line(last.stats, last.finish_reason, None, session.model.device.type), "dim")


# -- the slash commands: each takes the REPL and the text after the command; True ends the chat --

def _help(repl: Repl, arg: str) -> None:
    repl.say(help_text(), multiline=True)


def _leave(repl: Repl, arg: str) -> bool:
    return True


def _clear(repl: Repl, arg: str) -> None:
    repl.session.clear()
    repl.say("conversation cleared", "dim")


def _system(repl: Repl, arg: str) -> None:
    repl.session.system = arg or None
    repl.say(f"system prompt {'set' if arg else 'removed'}", "dim")


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
        session.sampling = replace(session.sampling, **{name: parsed})  # SamplingError: out of sample.RANGES
    repl.say(f"{key} = {value or 'off'}", "dim")


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
    repl.say(f"model: {printable(s.name)}\nparameters: {printable(params or 'checkpoint defaults')}\n"
             f"system: {s.system or '(none)'}\ncontext: {s.context_used} of {s.context_size} "
             f"tokens used, {len(s.messages)} messages", multiline=True)


def _regen(repl: Repl, arg: str) -> None:
    repl.reply(repl.session.regenerate)


def _tool(repl: Repl, arg: str) -> None:
    import json

    name, _, value = arg.partition(" ")
    if not name or not value.strip():
        raise JambaError("usage: /tool NAME RESULT (the result as JSON, or as text)")
    try:
        content = json.loads(value)
    except (ValueError, RecursionError):
        content = value.strip()  # a plain-text result
    repl.reply(lambda stop: repl.session.tool_result(name, content, stop))


def _path(arg: str, command: str) -> Path:
    """The file a command names: `~` and `~user` expanded."""
    if not arg:
        raise JambaError(f"usage: {command} FILE")
    if "\0" in arg:
        raise JambaError("a file name cannot hold a NUL character")
    try:
        return Path(arg).expanduser()
    except RuntimeError:  # ~nosuchuser, or ~ with no home directory
        raise JambaError(f"cannot expand {arg.split('/')[0]}: no such user or home directory") from None


def _read(repl: Repl, arg: str) -> None:
    path = _path(arg, "/read")
    text = read_file(path, repl.session.max_input_bytes).decode("utf-8", errors="replace")
    repl.attachment = f"{repl.attachment}\n\n{text}" if repl.attachment else text
    repl.say(f"read {path}; it goes with your next message", "dim")


def _save(repl: Repl, arg: str, force: bool = False) -> None:
    path = _path(arg, "/save!" if force else "/save")
    existing = existing_targets(path)  # JambaError: a symlink, FIFO, device or directory, never replaced
    if existing and not force:
        names = " and ".join(map(str, existing))
        exist, them = ("exists", "it") if len(existing) == 1 else ("exist", "them")
        if not repl.reader.interactive:
            raise JambaError(f"{names} {exist}; /save! {arg} replaces {them}")
        if not repl.reader.confirm(printable(f"{names} {exist}. Replace {them}? [y/N] ")):
            repl.say("not saved", "dim")
            return
    repl.session.save(path)
    repl.say(f"saved to {path}", "dim")


def _save_over(repl: Repl, arg: str) -> None:
    _save(repl, arg, force=True)


def _load(repl: Repl, arg: str) -> None:
    path = _path(arg, "/load")
    for note in repl.session.load(path):
        repl.say(f"note: {repl.translate(note)}", "yellow")
    repl.say(f"loaded {len(repl.session.messages)} messages from {path}", "dim")


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
    Command(("/tool",), "NAME RESULT", "send a tool's result (JSON or text) for the model's tool call, and\n"
            "let it continue", _tool),
    Command(("/read",), "FILE", "send FILE's text with your next message", _read),
    Command(("/save",), "FILE", "save the conversation as JSON, and the model state as FILE.state\n"
            "(on a terminal, asks before replacing a file; piped, refuses to)", _save),
    Command(("/save!",), "FILE", "the same, replacing FILE without asking (for scripts)", _save_over),
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


def history_file() -> Path | None:
    """$XDG_STATE_HOME/jamba/history, else ~/.local/state/jamba/history; None where neither variable holds an
    absolute path (the XDG spec ignores a relative one; without HOME there is no safe place to guess)."""
    state, home = os.environ.get("XDG_STATE_HOME", ""), os.environ.get("HOME", "")
    if os.path.isabs(state):
        return Path(state) / "jamba" / "history"
    return Path(home) / ".local" / "state" / "jamba" / "history" if os.path.isabs(home) else None


class _Input:
    """Messages from the terminal (readline editing, history) or, when stdin is not a TTY, from its lines.

    `notes` collects what the user should hear once (the history file could not be used); the REPL prints
    them. `limit`: the most bytes a message may have (more cannot fit the context; it is read and dropped).
    """

    def __init__(self, interactive: bool, history: bool, limit: int = 1 << 30):
        self.interactive, self.limit = interactive, limit
        self.history = None
        self.readline = None
        self.notes: list[str] = []
        self.lines = 0  # lines read so far, to name a bad one
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
                self.history = self._open_history()

    def _open_history(self) -> Path | None:
        """The history file, made private and read into readline; None (and a note) where it cannot be used:
        the chat runs without history rather than not at all."""
        path = history_file()
        if path is None:
            self.notes.append("no input history this session: HOME is not set (nor XDG_STATE_HOME)")
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND | getattr(os, "O_NONBLOCK", 0), 0o600)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(0, "not a regular file")
                os.fchmod(fd, 0o600)  # private even if it was created otherwise
            finally:
                os.close(fd)
            self.readline.set_history_length(1000)
            self.readline.read_history_file(path)
        except OSError as e:
            self._no_history(path, e)
            return None
        return path

    def _no_history(self, path: Path, e: OSError) -> None:
        self.history = None
        self.notes.append(f"no input history this session: cannot write {path}: {e.strerror or e} "
                          "(--no-history or JAMBA_NOHISTORY=1 leaves it off)")

    def _input(self, prompt: str) -> str:
        """A line typed on the terminal; a line that is not UTF-8 comes back with its bad bytes escaped."""
        try:
            if sys.stdout.isatty():
                return input(prompt)
            sys.stderr.write(prompt)  # keep stdout for the replies
            return input()
        except UnicodeDecodeError as e:  # readline's bytes could not be decoded
            data = e.object if isinstance(e.object, bytes) else b"\xff"
            return data.decode("utf-8", "surrogateescape").rstrip("\n")

    def line(self, prompt: str) -> str | None:
        """One line without its line end; None at end of input. A byte that is not UTF-8 comes back as
        surrogateescape keeps it (`message` refuses such a line).

        Raises:
            _TooLong: the line has more than `limit` bytes; it was read to its end, and dropped.
        """
        self.lines += 1
        if not self.interactive:
            if sys.stdin is None:  # closed (<&-): no input at all
                return None
            stream = getattr(sys.stdin, "buffer", None)
            if stream is None:
                line = sys.stdin.readline()
            else:
                data = stream.readline(self.limit + 1)
                if len(data) > self.limit and not data.endswith(b"\n"):
                    while (more := stream.readline(1 << 20)) and not more.endswith(b"\n"):
                        pass
                    raise _TooLong
                line = data.decode("utf-8", "surrogateescape")
            return None if line == "" else line.removesuffix("\n").removesuffix("\r")
        try:
            text = self._input(prompt)
        except EOFError:
            return None
        if self.history is not None and text.strip() and not _NOT_UTF8.search(text):
            try:
                self.readline.append_history_file(1, self.history)
            except OSError as e:
                self._no_history(self.history, e)
        return text

    def message(self) -> str | None:
        """One message: a line, or the lines between \"\"\" marks. None at end of input.

        Raises:
            JambaError: the message is not UTF-8, or is longer than `limit`; it was read, and dropped.
        """
        first = self.lines + 1
        try:
            line = self.line(">>> ")
        except _TooLong:
            raise self._refused(first, "is longer than the context can hold") from None
        if line is not None and line.startswith('"""'):
            line = self._block(line[3:], first)
        if line is not None and (bad := _NOT_UTF8.search(line)):
            raise self._refused(first, f"is not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})")
        return line

    def _block(self, rest: str, first: int) -> str:
        """The message of a \"\"\" block whose first line (after the mark) is `rest`."""
        if len(rest) >= 3 and rest.rstrip().endswith('"""'):
            return rest.rstrip()[:-3]
        lines, size = ([rest] if rest else []), len(rest.encode(errors="surrogateescape"))
        while True:
            try:
                more = self.line("... ")
            except _TooLong:
                more, size = "", self.limit + 1
            if more is None:
                break
            end = more.rstrip().endswith('"""')
            part = more.rstrip()[:-3] if end else more
            size += len(part.encode(errors="surrogateescape")) + 1
            if size > self.limit:
                lines = []  # read on to the closing mark, keeping nothing
            elif part or not end:
                lines.append(part)
            if end:
                break
        if size > self.limit:
            raise self._refused(first, "is longer than the context can hold")
        return "\n".join(lines)

    def _refused(self, first: int, problem: str) -> JambaError:
        where = "" if self.interactive else f" (line {first})"
        return JambaError(f"that message{where} {problem}; it was not sent")

    def confirm(self, question: str) -> bool:
        """Ask on the terminal; only y or yes is yes (Ctrl+C and Ctrl+D are no). The answer stays out of the
        history."""
        before = self.readline.get_current_history_length() if self.readline else 0
        try:
            answer = self._input(question)
        except (EOFError, KeyboardInterrupt):
            sys.stderr.write("\n")
            return False
        finally:
            while self.readline and self.readline.get_current_history_length() > before:
                self.readline.remove_history_item(self.readline.get_current_history_length() - 1)
        return answer.strip().lower() in ("y", "yes")

    def buffer(self) -> str:
        return self.readline.get_line_buffer() if self.readline else ""


class _TooLong(Exception):
    """A line longer than the input's limit (it was read, and dropped)."""


def repl(session: ChatSession, console, *, history: bool = True, translate: Callable[[str], str] = str,
         show_thinking: bool = False) -> int:
    """Chat on stdin/stdout until /bye or the end of input; returns the exit status.

    Args:
        console: where everything but the replies goes (a rich Console on stderr).
        history: keep the input history in `history_file()` (on a terminal); where that file cannot be
            written, the chat runs without it and says so once.
        translate: turns a library message into the command line's words.
    """
    reader = _Input(sys.stdin is not None and sys.stdin.isatty(), history, session.max_input_bytes)
    return Repl(session, console, reader, translate, show_thinking).run()
