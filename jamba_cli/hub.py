"""`jamba download`: fetch a checkpoint from the Hugging Face Hub into the HF cache or a local folder.

A repo, and the server HF_ENDPOINT points at, are untrusted: the listing names the files, and each name
becomes a path on this disk. So every file is written here, in the layout huggingface_hub uses (blobs,
snapshots of relative links, refs; or plain files in a local folder), and only after the whole listing has
passed the checks: names relative, with no `..`, `.` or empty segment, backslash, drive letter or control
character, no two that a case-insensitive or normalising file system would take for one file, none that
reaches outside the destination through a link or lands on something that is not a regular file; commit
ids and hashes in their hex form. A refused listing writes nothing. Each file is checked against the
listing's size and sha256 (LFS) or git blob id before it takes its place, and a server that sends more bytes
than listed is cut off. huggingface_hub writes nothing here online (its own writer names cache files after
the server's ETag and X-Repo-Commit headers, unchecked): it lists the repo, builds URLs and headers, streams
the bytes, maps the Hub's errors and serves offline use from the cache.

A partial file keeps a stable name beside its final place and is resumed with an HTTP Range request, also
on the next run (huggingface_hub >= 1.x deletes an interrupted download: a multi-GB shard would start from
zero), and renamed into place once checked.

Importing this module does not import huggingface_hub (shell completion calls `cached_repo_ids`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
import unicodedata
from contextlib import contextmanager
from pathlib import Path

from .errors import HubError, UsageError
from .files import expand_user
from .terminal import format_bytes

# ORG/NAME as the Hub allows them: what `jamba -m` and `load` take for a Hub repo. Each part starts and ends
# with a letter, digit or "_", has at most 96 characters and no "--" or ".." (so never "." or "..").
REPO_ID = re.compile(r"(?!.*(?:--|\.\.))\w(?:[\w.-]{0,94}\w)?/\w(?:[\w.-]{0,94}\w)?", re.ASCII)
DEFAULT_INCLUDE = ["*.safetensors", "*.json", "tokenizer*", "*.jinja"]  # no .bin/.pt/GGUF duplicates
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NOT_IN_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")  # what git forbids in a branch or tag name
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_local_path(spec: str) -> bool:
    """Whether a model argument names a local path rather than a Hub repo id: it starts with ./ ../ / or ~,
    has a Windows separator or drive, is not ORG/NAME (more or fewer slashes, characters no repo id has), or
    its first part is an existing directory (`ckpt/final` beside a folder `ckpt`). Touches no network."""
    if spec in (".", "..") or spec.startswith(("./", "../", "/", "~")):
        return True
    if os.sep != "/" and (os.sep in spec or os.path.splitdrive(spec)[0]):
        return True
    return not REPO_ID.fullmatch(spec) or os.path.isdir(spec.split("/")[0])


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.fullmatch(repo_id):
        raise UsageError(f"{repo_id!r} is not a Hub repo id: use ORG/NAME, e.g. ai21labs/AI21-Jamba-Mini-1.7")


def check_revision(revision: str | None) -> None:
    """A branch, tag or commit name as git allows it (it names a file under the cache's refs/)."""
    if revision is None:
        return
    if _NOT_IN_REF.search(revision) or ".." in revision or any(p in ("", ".") for p in revision.split("/")):
        raise UsageError(f"`revision`: {revision!r} is not a branch, tag or commit name")


def _cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF hub cache folder, from the environment as huggingface_hub resolves it."""
    if cache_dir is not None:
        return expand_user(cache_dir, "cache_dir")
    env = os.environ
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        hub = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def _repo_dir(repo_id: str, cache_dir) -> Path:
    return _cache_root(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def is_cached(repo_id: str, revision: str | None = None, cache_dir=None) -> bool:
    """Whether the HF cache holds a loadable snapshot of `repo_id`: config, tokenizer and every weight shard.

    Reads the disk only: no network, no huggingface_hub import.
    """
    repo, commit = _repo_dir(repo_id, cache_dir), revision or "main"
    try:
        check_revision(commit)
    except UsageError:
        return False
    if not _COMMIT.fullmatch(commit):
        try:
            commit = (repo / "refs" / commit).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return False
        if not _COMMIT.fullmatch(commit):
            return False
    snap = repo / "snapshots" / commit
    if not ((snap / "config.json").is_file() and (snap / "tokenizer.json").is_file()):
        return False
    index = snap / "model.safetensors.index.json"
    if not os.path.lexists(index):
        return any(p.is_file() for p in snap.glob("*.safetensors"))  # is_file follows the link to the blob
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all(_name_problem(s) is None and (snap / s).is_file() for s in shards)


def cached_repo_ids(cache_dir=None) -> list[str]:
    """Repo ids in the local HF cache with a snapshot that has a config.json (for --model completion)."""
    try:
        entries = list(os.scandir(_cache_root(cache_dir)))
    except OSError:
        return []
    return sorted(e.name[len("models--"):].replace("--", "/") for e in entries
                  if e.name.startswith("models--") and any(Path(e.path).glob("snapshots/*/config.json")))


def plan_download(repo_id, filenames=None, *, revision=None, include=None, exclude=None, token=None,
                  cache_dir=None, local_dir=None) -> list[tuple[str, int]]:
    """What `download` with the same arguments would fetch, for `--dry-run`.

    Returns:
        (filename, bytes) for each selected file that is not complete locally yet.
    """
    _check_request(repo_id, filenames, revision, include, exclude, local_dir, cache_dir)
    local_dir, cache_dir = _folder(local_dir, "local_dir"), _folder(cache_dir, "cache_dir")
    endpoint = _endpoint()
    with _hub_errors(repo_id, revision, endpoint):
        commit, files = _listing(repo_id, revision, token, endpoint)
        names = _select(files, filenames, include, exclude, repo_id)
        layout = _Layout(repo_id, commit, cache_dir, local_dir)
        layout.check(repo_id, names)
        return [(n, files[n].size) for n in names if not layout.complete(n, files[n])]


def download(repo_id: str, filenames: list[str] | None = None, *, revision: str | None = None,
             include: list[str] | None = None, exclude: list[str] | None = None, local_dir: Path | None = None,
             cache_dir: Path | None = None, token: str | None = None, offline: bool = False,
             progress: bool = False) -> Path:
    """Download a model repo, or some of its files, and return the local snapshot (or local_dir).

    Args:
        repo_id: "org/name" on the Hub (HF_ENDPOINT is honoured).
        filenames: exact files to fetch; when given, include/exclude are ignored.
        revision: branch, tag or commit; default "main".
        include, exclude: glob patterns; include defaults to DEFAULT_INCLUDE.
        local_dir: write plain files into this folder instead of the HF cache (not with cache_dir).
        cache_dir: the HF cache to use instead of HF_HUB_CACHE / HF_HOME.
        token: Hub token; default HF_TOKEN or the stored login.
        offline: use the local cache only (also when HF_HUB_OFFLINE=1); the cache is also used when
            the Hub cannot be reached.
        progress: draw a progress bar on stderr.

    Raises:
        UsageError: a malformed repo id, revision, pattern or file name, local_dir with cache_dir, a folder
            that is a file or names a user that does not exist.
        HubError: not found, gated or unauthorised, offline and not cached, disk full, transfer cut off; a
            listing with an unsafe file name or malformed metadata (then nothing is written).
    """
    from huggingface_hub import constants

    _check_request(repo_id, filenames, revision, include, exclude, local_dir, cache_dir)
    local_dir, cache_dir = _folder(local_dir, "local_dir"), _folder(cache_dir, "cache_dir")
    endpoint = _endpoint()
    offline = offline or constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    with _hub_errors(repo_id, revision, endpoint), _hf_quiet():
        if offline:
            return _from_cache(repo_id, revision, filenames, include, exclude, cache_dir, local_dir,
                               "offline mode is on")
        try:
            commit, files = _listing(repo_id, revision, token, endpoint)
        except _network_errors():
            return _from_cache(repo_id, revision, filenames, include, exclude, cache_dir, local_dir,
                               f"{endpoint} cannot be reached")
        names = _select(files, filenames, include, exclude, repo_id)
        layout = _Layout(repo_id, commit, cache_dir, local_dir)
        layout.check(repo_id, names)  # every name has passed before the first byte is written
        todo = [n for n in names if not layout.complete(n, files[n])]
        need = sum(files[n].size for n in todo)
        layout.root.mkdir(parents=True, exist_ok=True)
        if need > (free := shutil.disk_usage(layout.root).free):
            raise HubError(f"not enough disk space in {layout.root}: {format_bytes(need)} needed, "
                           f"{format_bytes(free)} free")
        with _progress_bar(progress, need) as advance:
            for name in todo:
                _fetch(repo_id, name, files[name], layout, token, endpoint, advance)
        return layout.finish(names, files, revision)


def _check_request(repo_id, filenames, revision, include, exclude, local_dir, cache_dir) -> None:
    """The caller's mistakes, as UsageErrors, before any network or disk access."""
    check_repo_id(repo_id)
    check_revision(revision)
    if local_dir is not None and cache_dir is not None:
        raise UsageError("`local_dir` and `cache_dir` exclude each other")
    for param, patterns in (("include", include), ("exclude", exclude)):
        if any(not p for p in patterns or ()):
            raise UsageError(f"`{param}`: an empty pattern matches no file")
    if any(not f for f in filenames or ()):
        raise UsageError("an empty file name was given")


def _folder(path, param: str) -> Path | None:
    if path is None:
        return None
    path = expand_user(path, param)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"`{param}`: {path} is not a directory")
    return path


