"""How `run` and `chat` show a reply as text: the answer on stdout; a reasoning model's thinking dim on stderr
when that is a terminal (on stdout too with `--show-thinking`); tool calls as plain lines, and the documents
an answer cites as a "Sources:" line, after the answer; notes about markup that did not parse on stderr.

On a terminal the model's text is shown inert (escape sequences it spells are written out); piped, as it is.
"""

from __future__ import annotations

import sys

from .documents import sources_line
from .terminal import plain, printable

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ReplyView:
    def __init__(self, console, *, show_thinking: bool = False, out=None):
        self.console, self.show_thinking = console, show_thinking
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.err_tty = sys.stderr.isatty()
        self.last = None  # the kind of the last piece written
        self.wrote = ""  # the last character written to stdout

    def _write(self, text: str, dim: bool = False) -> None:
        shown = printable(text, multiline=True) if self.tty else text
        self.out.write(f"{DIM}{shown}{RESET}" if dim and self.tty else shown)
        self.out.flush()
        self.wrote = text[-1:] or self.wrote

    def pieces(self, pieces) -> None:
        """Show (kind, text) pieces of a reply as they come."""
        for kind, text in pieces:
            if kind == "reasoning":
                if self.show_thinking:
                    self._write(text, dim=True)
                elif self.err_tty:
                    self.console.print(plain(text, "dim", multiline=True), end="", soft_wrap=True,
                                       highlight=False)
            else:
                if self.last == "reasoning":  # the answer starts on a line of its own, after a blank one
                    if self.show_thinking:
                        self._write("\n\n")
                    elif self.err_tty:
                        self.console.print()
                self._write(text)
            self.last = kind

    def finish(self, reply, *, newline: bool = False) -> None:
        """After the answer: its tool calls and sources (stdout), and notes (stderr). stdout then ends with
        a newline: one more where the answer ended with its own, when `newline` (as chat does)."""
        lines = [f"tool call: {call.shown()}" for call in reply.tool_calls] if reply is not None else []
        if reply is not None and reply.citations is not None:
            lines.append(sources_line(reply.citations))
        if lines:
            if self.wrote and self.wrote != "\n":
                self._write("\n")
            self._write("\n".join(lines))
        if newline or self.wrote != "\n":
            self._write("\n")
        for note in (reply.notes if reply is not None else []):
            self.console.print(plain(f"note: {note}", "yellow"), soft_wrap=True)
