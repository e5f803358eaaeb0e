"""Write the shell completion scripts in completions/ from the Typer app.

    python tools/gen_completions.py           # (re)write completions/jamba.bash, _jamba, jamba.fish
    python tools/gen_completions.py --check   # exit 1 if a committed script differs from what the app gives

The scripts are Typer's stubs: on TAB they run `jamba` again with _JAMBA_COMPLETE set, so they only go stale
when Typer's templates change. The zsh one is adjusted to also work when autoloaded from $fpath.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = {"bash": "jamba.bash", "zsh": "_jamba", "fish": "jamba.fish"}
# Autoloaded from $fpath, the file body runs as the completer itself, so a bare `compdef` would make the
# first TAB of every session complete nothing.
ZSH_FOOTER = """if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
  _jamba_completion "$@"
else
  compdef _jamba_completion jamba
fi"""


def render(shell: str) -> str:
    env = dict(os.environ, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    script = subprocess.run([sys.executable, "-m", "jamba_cli", "--show-completion", shell], env=env, cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    if shell == "zsh":
        script = script.replace("compdef _jamba_completion jamba", ZSH_FOOTER)
    return script.strip() + "\n"


def main(check: bool) -> int:
    stale = []
    for shell, name in FILES.items():
        path = ROOT / "completions" / name
        script = render(shell)
        if check:
            if not path.exists() or path.read_text() != script:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(script)
    if stale:
        print(f"stale: {', '.join(stale)}; run: python tools/gen_completions.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv[1:]))