def _blob_id(entry) -> str:
    """The name of a file's blob in the cache: its sha256 for LFS files, else its git blob id."""
    return entry.lfs.sha256 if entry.lfs is not None else entry.blob_id


def _within(path: str, base: str) -> bool:
    try:
        return os.path.commonpath([path, base]) == base
    except ValueError:  # another drive (Windows)
        return False


class _Layout:
    """Where each file's final copy, partial download and lock live: in the HF cache or in a local folder."""

    def __init__(self, repo_id: str, commit: str, cache_dir: Path | None, local_dir: Path | None):
        self.local = local_dir
        self.repo, self.commit = _repo_dir(repo_id, cache_dir), commit
        self.root = self.local or _cache_root(cache_dir)
        self.snapshot = self.repo / "snapshots" / commit
        self.meta = None if self.local is None else self.local / ".cache" / "huggingface" / "download"

    def target(self, name: str) -> Path:
        """Where the file appears: in the local folder, or its link in the snapshot."""
        return (self.local or self.snapshot) / name

    def check(self, repo_id: str, names: list[str]) -> None:
        """Refuse names that would collide on disk or whose paths would leave the destination."""
        refuse = f"refusing to download {repo_id}:"
        files = {}
        for name in names:
            key = unicodedata.normalize("NFC", name).casefold()
            if key in files:
                raise HubError(f"{refuse} the file names {files[key]!r} and {name!r} are one file where case or "
                               "Unicode normalisation is ignored")
            files[key] = name
        for name in names:
            parts = name.split("/")
            for i in range(1, len(parts)):
                folder = unicodedata.normalize("NFC", "/".join(parts[:i])).casefold()
                if folder in files:
                    raise HubError(f"{refuse} {files[folder]!r} is a file and a folder (of {name!r})")
        base = os.path.realpath(self.local or self.snapshot)
        for name in names:
            target = self.target(name)
            if self.local is not None and name.casefold().split("/")[:2] == [".cache", "huggingface"]:
                raise HubError(f"{refuse} {name!r} is where downloads keep their partial files")
            # a local file is written through its whole path, and its partial file and lock beside the notes;
            # a snapshot entry is a link that is replaced, so only its folder counts
            written = [target, (self.meta / name).parent] if self.local is not None else [target.parent]
            for path in written:
                resolved = os.path.realpath(path)
                if not _within(resolved, base):
                    raise HubError(f"{refuse} {name!r} would be written outside {self.local or self.snapshot} "
                                   f"(it resolves to {resolved})")
            if os.path.lexists(target) and not (target.is_file() or target.is_symlink()):
                raise HubError(f"{refuse} {target} exists and is not a regular file")

    def complete(self, name: str, entry) -> bool:
        if self.local is not None:
            path = self.local / name
            if not (path.is_file() and path.stat().st_size == entry.size):
                return False
            return entry.lfs is not None or _git_blob_id(path) == entry.blob_id  # hashing GBs each run: no
        return self.target(name).is_file() or (self.repo / "blobs" / _blob_id(entry)).is_file()

    def paths(self, name: str, entry) -> tuple[Path, Path, Path]:
        """(final, partial, lock), named as huggingface_hub 0.x names them, so either resumes the other's."""
        blob = _blob_id(entry)
        if self.local is not None:
            return self.local / name, self.meta / f"{name}.{blob}.incomplete", self.meta / f"{name}.lock"
        final = self.repo / "blobs" / blob
        lock = self.repo.parent / ".locks" / self.repo.name / f"{blob}.lock"  # huggingface_hub's lock too
        return final, final.with_name(f"{blob}.incomplete"), lock

    def finish(self, names: list[str], files: dict, revision: str | None) -> Path:
        """Link the snapshot to its blobs and point the revision at the commit (in a local folder: leave the
        notes by which huggingface_hub knows its files are current). Returns where the files are."""
        if self.local is not None:
            for name in names:
                note = self.meta / f"{name}.metadata"
                note.parent.mkdir(parents=True, exist_ok=True)
                note.write_text(f"{self.commit}\n{_blob_id(files[name])}\n{time.time()}\n")
            return self.local.resolve()
        for name in names:
            _link(self.repo / "blobs" / _blob_id(files[name]), self.target(name))
        ref = revision or "main"
        if ref != self.commit:
            _write_atomic(self.repo / "refs" / ref, self.commit)
        return self.snapshot


