"""`jamba download`: fetch a checkpoint from the Hugging Face Hub into the HF cache or a local folder.

huggingface_hub lists the repo, maps the Hub's errors, lays out the cache (refs, snapshots, symlinks) and
serves offline use. The weight files (LFS) are fetched here first, because huggingface_hub >= 1.x writes
each download to a uniquely named temporary file and deletes it on failure: an interrupted multi-GB shard
would start from zero on the next run. Here a partial file keeps a stable name beside its final place, is
resumed with an HTTP Range request, checked against its sha256 and only then renamed into place, where
huggingface_hub finds it and just links it into the snapshot.

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
from contextlib import contextmanager
from pathlib import Path

from .errors import HubError
from .terminal import format_bytes

REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")  # ORG/NAME: what `jamba -m` and `load` take for a Hub repo
DEFAULT_INCLUDE = ["*.safetensors", "*.json", "tokenizer*", "*.jinja"]  # no .bin/.pt/GGUF duplicates
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}


def _cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF hub cache folder, from the environment as huggingface_hub resolves it."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
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
    if not _COMMIT.fullmatch(commit):
        try:
            commit = (repo / "refs" / commit).read_text().strip()
        except OSError:
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
    return bool(shards) and all((snap / s).is_file() for s in shards)


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
    endpoint = _endpoint()
    with _hub_errors(repo_id, revision, endpoint):
        commit, files = _listing(repo_id, revision, token, endpoint)
        layout = _Layout(repo_id, commit, cache_dir, local_dir)
        return [(n, files[n].size or 0) for n in _select(files, filenames, include, exclude, repo_id)
                if not layout.complete(n, files[n])]


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
        HubError: not found, gated or unauthorised, offline and not cached, disk full, transfer cut off.
    """
    from huggingface_hub import constants, snapshot_download

    if local_dir is not None and cache_dir is not None:
        raise HubError("use either `local_dir` or `cache_dir`, not both")
    endpoint = _endpoint()
    offline = offline or constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    where = dict(cache_dir=str(_cache_root(cache_dir)), local_dir=None if local_dir is None else str(local_dir))
    cached = dict(allow_patterns=filenames or include or DEFAULT_INCLUDE,
                  ignore_patterns=None if filenames else exclude)
    with _hub_errors(repo_id, revision, endpoint), _hf_quiet():
        if offline:
            return _from_cache(repo_id, revision, filenames, cached, where, "offline mode is on")
        try:
            commit, files = _listing(repo_id, revision, token, endpoint)
        except _network_errors():
            return _from_cache(repo_id, revision, filenames, cached, where, f"{endpoint} cannot be reached")
        names = _select(files, filenames, include, exclude, repo_id)
        layout = _Layout(repo_id, commit, cache_dir, local_dir)
        todo = [n for n in names if files[n].lfs is not None and not layout.complete(n, files[n])]
        need = sum(files[n].size or 0 for n in todo)
        layout.root.mkdir(parents=True, exist_ok=True)
        if need > (free := shutil.disk_usage(layout.root).free):
            raise HubError(f"not enough disk space in {layout.root}: {format_bytes(need)} needed, "
                           f"{format_bytes(free)} free")
        with _progress_bar(progress, need) as advance:
            for name in todo:
                _fetch(repo_id, commit, name, files[name], layout, token, endpoint, advance)
        # the weights are in place: this links them into the snapshot and fetches the small files
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=names, token=token,
                                      endpoint=endpoint, library_name="jamba-cli", **where))


class _Layout:
    """Where a file's final copy, partial download and lock live: in the HF cache or in a local folder."""

    def __init__(self, repo_id: str, commit: str, cache_dir, local_dir):
        self.local = Path(local_dir).expanduser() if local_dir is not None else None
        self.repo, self.commit = _repo_dir(repo_id, cache_dir), commit
        self.root = self.local or _cache_root(cache_dir)

    def complete(self, name: str, entry) -> bool:
        if self.local is not None:
            path = self.local / name
            return path.is_file() and path.stat().st_size == entry.size
        return (self.repo / "snapshots" / self.commit / name).is_file() or (
            entry.lfs is not None and (self.repo / "blobs" / entry.lfs.sha256).is_file())

    def paths(self, name: str, sha256: str) -> tuple[Path, Path, Path]:
        """(final, partial, lock), named as huggingface_hub 0.x names them, so either resumes the other's."""
        if self.local is not None:
            meta = self.local / ".cache" / "huggingface" / "download"
            return self.local / name, meta / f"{name}.{sha256}.incomplete", meta / f"{name}.lock"
        blob = self.repo / "blobs" / sha256
        lock = self.repo.parent / ".locks" / self.repo.name / f"{sha256}.lock"  # huggingface_hub's lock too
        return blob, blob.with_name(f"{sha256}.incomplete"), lock


def _fetch(repo_id, commit, name, entry, layout: _Layout, token, endpoint, advance) -> None:
    """Fetch one LFS file into its final place, resuming what an earlier attempt or run left behind."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    final, partial, lock = layout.paths(name, entry.lfs.sha256)
    for d in (final.parent, partial.parent, lock.parent):
        d.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):  # falls back to a soft lock where the filesystem has no flock
        if final.is_file():  # another process finished it while we waited
            return
        if partial.exists() and partial.stat().st_size > entry.size:
            partial.unlink()
        advance(partial.stat().st_size if partial.exists() else 0)
        url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
        headers = build_hf_headers(token=token, library_name="jamba-cli")
        while True:  # after a dropped connection, go on for as long as each attempt makes progress
            done = partial.stat().st_size if partial.exists() else 0
            try:
                with open(partial, "ab") as f:
                    # LFS files redirect to a CDN; the HTTP client drops the token when the origin changes
                    http_get(url, _Counted(f, advance), resume_size=done, headers=headers, expected_size=entry.size)
                break
            except _network_errors():
                if partial.stat().st_size == done:
                    raise
        if _sha256(partial) != entry.lfs.sha256:
            partial.unlink()
            raise HubError(f"{name} from {repo_id} failed its sha256 check; run the command again to fetch it "
                           "afresh")
        os.replace(partial, final)


class _Counted:
    """The file huggingface_hub's http_get writes into, reporting each write to the progress bar."""

    def __init__(self, f, advance):
        self._f, self._advance = f, advance

    def write(self, data: bytes) -> int:
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


def _endpoint() -> str:
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it per call gives the same answer in the CLI
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _listing(repo_id, revision, token, endpoint):
    """(commit sha, {filename: sibling with .size and .lfs.sha256}) at the revision."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint, library_name="jamba-cli").model_info(
        repo_id, revision=revision, files_metadata=True, token=token)
    return info.sha, {s.rfilename: s for s in info.siblings or []}


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


def _from_cache(repo_id, revision, filenames, patterns, where, why) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hint = f"{repo_id} is not fully in the local cache and {why}; run `jamba download {repo_id}` when online"
    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, **patterns, **where))
    except LocalEntryNotFoundError:
        raise HubError(hint) from None
    if any(not (path / f).is_file() for f in filenames or ()):
        raise HubError(hint)
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
