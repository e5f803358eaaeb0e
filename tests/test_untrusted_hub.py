"""A hostile Hub mirror (tests/hubserver.py, which HF_ENDPOINT points at) and a clumsy user against
`jamba download` and `-m`: a listing whose names, ids or sizes could put a file outside the destination is
refused whole, in one line, with nothing written anywhere; the server's headers decide no path; a path is
never taken for a repo id; usage mistakes exit 2."""

import os
import stat
import subprocess
import unicodedata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import REPO, ROOT, jamba as jamba_process
from hubserver import TOKEN
from jamba_cli.cli import app

EVIL = "evil/repo"
GOOD = {"config.json": b'{"model_type": "jamba"}', "tokenizer.json": b"{}", "model.safetensors": b"W" * 3000}
NOBODY = "~nosuchuser-jamba-test"  # a user that does not exist


def jamba(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(r, code: int) -> str:
    """stderr of a run that failed with `code`: one line, nothing on stdout, no traceback, no token."""
    assert (r.exit_code, r.stdout) == (code, ""), r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and TOKEN not in r.stderr, r.stderr
    return r.stderr.removeprefix("error: ").removesuffix("\n")


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root, links not followed: its kind, size, mtime and link target."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns,
                                                os.readlink(path) if os.path.islink(path) else None)
    return out


def fetched(hub) -> list[dict]:
    """The requests for file contents (not the listing)."""
    return [r for r in hub.log if r["cdn"] or "/resolve/" in r["path"]]


@pytest.fixture
def dest(hub, tmp_path):
    """mode -> the command-line arguments of a download of EVIL: into a local folder two levels below
    tmp_path, into the HF cache (the `hub` fixture's, under tmp_path), or a dry run."""
    local = tmp_path / "a" / "b" / "D"
    return {"local": ["--local-dir", local], "cache": [], "dry-run": ["--dry-run"]}


def refused(hub, tmp_path, args) -> str:
    """Run the download of EVIL; it must fail with one line naming the repo, writing and fetching nothing."""
    before = tree(tmp_path)
    r = jamba("download", EVIL, *args)
    message = one_line(r, 1)
    assert message.startswith(f"refusing to download {EVIL}: "), message
    assert tree(tmp_path) == before  # nothing written inside the destination or beside it, no partial file
    assert fetched(hub) == []
    return message


# -- item 1: names ---------------------------------------------------------------------------------------

UNSAFE = [  # (name, why); {tmp} is the test's folder
    ("../../X.safetensors", "goes up a folder ('..')"),
    ("sub/../../../../X.json", "goes up a folder ('..')"),
    ("{tmp}/abs/X.safetensors", "is an absolute path"),
    ("..\\..\\X.json", "has a backslash"),
    ("X\x00.json", "has a control character"),
    ("\x1b]0;owned\x07\x1b[2J.json", "has a control character"),
    ("C:X.json", "has a drive letter"),
    ("./X.json", "has an empty or '.' part"),
    ("sub//X.json", "has an empty or '.' part"),
    ("sub/", "has an empty or '.' part"),
]


@pytest.mark.parametrize("mode", ["local", "cache", "dry-run"])
@pytest.mark.parametrize("name, why", UNSAFE, ids=[repr(n) for n, _ in UNSAFE])
def test_an_unsafe_name_in_the_listing_refuses_the_whole_download(hub, tmp_path, dest, mode, name, why):
    name = name.format(tmp=tmp_path)
    hub.add_commit(EVIL, {**GOOD, name: b"pwned " * 100})
    message = refused(hub, tmp_path, dest[mode])
    assert message == f"refusing to download {EVIL}: the file name {name!r} {why}"
    assert not (tmp_path / "a").exists() and not (tmp_path / "cache").exists()  # not even the folders


