"""Start-up time of the light commands (`exitbench list`, `exitbench config show`): wall and CPU seconds of a
fresh process, median of N runs, and the slowest top-level imports (python -X importtime).

    python benchmarks/cli_startup.py [--runs 5]

Goal: under 2 s wall on an idle machine. CPU seconds (user + sys) are printed too: on a shared machine they
move far less with the load than the wall time does. The floor is printed beside them: a fresh interpreter that
only imports torch (the registries' modules define torch models and losses, so listing them imports it) and one
that only imports pydantic and yaml (what the parameter models alone would need).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# config show with a file: the same command line before and after `config show` learnt to print the defaults
COMMANDS = {"list": ["list"],
            "config show": ["config", "show", str(Path(__file__).resolve().parents[1] / "bench/configs/default.yaml")]}


# The floor under every command that lists the registries: their modules define torch models and losses.
FLOOR = {"import torch": ["-c", "import torch"],
         "import yaml, pydantic.BaseModel": ["-c", "import yaml; from pydantic import BaseModel"]}


def timed(args: list[str], python: list[str] | None = None) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *(python or ["-m", "bench", *args])], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def slowest_imports(args: list[str], top: int) -> list[tuple[float, str]]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "bench", *args], capture_output=True, text=True,
                          check=True)
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(2)) <= 3:  # the modules bench itself imports, not their insides
            rows.append((int(match.group(1)) / 1e6, match.group(3)))
    return sorted(rows, reverse=True)[:top]


def _row(label: str, runs: list[tuple[float, float]]) -> None:
    wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    print(f"{label:<44} wall {wall:5.2f} s (min {min(r[0] for r in runs):.2f})  cpu {cpu:5.2f} s")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, no usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _runs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def main() -> None:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=_runs, default=5, help="fresh processes per command (default 5)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, {args.runs} runs each")
    for name, argv in COMMANDS.items():
        timed(argv)  # warm the file cache
        runs = [timed(argv) for _ in range(args.runs)]
        _row(f"exitbench {name}", runs)
    for name, python in FLOOR.items():  # what a fresh interpreter pays for the imports alone
        _row(f"python -c '{name}'", [timed([], python) for _ in range(args.runs)])
    print("slowest imports of `exitbench list` (cumulative s):")
    for seconds, module in slowest_imports(COMMANDS["list"], 6):
        print(f"  {seconds:6.3f}  {module}")


if __name__ == "__main__":
    main()
