"""The private folders that disk-offloaded weights live in while they load, and their removal.

Each folder is `jamba-offload-<pid>-<start>-<random>` inside the offload folder, where pid and start (the
process's start time, from /proc; 0 where there is none) identify the process that made it. It exists only
while the weights load: then its files are unlinked, their memory maps staying valid. So that it never
outlives its process:
- an error or Ctrl+C (KeyboardInterrupt) while loading removes it (the loader's `finally`);
- SIGTERM and SIGHUP, while they would kill the process (their default action), remove it first and then
  kill the process as the signal would have (`cleanup_on_signals`);
- SIGKILL cannot be caught: the next load with the same offload folder removes the folders of processes
  that are gone (`sweep`), and never one whose process still runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from .files import process_alive

PREFIX = "jamba-offload-"
_NAME = re.compile(re.escape(PREFIX) + r"([0-9]+)-([0-9]+)-[0-9a-f]+")
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_live: set[Path] = set()  # the folders this process made and has not removed yet


def make_folder(parent: str | os.PathLike) -> Path:
    """A new private folder for offloaded weights in `parent` (created if needed); stale folders of dead
    processes there are removed first. Raises OSError."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent)
    path = parent / f"{PREFIX}{os.getpid()}-{_start_time(os.getpid()) or 0}-{secrets.token_hex(4)}"
    _live.add(path)  # before it exists: a signal that comes during mkdir still finds it
    try:
        os.mkdir(path, 0o700)
    except OSError:
        _live.discard(path)
        raise
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _live.discard(path)


def sweep(parent: str | os.PathLike) -> list[Path]:
    """Remove the offload folders in `parent` whose process is gone; returns them. A folder is left alone when
    its process runs (or its pid was taken by a process that started at the same time), when it belongs to
    another user, or when it is not a plain directory (a symlink is never followed)."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _NAME.fullmatch(name)
        if m is None:
            continue
        path = Path(parent) / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or _alive(int(m.group(1)), int(m.group(2))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """While active, a SIGTERM or SIGHUP whose action is the default (to end the process) first removes this
    process's offload folders, then ends the process by the same signal. A handler someone else installed is
    left in place (the loader's `finally` then removes the folders if it raises). Only the main thread can
    install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = {}
    try:
        for sig in _SIGNALS:
            if signal.getsignal(sig) == signal.SIG_DFL:
                installed[sig] = signal.signal(sig, _end)
        yield
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


def _end(signum, frame) -> None:
    for path in list(_live):
        remove(path)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _alive(pid: int, start: int) -> bool:
    if not process_alive(pid):
        return False
    now = _start_time(pid)
    return not (start and now is not None and now != start)  # a different start: the pid was reused


def _start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat field 22), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # after the command name, which may hold spaces
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None
