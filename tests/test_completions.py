"""The committed completion scripts match the app, and the bash one really completes through `jamba`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_committed_scripts_are_current():
    r = subprocess.run([sys.executable, "tools/gen_completions.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_zsh_script_works_from_fpath_and_from_eval():
    lines = (ROOT / "completions" / "_jamba").read_text().splitlines()
    assert lines[0] == "#compdef jamba"
    assert "loadautofunc" in "\n".join(lines) and "compdef _jamba_completion jamba" in "\n".join(lines)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_and_options(tmp_path):
    launcher = tmp_path / "jamba"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m jamba_cli "$@"\n')
    launcher.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    script = ROOT / "completions" / "jamba.bash"

    def complete(*words):
        line = " ".join(words)
        cmd = (f'source "{script}"; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; '
               f'_jamba_completion jamba; printf "%s\\n" "${{COMPREPLY[@]}}"')
        return subprocess.run(["bash", "-c", cmd], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60).stdout.split()

    assert complete("jamba", "ch") == ["chat"]
    assert "--max-tokens" in complete("jamba", "run", "--max")
    assert complete("jamba", "run", "--format", "j") == ["json", "jsonl"]