def test_the_escape_of_the_issue_in_a_real_process(hub, tmp_path, env):
    """`jamba download --local-dir D` of a listing with ../../X.safetensors, as a user runs it."""
    hub.add_commit(EVIL, {**GOOD, "../../X.safetensors": b"pwned " * 100})
    env = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "home")}
    d = tmp_path / "a" / "b" / "D"
    d.mkdir(parents=True)
    before = tree(tmp_path)
    r = subprocess.run(jamba_process("download", EVIL, "--local-dir", d), env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"error: refusing to download {EVIL}: the file name '../../X.safetensors' goes up a folder ('..')\n"
    assert tree(tmp_path) == before and fetched(hub) == []


COLLIDING = [  # names that one file system or another takes for one file
    ({"config.json": GOOD["config.json"], "Config.json": b"{}"},
     "the file names 'Config.json' and 'config.json' are one file where case or Unicode normalisation is ignored"),
    ({unicodedata.normalize("NFC", "café.json"): b"{}", unicodedata.normalize("NFD", "café.json"): b"[]"},
     "the file names {0!r} and {1!r} are one file where case or Unicode normalisation is ignored".format(
         *sorted([unicodedata.normalize("NFC", "café.json"), unicodedata.normalize("NFD", "café.json")]))),
    ({"config.json": GOOD["config.json"], "config.json/x.json": b"{}"},
     "'config.json' is a file and a folder (of 'config.json/x.json')"),
]


@pytest.mark.parametrize("mode", ["local", "cache"])
@pytest.mark.parametrize("files, why", COLLIDING, ids=["case", "unicode", "file-and-folder"])
def test_names_that_collide_on_some_file_system_are_refused(hub, tmp_path, dest, mode, files, why):
    hub.add_commit(EVIL, {**GOOD, **files})
    assert refused(hub, tmp_path, dest[mode]) == f"refusing to download {EVIL}: {why}"


def test_a_name_that_resolves_outside_through_a_link_is_refused(hub, tmp_path, dest):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.safetensors").write_bytes(b"precious")
    d = tmp_path / "a" / "b" / "D"
    d.mkdir(parents=True)

    (d / "link").symlink_to(outside)  # a folder link in D
    hub.add_commit(EVIL, {**GOOD, "link/X.safetensors": b"pwned"})
    message = refused(hub, tmp_path, dest["local"])
    assert message == (f"refusing to download {EVIL}: 'link/X.safetensors' would be written outside {d} "
                       f"(it resolves to {outside}/X.safetensors)")

    (d / "model.safetensors").symlink_to(outside / "victim.safetensors")  # a file link in D
    hub.add_commit(EVIL, GOOD)
    assert "'model.safetensors' would be written outside" in refused(hub, tmp_path, dest["local"])

    (d / "model.safetensors").unlink()
    (d / ".cache").symlink_to(outside)  # where the partial files go
    assert "'config.json' would be written outside" in refused(hub, tmp_path, dest["local"])
    assert (outside / "victim.safetensors").read_bytes() == b"precious"

    commit = hub.add_commit(EVIL, {**GOOD, "link/X.safetensors": b"pwned"})  # a link in the cache's snapshot
    snapshot = tmp_path / "cache" / "models--evil--repo" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "link").symlink_to(outside)
    assert "'link/X.safetensors' would be written outside" in refused(hub, tmp_path, dest["cache"])


def test_a_name_that_is_a_folder_on_disk_is_refused(hub, tmp_path, dest):
    d = tmp_path / "a" / "b" / "D"
    (d / "config.json").mkdir(parents=True)
    hub.add_commit(EVIL, GOOD)
    assert refused(hub, tmp_path, dest["local"]) == \
        f"refusing to download {EVIL}: {d}/config.json exists and is not a regular file"