def _link(blob: Path, pointer: Path) -> None:
    """Point a snapshot entry at its blob: a relative symlink as huggingface_hub makes, or where the file
    system has none (Windows without developer mode), a hard link or else a copy."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(blob, pointer.parent)
    if pointer.is_symlink() and os.readlink(pointer) == relative:
        return
    if os.path.lexists(pointer):
        pointer.unlink()
    try:
        os.symlink(relative, pointer)
        return
    except OSError:
        pass
    try:
        os.link(blob, pointer)
    except OSError:
        partial = pointer.with_name(f".{pointer.name}.{os.getpid()}.incomplete")
        shutil.copyfile(blob, partial)
        os.replace(partial, pointer)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.incomplete")
    partial.write_text(text)
    os.replace(partial, path)


class _Oversized(Exception):
    """The server sent more bytes than the listing states."""


def _fetch(repo_id, name, entry, layout: _Layout, token, endpoint, advance) -> None:
    """Fetch one file into its final place, resuming what an earlier attempt or run left behind."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    final, partial, lock = layout.paths(name, entry)
    for d in (final.parent, partial.parent, lock.parent):
        d.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):  # falls back to a soft lock where the filesystem has no flock
        if layout.complete(name, entry):  # another process finished it while we waited
            return
        if partial.exists() and partial.stat().st_size > entry.size:
            partial.unlink()
        advance(partial.stat().st_size if partial.exists() else 0)
        url = hf_hub_url(repo_id, name, revision=layout.commit, endpoint=endpoint)
        headers = build_hf_headers(token=token, library_name="jamba-cli")
        while (done := partial.stat().st_size if partial.exists() else 0) < entry.size:
            # after a dropped connection, go on for as long as each attempt makes progress; the size is checked
            # here, against the listing (a server may send more or fewer bytes than it says)
            try:
                with open(partial, "ab") as f:
                    # LFS files redirect to a CDN; the HTTP client drops the token when the origin changes
                    http_get(url, _Counted(f, advance, entry.size), resume_size=done, headers=headers)
            except _Oversized:
                partial.unlink()
                raise HubError(f"{name} from {repo_id} is larger than the {entry.size:,} bytes its listing "
                               "states; nothing of it was kept") from None
            except _network_errors():
                if partial.stat().st_size == done:
                    raise
                continue
            if partial.stat().st_size < entry.size:  # the server ended the file early
                partial.unlink()
                raise HubError(f"{name} from {repo_id} is smaller than the {entry.size:,} bytes its listing "
                               "states; nothing of it was kept")
        partial.touch()  # an empty file is fetched by no request
        check, digest = ("sha256", _sha256(partial)) if entry.lfs is not None else ("blob id", _git_blob_id(partial))
        if digest != _blob_id(entry):
            partial.unlink()
            raise HubError(f"{name} from {repo_id} failed its {check} check; run the command again to fetch it "
                           "afresh")
        os.replace(partial, final)  # over a link, replaces the link: never writes through it


