"""Reading the files of a checkpoint folder, which may come from anyone: only regular files inside the folder,
of bounded size, as strict JSON. Every refusal is one line naming the file (and the entry that named it).

"Inside" means: the real path of the file lies under the real path of the folder or, for a snapshot of the
Hugging Face cache (`.../models--org--name/snapshots/<commit>`), under that repo's `blobs` folder, where the
snapshot's symlinks point. A file is checked before it is opened, and opened without blocking, so a FIFO,
a device node or a symlink to one is refused rather than read.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

from .errors import CheckpointError, JambaError
from . import files

MAX_JSON_BYTES = 16 << 20  # config, index, tokenizer_config, generation_config, chat template: all far smaller


def shown(text, limit: int = 200) -> str:
    """`text` from a file (a tensor name, a path, a value), cut short and safe to print on one line: what a
    terminal would act on is written out as an escape (terminal.printable)."""
    from .terminal import printable

    text = str(text)
    return printable(text if len(text) <= limit else text[:limit - 3] + "...")


def value(v, limit: int = 60) -> str:
    """A value read from a file, as Python writes it, for a message: cut short, safe to print."""
    try:
        text = repr(v)
    except ValueError:  # an integer with more digits than Python prints
        return "a very large integer"
    return shown(text, limit)


def roots(directory: Path) -> list[Path]:
    """The real folders the files of `directory` may live in."""
    real = Path(os.path.realpath(directory))
    out = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        out.append(Path(os.path.realpath(real.parent.parent / "blobs")))
    return out


def entry_path(directory: Path, name, *, listed_in: str, entry: str) -> Path:
    """The file that a name read from a file of the checkpoint (`listed_in`, at `entry`) means, checked to be a
    regular file inside the folder. The message for a name outside the folder does not depend on whether that
    outside path exists, and no path outside is ever opened."""
    where = f"{listed_in}: {entry} names {value(name, 300)}"
    if not isinstance(name, str):
        raise CheckpointError(f"{where}, not a file name")
    parts = PurePosixPath(name).parts
    if not name or "\0" in name or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise CheckpointError(f"{where}, which is not a file inside the checkpoint folder")
    path = directory / name
    if not _within(path, roots(directory)):  # a symlink out of the folder
        raise CheckpointError(f"{where}, which is not a file inside the checkpoint folder")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{where}, which is missing") from None
    except OSError as e:
        raise CheckpointError(f"{where}, which cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{where}, which is not a regular file")
    return path


def check_file(path: Path, directory: Path) -> Path:
    """`path`, a file the loader looks for by its usual name in `directory`, checked to be a regular file
    inside the folder (not a symlink out of it, not a FIFO or device)."""
    if not _within(path, roots(directory)):
        raise CheckpointError(f"{path.name} in {directory} is a link to outside the checkpoint folder")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file")
    return path


def open_regular(path: Path, error: type[JambaError] = CheckpointError):
    """`path` opened for binary reading, refused unless it is a regular file; never blocks (a FIFO)."""
    try:
        fd = files.open_regular(path)
    except files.NotRegularFile:
        raise error(f"{path} is not a regular file") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None
    return os.fdopen(fd, "rb", buffering=0)


def read_text(path: Path, error: type[JambaError] = CheckpointError, limit: int = MAX_JSON_BYTES) -> str:
    """A UTF-8 text file of at most `limit` bytes."""
    with open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{path} is too large ({size:,} bytes; at most {limit:,} are read)")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start})") from None


def read_json(path: Path, error: type[JambaError] = CheckpointError, limit: int = MAX_JSON_BYTES) -> dict:
    """A file holding one JSON object, with no key given twice."""
    return parse_json(read_text(path, error, limit), str(path), error)


def parse_json(text: str, what: str, error: type[JambaError] = CheckpointError) -> dict:
    """`text` as a JSON object; a key given twice in an object is refused (two readers could each take a
    different one), and so is nesting too deep for Python or a number too long to convert."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise error(f"{what} holds key {value(e.args[0])} twice") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise error(f"{what} is not valid JSON for Python: it is nested too deeply") from None
    except ValueError:  # the only other one json raises: an integer with more digits than Python converts
        raise error(f"{what} is not valid JSON for Python: a number has too many digits") from None
    if not isinstance(data, dict):
        raise error(f"{what} must hold a JSON object")
    return data


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return out


def _within(path: Path, folders: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == folder or folder in real.parents for folder in folders)
