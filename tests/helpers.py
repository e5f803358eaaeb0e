"""What several test modules share that is not a fixture (the fixtures are in conftest.py): the `jamba`
process, a terminal to drive it, a probe of what a command imports, and the repository the test Hub serves."""

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository's root
HEAVY = ("torch", "numpy", "transformers", "huggingface_hub", "safetensors", "tokenizers")

# The repository that conftest's `hub` fixture serves: a real two-shard checkpoint, and what real repos
# carry next to it; DEFAULT is what `jamba download` fetches of it.
REPO = "ai21labs/jamba-tiny"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
DEFAULT = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
           "tokenizer_config.json", "tokenizer.model", "chat_template.jinja", SHARD1, SHARD2}


def jamba(*args) -> list[str]:
    """The command line of the real `jamba ARGS` process."""
    return [sys.executable, "-m", "jamba_cli", *map(str, args)]


PROBE = """import sys
sys.argv = ["jamba", *sys.argv[1:]]
try:
    from jamba_cli.cli import main
    main()
except SystemExit:
    pass
sys.stderr.write("HEAVY=" + ",".join(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""


def probe(env, *args, extra_env=None) -> subprocess.CompletedProcess:
    """Run `jamba ARGS` in a fresh interpreter; its stderr ends with HEAVY= and the heavy modules it imported."""
    code = PROBE.format(heavy=set(HEAVY))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, env={**env, **(extra_env or {})},
                          cwd=ROOT, timeout=60, text=True)


class Terminal:
    """A child process whose controlling terminal is a pty we type into."""

    def __init__(self, args, env, stdout=None):
        """`stdout`: None puts stdout on the terminal too; subprocess.PIPE keeps it apart."""
        self.master, slave = pty.openpty()

        def take_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave if stdout is None else stdout, stderr=slave,
                                     env={**env, "TERM": "xterm"}, cwd=ROOT, preexec_fn=take_terminal)
        os.close(slave)
        self.seen = b""

    def expect(self, text: bytes, timeout=60) -> bytes:
        end = time.monotonic() + timeout
        while text not in self.seen and time.monotonic() < end:
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:
                    break
        assert text in self.seen, self.seen[-500:]
        before, _, self.seen = self.seen.partition(text)
        return before

    def type(self, keys: bytes, pause=0.5):
        time.sleep(pause)  # let readline take the terminal before the keys arrive
        os.write(self.master, keys)

    def close(self):
        self.proc.wait(timeout=60)
        os.close(self.master)
        return self.proc.returncode