class _Counted:
    """The file huggingface_hub's http_get writes into: each write moves the progress bar, and none may grow
    the file past `limit` bytes (http_get may rewind it when a server ignores the Range, so ask the file)."""

    def __init__(self, f, advance, limit: int):
        self._f, self._advance, self._limit = f, advance, limit

    def write(self, data: bytes) -> int:
        if self._f.tell() + len(data) > self._limit:
            raise _Oversized
        n = self._f.write(data)
        self._advance(len(data))
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def _git_blob_id(path: Path) -> str:
    """git's id of a file's content (what the Hub lists as blobId for files not in LFS)."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def _endpoint() -> str:
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it per call gives the same answer in the CLI
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _listing(repo_id, revision, token, endpoint):
    """(commit sha, {filename: sibling with .size, .blob_id and .lfs.sha256}) at the revision, every entry
    checked: a name that cannot be a relative path, or malformed metadata, refuses the whole repo."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint, library_name="jamba-cli").model_info(
        repo_id, revision=revision, files_metadata=True, token=token)
    refuse = f"refusing to download {repo_id}:"
    if not (isinstance(info.sha, str) and _COMMIT.fullmatch(info.sha)):
        raise HubError(f"{refuse} its listing gives the commit id {info.sha!r}, not 40 hex digits")
    files = {}
    for s in info.siblings or []:
        why = _name_problem(s.rfilename) or ("is listed twice" if s.rfilename in files else _entry_problem(s))
        if why:
            raise HubError(f"{refuse} the file name {s.rfilename!r} {why}")
        files[s.rfilename] = s
    return info.sha, files