def test_a_listing_with_forged_ids_or_sizes_is_refused(hub, tmp_path, dest):
    hub.add_commit(EVIL, GOOD)
    repo = hub.repos[EVIL]
    for mode in ("local", "cache"):
        repo.listed_sha = "../../../../x"  # names the snapshot folder
        assert refused(hub, tmp_path, dest[mode]).endswith("its listing gives the commit id '../../../../x', "
                                                           "not 40 hex digits")
        repo.listed_sha = None
        repo.claimed_sha256["model.safetensors"] = "../../../../x"  # names the blob and the partial file
        assert refused(hub, tmp_path, dest[mode]).endswith("the file name 'model.safetensors' has the sha256 "
                                                           "'../../../../x'")
        repo.claimed_sha256.clear()
        repo.claimed_sizes["config.json"] = -1
        assert refused(hub, tmp_path, dest[mode]).endswith("the file name 'config.json' has the size -1")
        repo.claimed_sizes.clear()


@pytest.mark.parametrize("mode", ["local", "cache"])
def test_forged_headers_decide_no_path(hub, tmp_path, dest, mode):
    """huggingface_hub's own writer names the blob after the ETag and the snapshot after X-Repo-Commit."""
    hub.add_commit(EVIL, GOOD)
    hub.forged_headers.update({"ETag": '"../../../../PWNED"', "X-Linked-Etag": '"../../../../PWNED"',
                               "X-Repo-Commit": "../../../../COMMIT"})
    destination = "a/b/D" if mode == "local" else "cache"
    (tmp_path / destination).mkdir(parents=True)  # so that only what is inside it may change
    before = tree(tmp_path)
    r = jamba("download", EVIL, *dest[mode])
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip())
    assert {n: (path / n).read_bytes() for n in GOOD} == GOOD
    after = {k: v for k, v in tree(tmp_path).items() if not k.startswith(destination)}
    assert after == {k: v for k, v in before.items() if not k.startswith(destination)}
    assert not [p for p in tmp_path.rglob("*") if p.name in ("PWNED", "COMMIT")]


@pytest.mark.parametrize("name, delta, what", [("config.json", -5, "larger"), ("config.json", +5, "smaller"),
                                               ("model.safetensors", -100, "larger")])
@pytest.mark.parametrize("mode", ["local", "cache"])
def test_a_file_larger_or_smaller_than_listed_is_not_kept(hub, tmp_path, dest, mode, name, delta, what):
    hub.add_commit(EVIL, GOOD)
    size = len(GOOD[name]) + delta
    hub.repos[EVIL].claimed_sizes[name] = size
    message = one_line(jamba("download", EVIL, *dest[mode]), 1)
    assert message == f"{name} from {EVIL} is {what} than the {size:,} bytes its listing states; nothing of it was kept"
    assert not list(tmp_path.rglob("*.incomplete")) and not list(tmp_path.rglob(name))


# -- item 6: a path is a path ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("ckpt/final", "ckpt/final (ckpt/ is a local folder, so this is a path, not a Hub repo id)"),
    ("./final", "./final"), ("../final", "../final"), ("~/final", "~/final"), ("{tmp}/final", "{tmp}/final"),
    ("ckpt/a/final", "ckpt/a/final"), ("final", "final"), ("ai21labs/jamba..tiny", "ai21labs/jamba..tiny"),
])
def test_a_missing_path_is_no_such_checkpoint_directory_and_never_a_download(hub, tmp_path, monkeypatch, spec,
                                                                            message):
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    spec, message = spec.format(tmp=tmp_path), message.format(tmp=tmp_path)
    for command in (["run", "-m", spec, "--yes", "hi"], ["chat", "-m", spec, "--yes"]):
        assert one_line(jamba(*command), 1) == f"no such checkpoint directory: {message}"
    assert hub.log == []  # not a single request


