"""Facts about files on disk that several modules rely on: `~user` in a path given by a user, what kind a
path is, whether the process that owns a leftover is gone, and the names of the temporaries a write goes
through (so that one a killed process left behind is recognised and removed later)."""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path

from .errors import UsageError


def expand_user(path: str | os.PathLike, param: str) -> Path:
    """`path` with a leading `~` or `~user` expanded. A user that does not exist is a UsageError naming
    `param` (Path.expanduser raises a RuntimeError; os.path.expanduser would leave a folder named ~user)."""
    text = os.fspath(path)
    if not text.startswith("~"):
        return Path(text)
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        user = re.split(r"[/\\]", text[1:], maxsplit=1)[0]
        raise UsageError(f"`{param}`: cannot expand ~{user}: " + ("no such user" if user else "no home directory"))
    return Path(expanded)


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular one is, in words ("directory", "symbolic link", ...); None for a
    regular file."""
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "named pipe"),
                       (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "special file"


class NotRegularFile(OSError):
    """What `open_regular` raises for a path that is no regular file; `kind` says what it is instead."""

    def __init__(self, kind: str):
        super().__init__(f"it is a {kind}, not a regular file")
        self.kind = kind


def open_regular(path: str | os.PathLike, *, follow: bool = True) -> int:
    """A descriptor of `path` opened for reading, which is a regular file: checked on what was opened, not on
    the name, and opened without blocking, so a pipe with no writer cannot hang the caller nor a device feed
    it forever. `follow`: a symbolic link is followed (else refused by the OS).

    Raises:
        NotRegularFile: `path` is a directory, pipe, device or socket.
        OSError: it cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags if follow else flags | getattr(os, "O_NOFOLLOW", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(file_kind(mode) or "special file")
    return fd


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another user's counts; a pid no process can have does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    except OverflowError:  # no such pid can exist
        return False
    return True


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"
_TMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.jamba-tmp$")


def temporary_name(path: Path) -> Path:
    """Where a file for `path` is written before it replaces `path`: beside it, hidden, named after this
    host and process, so that the one a killed process left behind can be recognised as stale."""
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.jamba-tmp")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the temporaries in `directory` that processes of this host which have since died left
    behind (a write cut by SIGKILL or a power loss); those of live processes are left alone.

    Returns:
        the files removed.
    """
    removed = []
    if os.name != "posix":  # liveness is probed with signal 0, a POSIX idiom
        return removed
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP.match(entry.name)
        if not m or m["host"] != _HOST or int(m["pid"]) == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or process_alive(int(m["pid"])):
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """At most `limit` + 1 bytes of the regular file `path` (one more than allowed, so the caller can tell a
    file that is too large), read through `open_regular`: a FIFO or device is refused, never read.

    Raises:
        OSError: it cannot be opened or read, or is no regular file (NotRegularFile).
    """
    fd = open_regular(path)
    with open(fd, "rb") as f:
        return f.read(limit + 1)


def read_named(raw: str | os.PathLike, param: str, what: str, limit: int) -> tuple[Path, bytes]:
    """(path, bytes) of the file a user named for `param` (`~` expanded), `what` it is in messages
    ("document", "tools file"); one UsageError when it cannot be read, is no regular file or is larger than
    `limit` bytes."""
    path = expand_user(raw, param)
    try:
        data = read_regular(path, limit)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit >> 20} MiB")
    return path, data