def _name_problem(name) -> str | None:
    """Why a listed file name cannot be a path relative to the destination (on POSIX or Windows), or None."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if _CONTROL.search(name):
        return "has a control character"
    if "\\" in name:
        return "has a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "goes up a folder ('..')"
    if any(p in ("", ".") for p in parts):
        return "has an empty or '.' part"
    if any(re.match(r"[A-Za-z]:", p) for p in parts):
        return "has a drive letter"
    return None


def _entry_problem(entry) -> str | None:
    """Why a listed file's size or hash is unusable (they name and bound what is written), or None."""
    if type(entry.size) is not int or entry.size < 0:
        return f"has the size {entry.size!r}"
    if entry.lfs is not None:
        sha256 = getattr(entry.lfs, "sha256", None)
        return None if isinstance(sha256, str) and _SHA256.fullmatch(sha256) else f"has the sha256 {sha256!r}"
    if not (isinstance(entry.blob_id, str) and _COMMIT.fullmatch(entry.blob_id)):
        return f"has the blob id {entry.blob_id!r}"
    return None


def _select(files: dict, filenames, include, exclude, repo_id) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    if filenames:
        missing = [f for f in filenames if f not in files]
        if missing:
            raise HubError(f"{missing[0]} is not a file in {repo_id}")
        return list(dict.fromkeys(filenames))
    names = list(filter_repo_objects(list(files), allow_patterns=include or DEFAULT_INCLUDE,
                                     ignore_patterns=exclude))
    if not names:
        raise HubError(f"no file in {repo_id} matches the include/exclude patterns")
    return names


