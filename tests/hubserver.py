"""A local stand-in for the Hugging Face Hub: the part of its HTTP API that huggingface_hub uses to download
model repos, plus a separate "CDN" origin that serves LFS blobs, as the real Hub does.

Hub origin:
  GET  /api/models/{repo}[/revision/{rev}][?blobs=true]  model info: sha and siblings (sizes, blobId, lfs)
  GET  /api/models/{repo}/tree/{rev}[?recursive=true]     tree listing (huggingface_hub >= 1.x snapshots)
  HEAD|GET /{repo}/resolve/{rev}/{path}                    small files: 200 + ETag (git blob sha1);
                                                           LFS files: 302 to the CDN + X-Linked-Etag/-Size
CDN origin:
  HEAD|GET /{sha256}                                       the blob, with Range -> 206

Errors carry the headers the Hub sends (X-Error-Code RepoNotFound / GatedRepo / RevisionNotFound /
EntryNotFound); unknown repos answer 401 without a token and 404 with one, like the Hub. Every request is
recorded in `hub.log`. `hub.drop(repo_id, path, at=N)` makes the next GET of that file's blob close the
connection after byte N, and with `outage=True` every later request gets 503 until `hub.down` is set back
to False. `repo.claimed_sizes` makes the listing state a size other than the content's.

A hostile mirror, for the download's safety checks: file names are served as listed, whatever they are
(`../../X.safetensors`, absolute, backslashes, NUL), also at the URL an HTTP client makes of such a name by
removing its dot segments; `repo.listed_sha` and `repo.claimed_sha256` make the listing state another
commit id or LFS sha256 than the real ones, and `hub.forged_headers` are added to every resolve answer
(e.g. an ETag or X-Repo-Commit naming a path outside the cache).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".model")
TOKEN = "hf_jambaTestToken0123456789abcdef"  # the one token that opens gated repos


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    gated: bool = False
    claimed_sizes: dict[str, int] = field(default_factory=dict)  # path -> size the listing states instead
    claimed_sha256: dict[str, str] = field(default_factory=dict)  # path -> LFS sha256 the listing states instead
    listed_sha: str | None = None  # the commit id the listing states instead of the real one


class FakeHub:
    """Two ThreadingHTTPServers on 127.0.0.1 (hub and CDN) sharing this state."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()
        self._servers = [_Server(self, cdn=False), _Server(self, cdn=True)]
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        for s in self._servers:
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def reset(self) -> None:
        """Forget every repo, request and switch (one server can then serve many tests)."""
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content, what the CDN serves
        self.log: list[dict] = []
        self.down = False
        self.forged_headers: dict[str, str] = {}  # added to every resolve answer
        self._drops: dict[str, tuple[int, bool]] = {}  # sha256 -> (byte offset, outage afterwards)

    def close(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def add_commit(self, repo_id: str, files: dict[str, bytes], *, ref: str = "main", gated: bool = False) -> str:
        """Publish `files` as a new commit of `repo_id` that `ref` points to; returns the commit sha."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        sha = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated = repo.gated or gated
        repo.commits[sha] = dict(files)
        repo.refs[ref] = sha
        for name, data in files.items():
            if name.endswith(LFS_SUFFIXES):
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        return sha

    def drop(self, repo_id: str, path: str, *, at: int, outage: bool = False, ref: str = "main") -> None:
        data = self.repos[repo_id].commits[self.repos[repo_id].refs[ref]][path]
        self._drops[hashlib.sha256(data).hexdigest()] = (at, outage)

    def requests(self, method: str | None = None, contains: str = "") -> list[dict]:
        with self._lock:
            return [r for r in self.log if (method is None or r["method"] == method) and contains in r["path"]]

    def blob_gets(self, repo_id: str, path: str, ref: str = "main") -> list[dict]:
        """The CDN GETs for one file's content (LFS files only)."""
        data = self.repos[repo_id].commits[self.repos[repo_id].refs[ref]][path]
        return [r for r in self.requests("GET") if r["cdn"] and r["path"] == "/" + hashlib.sha256(data).hexdigest()]

    def _record(self, entry: dict) -> None:
        with self._lock:
            self.log.append(entry)

    def _take_drop(self, sha256: str) -> tuple[int, bool] | None:
        with self._lock:
            return self._drops.pop(sha256, None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub, cdn: bool):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.cdn = hub, cdn

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-body (what the drop tests provoke) is not a server fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # keep test output clean; requests go to hub.log instead
        pass

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    # --- plumbing ---------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        hub = self.server.hub
        self.entry = {"cdn": self.server.cdn, "method": self.command, "path": urlsplit(self.path).path,
                      "range": self.headers.get("Range"), "auth": self.headers.get("Authorization"), "sent": 0}
        hub._record(self.entry)
        if hub.down:
            return self._error(503, None, "Service unavailable")
        (self._cdn if self.server.cdn else self._hub)()

    def _send(self, status: int, headers: dict, body: bytes = b"") -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "GET" and body:
            self.wfile.write(body)
            self.entry["sent"] = len(body)

    def _error(self, status: int, code: str | None, message: str, extra: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": message}).encode())

    def _json(self, obj) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    # --- hub origin -------------------------------------------------------------------------------------
    def _hub(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        path = unquote(parts.path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?", path)
        if m:
            repo_id, kind, rev = m.group(1), m.group(2) or "revision", m.group(3) or "main"
            return self._api(repo_id, kind, rev, query.get("blobs", [""])[0].lower() == "true")
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and m.group(3) in self._files(m.group(1), m.group(2)):
            return self._resolve(*m.groups())
        found = self._dot_segments_removed(path)
        if found:
            return self._resolve(*found)
        if m:
            return self._resolve(*m.groups())
        self._error(404, None, "Not found")

    def _files(self, repo_id: str, rev: str) -> dict[str, bytes]:
        repo = self.server.hub.repos.get(repo_id)
        return {} if repo is None else repo.commits.get(repo.refs.get(rev, rev), {})

    def _dot_segments_removed(self, path: str) -> tuple[str, str, str] | None:
        """(repo, rev, name) of a listed name whose resolve URL an HTTP client turns into `path` by removing
        its dot segments (`a/resolve/main/../../X` -> `/a/X`): the hostile mirror serves it there too."""
        for repo_id, repo in list(self.server.hub.repos.items()):
            for rev in [*repo.refs, *repo.commits]:
                for name in self._files(repo_id, rev):
                    url = f"/{repo_id}/resolve/{rev}/{name}"
                    if ".." in name.split("/") and posixpath.normpath(url) == path:
                        return repo_id, rev, name
        return None

    def _lookup(self, repo_id: str, rev: str, gate: bool) -> tuple[str, dict[str, bytes]] | None:
        """The commit for (repo, rev), or None after sending the error the Hub would send."""
        repo = self.server.hub.repos.get(repo_id)
        auth = self.headers.get("Authorization")
        if repo is None:
            self._error(401 if auth is None else 404, "RepoNotFound", "Repository not found")
            return None
        if gate and repo.gated and auth != f"Bearer {TOKEN}":
            self._error(401 if auth is None else 403, "GatedRepo",
                        f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.")
            return None
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return sha, repo.commits[sha]

    def _api(self, repo_id: str, kind: str, rev: str, blobs: bool) -> None:
        found = self._lookup(repo_id, rev, gate=False)  # the Hub shows a gated repo's file list to anyone
        if found is None:
            return
        sha, files = found
        repo = self.server.hub.repos[repo_id]

        def meta(name: str, data: bytes) -> dict:  # what the Hub reports per file when asked for blobs
            size = repo.claimed_sizes.get(name, len(data))
            out = {"blobId": git_blob_sha1(data), "size": size}
            if name.endswith(LFS_SUFFIXES):
                sha256 = repo.claimed_sha256.get(name, hashlib.sha256(data).hexdigest())
                out["lfs"] = {"sha256": sha256, "size": size, "pointerSize": 134}
            return out

        if kind == "tree":
            tree = []
            for name, data in sorted(files.items()):
                m = meta(name, data)
                tree.append({"type": "file", "oid": m["blobId"], "size": m["size"], "path": name})
                if "lfs" in m:
                    tree[-1]["lfs"] = {"oid": m["lfs"]["sha256"], "size": m["size"], "pointerSize": 134}
            return self._json(tree)
        siblings = [{"rfilename": name, **(meta(name, data) if blobs else {})} for name, data in sorted(files.items())]
        self._json({"_id": sha[:24], "id": repo_id, "modelId": repo_id, "sha": repo.listed_sha or sha, "private": False,
                    "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                    "lastModified": "2025-07-01T00:00:00.000Z", "siblings": siblings})

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        found = self._lookup(repo_id, rev, gate=True)
        if found is None:
            return
        sha, files = found
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"", {"X-Repo-Commit": sha})
        data, forged = files[path], self.server.hub.forged_headers
        if path.endswith(LFS_SUFFIXES):
            digest = hashlib.sha256(data).hexdigest()
            return self._send(302, {"Location": f"{self.server.hub.cdn_url}/{digest}", "X-Repo-Commit": sha,
                                    "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data)),
                                    "ETag": f'"{git_blob_sha1(data)}"', **forged})
        self._body(data, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": sha, **forged})

    # --- CDN origin -------------------------------------------------------------------------------------
    def _cdn(self) -> None:
        digest = urlsplit(self.path).path.lstrip("/")
        data = self.server.hub.blobs.get(digest)
        if data is None:
            return self._error(404, None, "NoSuchKey")
        drop = self.server.hub._take_drop(digest) if self.command == "GET" else None
        self._body(data, {"ETag": f'"{digest}"'}, drop)

    def _body(self, data: bytes, headers: dict, drop: tuple[int, bool] | None = None) -> None:
        """Send `data` honouring a `Range: bytes=a-[b]` header; with `drop`, cut the connection at that byte."""
        start, end = 0, len(data) - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if m:
            start, end = int(m.group(1)), min(int(m.group(2) or end), end)
            if start >= len(data):
                return self._error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}"})
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers,
                   "Content-Length": str(end - start + 1)}
        if m:
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if drop is None:
            return self._send(206 if m else 200, headers, data[start:end + 1])
        at, outage = drop
        self.send_response(206 if m else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[start:max(at, start)])
        self.wfile.flush()
        self.entry["sent"] = max(at - start, 0)
        self.entry["dropped"] = True
        if outage:
            self.server.hub.down = True
        self.close_connection = True  # the client sees the body end early
