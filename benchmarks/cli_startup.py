"""Start-up time of the commands a shell runs often: `jamba --help`, `jamba run --help`, and one TAB
completion (which runs the program again). Target: under 0.3 s, with no torch import.

    python benchmarks/cli_startup.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "jamba --help": (["--help"], {}),
    "jamba run --help": (["run", "--help"], {}),
    "TAB after `jamba run --m`": ([], {"_JAMBA_COMPLETE": "complete_bash", "COMP_WORDS": "jamba run --m",
                                      "COMP_CWORD": "2"}),
    "TAB after `jamba run -m ` (model ids)": ([], {"_JAMBA_COMPLETE": "complete_bash", "COMP_WORDS": "jamba run -m ",
                                                   "COMP_CWORD": "3"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    baseline = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - start)
    print(f"{'python -c pass (interpreter start)':42} {statistics.median(baseline) * 1000:7.0f} ms")
    for name, (argv, extra) in CASES.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "jamba_cli", *argv], env={**env, **extra}, cwd=ROOT,
                           capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        print(f"{name:42} {statistics.median(times) * 1000:7.0f} ms (median of {args.repeat}, max "
              f"{max(times) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