def _from_cache(repo_id, revision, filenames, include, exclude, cache_dir, local_dir, why) -> Path:
    """The snapshot (or local_dir) holding what was asked for, read without network (huggingface_hub writes
    nothing with local_files_only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hint = f"{repo_id} is not fully in the local cache and {why}; run `jamba download {repo_id}` when online"
    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=filenames or include or DEFAULT_INCLUDE,
                                      ignore_patterns=None if filenames else exclude,
                                      cache_dir=str(_cache_root(cache_dir)),
                                      local_dir=None if local_dir is None else str(local_dir)))
    except LocalEntryNotFoundError:
        raise HubError(hint) from None
    if any(not (path / f).is_file() for f in filenames or ()):
        raise HubError(hint)
    if not (filenames or include or local_dir) and not is_cached(repo_id, revision, cache_dir):
        raise HubError(hint)  # the default selection is a model: config, tokenizer and every shard
    return path


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of the HTTP client huggingface_hub uses (httpx2, httpx or requests, by version)."""
    names = (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
             ("requests", "Timeout"), ("requests.exceptions", "ChunkedEncodingError"))
    return tuple(getattr(sys.modules[m], n) for m, n in names if m in sys.modules)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, endpoint: str):
    """Turn huggingface_hub and OS errors into one-line HubErrors; no message quotes the token."""
    from huggingface_hub import errors as e

    again = "run the command again (a download resumes where it stopped)"
    try:
        yield
    except HubError:
        raise
    except e.GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id}, then pass `token` "
                       "or set HF_TOKEN") from None
    except e.RepositoryNotFoundError:
        raise HubError(f"repository {repo_id} not found on {endpoint} (if it is private, pass `token` or set "
                       "HF_TOKEN)") from None
    except e.RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found in {repo_id}") from None
    except e.LocalEntryNotFoundError:  # the Hub went away half-way and the cache cannot stand in
        raise HubError(f"cannot reach {endpoint}: check the connection and {again}") from None
    except e.EntryNotFoundError:
        raise HubError(f"a requested file is not in {repo_id} at revision {revision or 'main'}") from None
    except e.HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise HubError(f"not authorised to download {repo_id} (HTTP {status}): check `token` or "
                           "HF_TOKEN") from None
        raise HubError(f"{endpoint} answered HTTP {status} for {repo_id}; {again}") from None
    except e.HFValidationError:
        raise HubError(f"{repo_id!r} is not a valid repo id; use ORG/NAME") from None
    except e.OfflineModeIsEnabled:
        raise HubError("this needs the Hub, and offline mode is on (HF_HUB_OFFLINE)") from None
    except _network_errors():  # before OSError: requests' errors are OSErrors too
        raise HubError(f"cannot reach {endpoint}: check the connection and {again}") from None
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise HubError(f"disk full while downloading {repo_id}; free some space and {again}") from None


@contextmanager
def _hf_quiet():
    """Mute huggingface_hub's tqdm bars and retry warnings: we draw our own bar on request, errors in one line."""
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    log, bars_on = logging.getLogger("huggingface_hub"), not are_progress_bars_disabled()
    level = log.level
    log.setLevel(logging.ERROR)
    if bars_on:
        disable_progress_bars()
    try:
        yield
    finally:
        log.setLevel(level)
        if bars_on:
            enable_progress_bars()


@contextmanager
def _progress_bar(enabled: bool, total: int):
    """Yield advance(nbytes), which moves a bar of the bytes fetched on stderr when enabled."""
    if not enabled or total == 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("download", total=total)
        yield lambda n: bar.advance(task, n)
