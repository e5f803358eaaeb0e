"""What `run` and `chat` show a person, on stderr: colour choice, the load progress bar, the stats line, text
from untrusted sources made inert, and Ctrl+C handling that stops generation cleanly. stdout is left to the
generated text. Also what the process does first of all: standard streams that cannot fail it, and Ctrl+C
before the heavy imports."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_started = False


def start_process() -> None:
    """The first thing `jamba` does, before anything heavy is imported: Ctrl+C from now on leaves at once
    (`exit_on_interrupt`), and the standard streams are made safe (`guard_streams`). Runs once."""
    global _started
    if not _started:
        _started = True
        exit_on_interrupt()
        guard_streams()


# -- Ctrl+C, in three phases: leave at once (start-up), raise KeyboardInterrupt (loading), stop generating
#    at the next token or prefill chunk (`Interrupt`) --

def exit_on_interrupt() -> None:
    """Until the command starts work that leaves something behind: Ctrl+C exits with status 130, at once.

    Python's own handler raises KeyboardInterrupt wherever the main thread is, and start-up spends most of
    its time importing (torch alone takes a second or more): an import cut by an exception leaves modules
    half-initialised, which was seen to abort the process (SIGABRT in torch's import), to surface as an
    ImportError, or to be swallowed by a library's catch-all. Nothing has been written yet in this phase,
    so there is nothing to clean up and no reason to unwind."""
    signal.signal(signal.SIGINT, _leave)


def _leave(signum, frame) -> None:
    try:
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    os._exit(130)


def raise_on_interrupt() -> None:
    """From here on Ctrl+C raises KeyboardInterrupt (Python's default), so that cleanup in `finally` blocks
    runs (a half-loaded model, a download); the command turns it into status 130. Called once the heavy
    modules are imported."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- the standard streams --

stdout_error: OSError | None = None  # the first failure writing to stdout, once `guard_streams` watches it


def guard_streams() -> None:
    """Make the standard streams safe for a command-line tool.

    A closed descriptor 0, 1 or 2 gets /dev/null, so that no file opened later takes its number (output
    meant for stdout or stderr would land in it); a closed stdin then reads as empty, and a closed stdout
    stays `None` in Python, for a command to refuse. stderr never fails: what cannot be written to it
    (closed, /dev/full, a pipe nobody reads) is dropped, because losing diagnostics must not lose the
    output. Writes to stdout still fail as before, but the first failure is kept in `stdout_error`, so that
    an error escaping from anywhere can be told apart as stdout's (status 141 for a closed pipe)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself, 0..fd-1 being open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdin is None:
        sys.stdin = open(0, encoding="utf-8", errors="surrogateescape", closefd=False)
    if sys.stdout is not None:
        sys.stdout = _rewrap(sys.stdout, _WatchedWriter(1))
    sys.stderr = _rewrap(sys.stderr, _ForgivingWriter(2))


def _rewrap(old, raw: io.RawIOBase) -> io.TextIOWrapper:
    """A text stream like `old` (encoding, error handler, buffering), over `raw`."""
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding=getattr(old, "encoding", None) or "utf-8",
                            errors=getattr(old, "errors", None) or "backslashreplace",
                            line_buffering=getattr(old, "line_buffering", False),
                            write_through=getattr(old, "write_through", True))


class _FdWriter(io.RawIOBase):
    def __init__(self, fd: int):
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        try:
            return os.isatty(self._fd)
        except OSError:
            return False


class _ForgivingWriter(_FdWriter):
    """stderr: writes never fail; after the first failure the rest is dropped without trying."""

    failed = False

    def write(self, data) -> int:
        if not self.failed:
            try:
                return os.write(self._fd, data)
            except BlockingIOError:  # a non-blocking stderr that is full now: drop this, try the next
                pass
            except OSError:
                self.failed = True
        return len(data)


class _WatchedWriter(_FdWriter):
    """stdout: writes fail as they would, and the first failure is kept in `stdout_error`."""

    def write(self, data) -> int:
        global stdout_error
        try:
            return os.write(self._fd, data)
        except OSError as e:
            stdout_error = stdout_error or e
            raise


def stdout_closed_early() -> bool:
    """Whether the reader of stdout went away (`jamba ... | head`)."""
    return stdout_error is not None and stdout_error.errno == errno.EPIPE


def stderr_console(color: str = "auto"):
    """A rich Console on stderr. auto: colour on a TTY unless NO_COLOR is set (FORCE_COLOR forces it);
    always/never override both."""
    from rich.console import Console

    if color == "auto" and os.environ.get("FORCE_COLOR") and not os.environ.get("NO_COLOR"):
        color = "always"
    if color == "never" or (color == "auto" and (os.environ.get("NO_COLOR") or not sys.stderr.isatty())):
        return Console(stderr=True, color_system=None, highlight=False, force_terminal=False)
    if color == "always":
        return Console(stderr=True, force_terminal=True, no_color=False, highlight=False, color_system="standard")
    return Console(stderr=True, highlight=False)


# What a terminal could act on, or what hides text from the person reading it: C0 controls (ESC starts escape
# sequences: window title, clear screen, clipboard), DEL, C1 controls (0x9b is a one-byte CSI on some
# terminals), the bidirectional overrides and isolates that reorder what is shown (Trojan Source), and lone
# surrogates (bytes that were not UTF-8, kept by Python's surrogateescape). Tab and newline only where a text
# of several lines is expected.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_MULTILINE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _shown(match: re.Match) -> str:
    c = match.group()
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text, *, multiline: bool = False) -> str:
    """`text` (a file name, a tensor name, a message built from a file, a line typed by a user) with every
    character that a terminal would act on written out as an escape, as Python writes it (ESC as \\x1b, a
    byte that was not UTF-8 as \\xNN): it shows what it holds, and cannot retitle the window, clear the
    screen or hide a part of itself. `multiline`: newlines and tabs stay, for texts of several lines (a
    system prompt); else they are escaped too, and the text stays on one line."""
    return (_UNSAFE_MULTILINE if multiline else _UNSAFE).sub(_shown, str(text))


def plain(text, style: str = "", *, multiline: bool = False):
    """`printable(text)` as a rich Text: what a Console prints of it is the text itself, never read as markup
    (`notes[draft].txt`, `a[/]b`) or emoji codes (`:smile:`)."""
    from rich.text import Text

    return Text(printable(text, multiline=multiline), style=style)


@contextmanager
def load_progress(console, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A (bytes done, bytes total) callback that drives a progress bar when stderr is a TTY, else None."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(printable(label), total=None)  # the label holds the model's name, as typed
        yield lambda done, total: bar.update(task, completed=done, total=total)


class Interrupt:
    """While active, a first Ctrl+C only sets `requested` (generation polls it and stops at the next token,
    or at the next chunk of a long prompt); a second one raises KeyboardInterrupt, for when the first is not
    acted on quickly enough."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> Interrupt:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def format_bytes(n: float, binary: bool = False) -> str:
    """`n` bytes in the largest unit it reaches, to one decimal: KB, MB, GB (powers of 1000), or with
    `binary` KiB, MiB, GiB, TiB (powers of 1024)."""
    base, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("B", "KB", "MB", "GB"))
    for unit in units:
        if n < base or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= base


def stats_line(stats, finish_reason: str | None, load_s: float | None, device_type: str) -> str:
    """One human line, ollama-style: load, prompt, time to first token, generation, peak memory, finish."""
    parts = []
    if load_s is not None:
        parts.append(f"load {load_s:.2f} s")
    cached = f", {stats.cached_tokens} cached" if stats.cached_tokens else ""
    parts.append(f"prompt {stats.prompt_tokens} tok{cached} {stats.prompt_tps:.1f} tok/s")
    parts.append(f"first token {stats.ttft_s:.2f} s")
    parts.append(f"generated {stats.generation_tokens} tok {stats.generation_tps:.1f} tok/s")
    memory = "peak GPU memory" if device_type == "cuda" else "peak RSS"
    parts.append(f"{memory} {format_bytes(stats.peak_memory_bytes)}")
    parts.append(f"finish {finish_reason}")
    return " · ".join(parts)


def silence_stdout() -> None:
    """After the reader of stdout went away: point fd 1 at /dev/null so the exit-time flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
