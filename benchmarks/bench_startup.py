"""Startup benchmark: how long a command takes before it does any work.

Run: ``.uv/bin/uv run --frozen python benchmarks/bench_startup.py`` (about a minute).

Each command runs as a whole process, ``--repeats`` times, with and without cached
bytecode. "cached" is the normal case (``__pycache__`` written by an earlier run);
"no bytecode" points ``PYTHONPYCACHEPREFIX`` at an empty folder and sets
``PYTHONDONTWRITEBYTECODE``, so every module is compiled from source on every run, as on a
fresh install that did not compile bytecode. "cached" points it at a folder of its own that
a first run fills (whatever ``PYTHONDONTWRITEBYTECODE`` the shell sets). The operating
system's file cache stays warm in both (this script cannot empty it). Printed: the median
seconds, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "ntk-tickets --help": ["-m", "ntk_tickets", "--help"],
    "ntk-tickets list": ["-m", "ntk_tickets", "list"],
    "ntk-tickets config demo": ["-m", "ntk_tickets", "config", "demo"],
    "bad --set (refused)": ["-m", "ntk_tickets", "run", "demo", "--set", "train.steps=x"],
    "import ntk_tickets": ["-c", "import ntk_tickets"],
    "what run imports": ["-c", "import ntk_tickets.study, ntk_tickets.cells"],
}


def seconds(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    print(f"{'command':<26} {'cached s':>9} {'no bytecode s':>14} {'ratio':>6}")
    shell = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory() as empty, tempfile.TemporaryDirectory() as cached:
        cold_env = {**shell, "PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}
        warm_env = {**shell, "PYTHONPYCACHEPREFIX": cached}
        for name, args in COMMANDS.items():
            seconds(args, warm_env)  # writes the bytecode the cached runs read
            warm = statistics.median(seconds(args, warm_env) for _ in range(repeats))
            cold = statistics.median(seconds(args, cold_env) for _ in range(repeats))
            print(f"{name:<26} {warm:>9.2f} {cold:>14.2f} {cold / warm:>6.1f}")


if __name__ == "__main__":
    main()
