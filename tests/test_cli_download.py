"""`jamba download`, and `run -m REPO` fetching a missing model, against the local Hub of tests/hubserver.py
(HF_ENDPOINT points at it; the fixtures are conftest.py's)."""

import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import DEFAULT, REPO, SHARD1, SHARD2, Terminal, jamba as jamba_process, probe
from hubserver import TOKEN
from jamba_cli.cli import app
from jamba_cli.cli_options import _complete_model
from jamba_cli.hub import is_cached


def jamba(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line_error(r, code=1):
    assert r.exit_code == code and r.stdout == "", r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and TOKEN not in r.stderr
    return r.stderr


def test_download_prints_the_local_path_then_runs_from_the_cache(hub, monkeypatch):
    r = jamba("download", REPO)
    assert (r.exit_code, r.stderr) == (0, "")  # no progress bar off a terminal
    path = Path(r.stdout.strip())
    assert r.stdout == f"{path}\n" and {p.name for p in path.iterdir()} == DEFAULT
    assert _complete_model("ai21labs/") == [REPO]
    hub.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = jamba("run", "-m", REPO, "-n", 3, "--ignore-eos", "--format", "json", "hi")
    assert r.exit_code == 0, r.stderr
    assert "\"completion_tokens\": 3" in r.stdout and hub.log == []


def test_dry_run_lists_files_and_bytes_and_fetches_nothing(hub, repo_files, tmp_path):
    r = jamba("download", REPO, "--dry-run")
    assert r.exit_code == 0
    *files, total = r.stdout.splitlines()
    assert {line.split()[1]: int(line.split()[0].replace(",", "")) for line in files} == \
        {n: len(repo_files[n]) for n in DEFAULT}
    assert int(total.split()[0].replace(",", "")) == sum(len(repo_files[n]) for n in DEFAULT)
    assert f"({len(DEFAULT)} files" in total
    assert not [e for e in hub.log if e["cdn"] or "/resolve/" in e["path"]] and not (tmp_path / "cache").exists()


def test_selection_revision_and_destination_flags(hub, repo_files, tmp_path):
    out = tmp_path / "out"
    r = jamba("download", REPO, "config.json", "tokenizer.json", "--local-dir", out)
    assert r.exit_code == 0 and Path(r.stdout.strip()).resolve() == out.resolve()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["config.json", "tokenizer.json"]
    r = jamba("download", REPO, "--include", "*.json", "--exclude", "generation_*", "--cache-dir", tmp_path / "c2")
    path = Path(r.stdout.strip())
    assert path.is_relative_to(tmp_path / "c2")
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors.index.json", "tokenizer.json",
                                                "tokenizer_config.json"}
    v1 = hub.add_commit(REPO, {**repo_files, "config.json": repo_files["config.json"] + b" "}, ref="v1")
    r = jamba("download", REPO, "config.json", "--revision", "v1")
    assert Path(r.stdout.strip()).name == v1


def test_errors_are_one_line_and_never_show_the_token(hub, repo_files, tmp_path):
    assert "not found" in one_line_error(jamba("download", "ai21labs/missing"))
    hub.add_commit("ai21labs/gated", {"config.json": b"{}"}, gated=True)
    assert "is gated" in one_line_error(jamba("download", "ai21labs/gated", "--token", "hf_wrong"))
    r = jamba("download", "ai21labs/gated", "--token", TOKEN)
    assert r.exit_code == 0 and TOKEN not in r.output
    assert "offline" in one_line_error(jamba("download", REPO, "--offline"))
    assert "--local-dir and --cache-dir exclude each other" in one_line_error(
        jamba("download", REPO, "--local-dir", tmp_path / "a", "--cache-dir", tmp_path / "b"), code=2)


@pytest.mark.slow
def test_an_interrupted_download_finishes_on_the_next_run(hub):
    hub.drop(REPO, SHARD2, at=12_000_000, outage=True)
    assert "resumes" in one_line_error(jamba("download", REPO))
    hub.down = False
    r = jamba("download", REPO)
    assert r.exit_code == 0 and (Path(r.stdout.strip()) / SHARD2).exists()
    assert len(hub.blob_gets(REPO, SHARD1)) == 1  # finished before the cut, so not fetched again
    assert hub.blob_gets(REPO, SHARD2)[-1]["range"].startswith("bytes=")


def test_run_fetches_a_missing_model_only_when_allowed(hub, monkeypatch):
    r = jamba("run", "-m", REPO, "hi")  # stdin is not a terminal and there is no --yes
    assert f"fetch it with: jamba download {REPO} (or pass --yes)" in one_line_error(r)
    assert not hub.requests(contains="/resolve/")
    r = jamba("run", "-m", REPO, "--yes", "-n", 3, "--ignore-eos", "hi")
    assert r.exit_code == 0 and r.stdout.strip() and is_cached(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = jamba("chat", "-m", "ai21labs/other", "--yes")
    assert "jamba download ai21labs/other (offline mode is on)" in one_line_error(r)


@pytest.mark.slow
def test_a_terminal_asks_before_a_big_download_and_shows_progress(hub, env, tmp_path):
    env = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "home")}
    hub.repos[REPO].claimed_sizes[SHARD2] = 5 * 10**9
    term = Terminal(jamba_process("run", "-m", REPO, "hi"), env)
    term.expect(b"Download ai21labs/jamba-tiny (5.0 GB)? [y/N]")
    term.type(b"n\r")
    term.expect(b"not downloaded")
    assert term.close() == 1 and not hub.requests(contains="/resolve/")

    del hub.repos[REPO].claimed_sizes[SHARD2]
    term = Terminal(jamba_process("download", REPO, SHARD1), env, stdout=subprocess.PIPE)
    term.expect(b"14.5 MB")  # the progress bar, on the terminal's stderr
    path = term.proc.stdout.read().decode()
    assert term.close() == 0
    assert path == f"{tmp_path}/cache/models--ai21labs--jamba-tiny/snapshots/{hub.repos[REPO].refs['main']}\n"


def test_model_completion_offers_cached_repo_ids_without_heavy_imports(env, tmp_path):
    for repo in ("ai21labs/jamba-tiny", "ai21labs/jamba-mini", "other/thing"):
        snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc"
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
    r = probe(env, extra_env={"HF_HUB_CACHE": str(tmp_path / "hub"), "_JAMBA_COMPLETE": "complete_bash",
                              "COMP_WORDS": "jamba chat -m ai21labs/jamba-t", "COMP_CWORD": "3"})
    assert r.stdout.split() == ["ai21labs/jamba-tiny"] and r.stderr.endswith("HEAVY=")