def test_an_org_name_that_is_no_local_folder_still_goes_to_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ai21labs").mkdir()
    r = jamba("run", "-m", REPO, "--yes", "-n", 2, "--ignore-eos", "hi")
    assert one_line(r, 1) == f"no such checkpoint directory: {REPO} (ai21labs/ is a local folder, so this is a " \
                             "path, not a Hub repo id)"
    assert hub.log == []
    (tmp_path / "ai21labs").rmdir()
    r = jamba("run", "-m", REPO, "--yes", "-n", 2, "--ignore-eos", "hi")
    assert r.exit_code == 0 and r.stdout.strip() and fetched(hub)


@pytest.mark.slow
def test_a_missing_path_in_a_real_process_makes_no_request(hub, tmp_path, env):
    (tmp_path / "ckpt").mkdir()
    env = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "home")}
    r = subprocess.run(jamba_process("run", "-m", "ckpt/final", "--yes", "hi"), env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "error: no such checkpoint directory: ckpt/final (ckpt/ is a local folder, so this is a " \
                       "path, not a Hub repo id)\n"
    assert hub.log == [] and not (tmp_path / "cache").exists()


# -- item 14: usage mistakes exit 2 ------------------------------------------------------------------------

USAGE = [  # (arguments, the one line); {tmp} is the test's folder
    (["download", "a/b/c"], "'a/b/c' is not a Hub repo id: use ORG/NAME, e.g. ai21labs/AI21-Jamba-Mini-1.7"),
    (["download", "../x"], "'../x' is not a Hub repo id: use ORG/NAME, e.g. ai21labs/AI21-Jamba-Mini-1.7"),
    (["download", "jamba"], "'jamba' is not a Hub repo id: use ORG/NAME, e.g. ai21labs/AI21-Jamba-Mini-1.7"),
    (["download", REPO, "--local-dir", "{tmp}/a", "--cache-dir", "{tmp}/b"],
     "--local-dir and --cache-dir exclude each other"),
    (["download", REPO, "--dry-run", "--offline"], "--dry-run asks the Hub what to fetch; it cannot be --offline"),
    (["download", REPO, "--include", ""], "--include: an empty pattern matches no file"),
    (["download", REPO, "--exclude", ""], "--exclude: an empty pattern matches no file"),
    (["download", REPO, "config.json", ""], "an empty file name was given"),
    (["download", REPO, "--revision", "../../x"], "--revision: '../../x' is not a branch, tag or commit name"),
    (["download", REPO, "--local-dir", "{tmp}/file"], "--local-dir: {tmp}/file is not a directory"),
    (["download", REPO, "--local-dir", f"{NOBODY}/x"], f"--local-dir: cannot expand {NOBODY}: no such user"),
    (["download", REPO, "--cache-dir", f"{NOBODY}/x"], f"--cache-dir: cannot expand {NOBODY}: no such user"),
    (["run", "-m", f"{NOBODY}/x", "hi"], f"--model: cannot expand {NOBODY}: no such user"),
    (["chat", "-m", f"{NOBODY}/x"], f"--model: cannot expand {NOBODY}: no such user"),
    (["run", "-m", REPO, "--revision", "main..x", "hi"], "--revision: 'main..x' is not a branch, tag or commit name"),
]


def usage_case(tmp_path, args, line):
    (tmp_path / "file").write_text("not a folder")
    return [a.format(tmp=tmp_path) for a in args], line.format(tmp=tmp_path)


@pytest.mark.parametrize("args, line", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_mistakes_are_one_line_and_exit_2(hub, tmp_path, args, line):
    args, line = usage_case(tmp_path, args, line)
    before = tree(tmp_path)
    assert one_line(jamba(*args), 2) == line
    assert hub.log == [] and tree(tmp_path) == before  # no request, nothing written


@pytest.mark.slow
def test_download_usage_mistakes_in_a_real_process(hub, tmp_path, env):
    env = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "home")}
    for args, line in USAGE:
        if args[0] == "download":
            args, line = usage_case(tmp_path, args, line)
            r = subprocess.run(jamba_process(*args), env=env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=60)
            assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {line}\n"), args
    assert hub.log == []
