"""`jamba download` library against a local Hub (tests/hubserver.py) that huggingface_hub talks to over real
HTTP: HF_ENDPOINT points at it, and the checkpoint it serves is a real one that the loader then loads.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: in this process long ago
(transformers imports it). So the `hub` fixture (conftest.py) sets the environment, which hub.py reads per
call, and also the values huggingface_hub took from it; one test runs a fresh interpreter with only the
environment set, as the CLI runs.
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DEFAULT, REPO, SHARD1, SHARD2
from hubserver import TOKEN
from jamba_cli.errors import UsageError
from jamba_cli.hub import HubError, cached_repo_ids, download, is_cached, plan_download


def cache(tmp_path) -> Path:
    return tmp_path / "cache" / ("models--" + REPO.replace("/", "--"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hub_error(fn, *args, **kwargs) -> str:
    with pytest.raises(HubError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and TOKEN not in message
    return message


def test_download_default_selection_then_load(hub, tmp_path, repo_files):
    from jamba_cli.loader import load

    assert not is_cached(REPO) and cached_repo_ids() == []
    path = download(REPO)
    commit = hub.repos[REPO].refs["main"]
    assert path == cache(tmp_path) / "snapshots" / commit
    assert {p.name for p in path.iterdir()} == DEFAULT
    assert all((path / n).read_bytes() == repo_files[n] for n in DEFAULT)
    assert (cache(tmp_path) / "refs" / "main").read_text() == commit
    assert not list(cache(tmp_path).rglob("*.incomplete"))
    assert is_cached(REPO) and is_cached(REPO, commit) and cached_repo_ids() == [REPO]
    assert not hub.requests(contains="pytorch_model.bin") and not hub.requests(contains=".gguf")

    model, tokenizer = load(REPO, dtype="fp32", device="cpu")  # by repo id, from the cache
    assert model.config.intermediate_size == 6144 and tokenizer.vocab_size > 0

    hub.log.clear()
    assert download(REPO) == path  # a second run lists the repo and fetches nothing
    assert not [r for r in hub.log if r["cdn"] or "/resolve/" in r["path"]]


def test_include_exclude_and_filenames(hub, tmp_path, repo_files):
    path = download(REPO, include=["*.json"], exclude=["generation_*"])
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors.index.json", "tokenizer.json",
                                                "tokenizer_config.json"}
    assert not [r for r in hub.log if r["cdn"]]  # no weights fetched
    assert not is_cached(REPO) and cached_repo_ids() == [REPO]  # a config but no weights: listed, not loadable

    path = download(REPO, include=["*.bin"])  # an explicit include replaces the default one
    assert (path / "pytorch_model.bin").read_bytes() == repo_files["pytorch_model.bin"]

    path = download(REPO, ["README.md", SHARD2], include=["*.json"])  # explicit files win over patterns
    assert (path / SHARD2).read_bytes() == repo_files[SHARD2] and (path / "README.md").exists()
    assert not (path / SHARD1).exists()

    assert "nope.json is not a file in" in hub_error(download, REPO, ["config.json", "nope.json"])
    assert "matches" in hub_error(download, REPO, include=["*.onnx"])


def test_revision_branch_tag_and_commit(hub, tmp_path, repo_files):
    old = {**repo_files, "config.json": repo_files["config.json"].replace(b"6144", b"6144 ")}
    v1 = hub.add_commit(REPO, old, ref="v1")
    main = hub.repos[REPO].refs["main"]

    path = download(REPO, ["config.json"], revision="v1")
    assert path.name == v1 and (path / "config.json").read_bytes() == old["config.json"]
    assert (cache(tmp_path) / "refs" / "v1").read_text() == v1
    assert download(REPO, ["config.json"], revision=main).name == main
    assert (cache(tmp_path) / "snapshots" / main / "config.json").read_bytes() == repo_files["config.json"]
    assert "revision 'v9' not found in" in hub_error(download, REPO, revision="v9")
    assert "revision 'v9' not found in" in hub_error(plan_download, REPO, revision="v9")


def test_dry_run_lists_what_is_left_to_fetch(hub, tmp_path, repo_files):
    plan = plan_download(REPO)
    assert dict(plan) == {n: len(repo_files[n]) for n in DEFAULT}
    assert plan_download(REPO, ["README.md"]) == [("README.md", len(repo_files["README.md"]))]
    assert not hub.requests(contains="/resolve/") and not list(tmp_path.rglob("*.safetensors"))

    download(REPO, [SHARD1, "config.json"])
    assert {n for n, _ in plan_download(REPO)} == DEFAULT - {SHARD1, "config.json"}
    out = tmp_path / "out"
    assert dict(plan_download(REPO, local_dir=out)) == {n: len(repo_files[n]) for n in DEFAULT}
    download(REPO)
    assert plan_download(REPO) == []


def test_offline_uses_the_cache_or_says_how_to_fill_it(hub, tmp_path, monkeypatch):
    msg = hub_error(download, REPO, offline=True)
    assert "offline" in msg and f"jamba download {REPO}" in msg
    assert hub.log == []  # offline means no request at all

    path = download(REPO)
    hub.log.clear()
    assert download(REPO, offline=True) == path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download(REPO) == path
    assert "offline" in hub_error(download, REPO, ["README.md"])  # not fetched before
    assert hub.log == []

    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as s:  # a port nobody listens on: the Hub is unreachable
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    assert download(REPO) == path  # falls back to the complete cached snapshot
    assert "cannot be reached" in hub_error(download, "ai21labs/other")


def test_not_found_gated_and_token_handling(hub, tmp_path, repo_files, monkeypatch, capsys):
    assert "repository ai21labs/missing not found" in hub_error(download, "ai21labs/missing")
    assert "not found" in hub_error(download, "ai21labs/missing", token=TOKEN)
    assert "not found" in hub_error(plan_download, "ai21labs/missing")
    with pytest.raises(UsageError, match="'bad//id' is not a Hub repo id"):  # the caller's mistake: exit 2
        download("bad//id")

    hub.add_commit("ai21labs/gated", {"config.json": b"{}", "model.safetensors": repo_files[SHARD1]}, gated=True)
    assert "is gated" in hub_error(download, "ai21labs/gated")
    assert "is gated" in hub_error(download, "ai21labs/gated", token="hf_wrong")
    assert hub.requests(contains="/resolve/")[-1]["auth"] == "Bearer hf_wrong"
    assert not (tmp_path / "cache" / "models--ai21labs--gated" / "blobs" / sha256(repo_files[SHARD1])).exists()

    hub.log.clear()
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the environment works as well as --token
    path = download("ai21labs/gated")
    assert (path / "model.safetensors").read_bytes() == repo_files[SHARD1]
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub.log if not r["cdn"] and "/ai21labs/" in r["path"])
    assert [r["auth"] for r in hub.log if r["cdn"]] == [None]  # the token never leaves the Hub's origin
    assert capsys.readouterr() == ("", "")


def where(tmp_path, local_dir, name, repo_files) -> tuple[Path, Path]:
    """Final and partial paths of an LFS file, named as huggingface_hub 0.x names them."""
    digest = sha256(repo_files[name])
    if local_dir is None:
        return cache(tmp_path) / "blobs" / digest, cache(tmp_path) / "blobs" / f"{digest}.incomplete"
    return local_dir / name, local_dir / ".cache" / "huggingface" / "download" / f"{name}.{digest}.incomplete"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cache", "local_dir"])
def test_interrupted_download_resumes_on_the_next_run(hub, tmp_path, repo_files, target):
    from jamba_cli.loader import load

    local_dir = tmp_path / "out" if target == "local_dir" else None
    size = len(repo_files[SHARD2])
    hub.drop(REPO, SHARD2, at=12_000_000, outage=True)  # cut mid-shard, then the Hub goes down
    assert "a download resumes where it stopped" in hub_error(download, REPO, local_dir=local_dir)

    final1, partial1 = where(tmp_path, local_dir, SHARD1, repo_files)
    final2, partial2 = where(tmp_path, local_dir, SHARD2, repo_files)
    assert final1.read_bytes() == repo_files[SHARD1] and not partial1.exists()
    assert not final2.exists()  # nothing half-written where the complete file belongs
    kept = partial2.stat().st_size
    assert 0 < kept < size and partial2.read_bytes() == repo_files[SHARD2][:kept]
    assert not is_cached(REPO)

    hub.down = False
    path = download(REPO, local_dir=local_dir)
    assert len(hub.blob_gets(REPO, SHARD1)) == 1  # completed before the cut: not fetched again
    gets = hub.blob_gets(REPO, SHARD2)
    assert gets[0].get("dropped") and gets[-1]["range"] == f"bytes={kept}-" and gets[-1]["sent"] == size - kept
    assert (path / SHARD2).read_bytes() == repo_files[SHARD2] and not partial2.exists()
    assert not list(tmp_path.rglob("*.incomplete"))
    load(path, dtype="fp32", device="cpu")
    if local_dir is not None:
        assert path == local_dir.resolve() and not (path / SHARD2).is_symlink()
        assert not list((tmp_path / "cache").rglob("*.safetensors"))  # no second copy in the cache


def test_connection_dropped_once_is_resumed_in_the_same_run(hub, repo_files, capsys):
    hub.drop(REPO, SHARD2, at=11_000_000)
    path = download(REPO, [SHARD2])
    assert capsys.readouterr().err == ""  # huggingface_hub's retry warnings are kept off the terminal
    assert (path / SHARD2).read_bytes() == repo_files[SHARD2]
    first, second = hub.blob_gets(REPO, SHARD2)
    start = int(second["range"].removeprefix("bytes=").rstrip("-"))  # from the last chunk written to disk
    assert first["dropped"] and 0 < start <= 11_000_000 and second["sent"] == len(repo_files[SHARD2]) - start


def test_corrupted_transfer_is_thrown_away(hub, tmp_path, repo_files):
    data = repo_files[SHARD1]
    hub.blobs[sha256(data)] = data[:-1] + bytes([data[-1] ^ 1])  # the CDN serves one flipped bit
    assert "failed its sha256 check" in hub_error(download, REPO, [SHARD1])
    assert not any(p.exists() for p in where(tmp_path, None, SHARD1, repo_files))


def test_disk_full(hub, tmp_path, repo_files):
    blobs = cache(tmp_path) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha256(repo_files[SHARD1])}.incomplete").symlink_to("/dev/full")  # writes fail with ENOSPC
    assert "disk full" in hub_error(download, REPO)
    assert not (blobs / sha256(repo_files[SHARD1])).exists()

    hub.repos[REPO].claimed_sizes[SHARD2] = 2**62  # the listing claims a shard larger than any disk
    assert "not enough disk space" in hub_error(download, REPO, [SHARD2])
    assert not hub.blob_gets(REPO, SHARD2)  # refused before fetching anything


def test_progress_only_when_asked(hub, capsys):
    download(REPO, [SHARD1])
    assert capsys.readouterr() == ("", "")  # no stray bars or log lines, on stdout or stderr
    download(REPO, [SHARD2], progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "14.5 MB" in err


def test_both_local_and_cache_dir_is_an_error(hub, tmp_path):
    with pytest.raises(UsageError, match="`local_dir` and `cache_dir` exclude each other"):
        download(REPO, local_dir=tmp_path / "a", cache_dir=tmp_path / "b")
    assert hub.log == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def python_env() -> dict[str, str]:
    """This environment, with the checkout importable (CI installs the package; locally PYTHONPATH does)."""
    root = str(Path(__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def test_fresh_process_reads_the_environment(hub, tmp_path):
    """As the CLI runs: huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE at import."""
    env = python_env()
    code = f"from jamba_cli.hub import download; print(download({REPO!r}))"
    want = cache(tmp_path) / "snapshots" / hub.repos[REPO].refs["main"]
    online = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert (online.returncode, online.stdout.strip(), online.stderr) == (0, str(want), "")

    hub.log.clear()
    offline = subprocess.run([sys.executable, "-c", code], env={**env, "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=60)
    assert (offline.returncode, offline.stdout.strip(), offline.stderr) == (0, str(want), "")
    assert hub.log == []  # offline: not a single request


def test_cache_queries_import_neither_huggingface_hub_nor_torch(hub):
    """--model completion calls these on every TAB: they must stay cheap."""
    download(REPO, ["config.json"])
    code = ("import sys; from jamba_cli.hub import cached_repo_ids, is_cached;"
            f"print(cached_repo_ids(), is_cached({REPO!r}), 'huggingface_hub' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=python_env(), capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [f"['{REPO}']", "False", "False", "False"], out.stderr
