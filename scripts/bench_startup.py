"""How long the command line takes to answer before any job: a tab-completion query, --help,
and printing a composed config, each in a fresh interpreter, for one or more source trees
side by side (e.g. a worktree of an older commit against this one).

    python scripts/bench_startup.py --src /tmp/before/src src --repeat 5

Each command runs `--repeat` times per tree, alternating the trees; the table gives the
median wall time and whether torch was imported (python -X importtime).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import describe_machine

COMMANDS = {
    "tab completion (`penrun task=<TAB>`)": ["-sc", "query=bash"],
    "penrun --help": ["--help"],
    "penrun --cfg job": ["--cfg", "job"],
}


def run(src: Path, args: list[str]) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "COMP_LINE": "penrun task="}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "penrun", *args],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    return wall, any(line.rsplit("|", 1)[-1].strip() == "torch" for line in proc.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", nargs="+", type=Path, default=[Path("src")])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(describe_machine("cpu"))
    print("| command | " + " | ".join(str(s) for s in args.src) + " |")
    print("|---|" + "---|" * len(args.src))
    for name, command in COMMANDS.items():
        times: dict[Path, list[float]] = {src: [] for src in args.src}
        torch_loaded = {}
        for _ in range(args.repeat):
            for src in args.src:
                wall, torch_loaded[src] = run(src, command)
                times[src].append(wall)
        cells = [
            f"{statistics.median(times[src]):.2f} s{' (imports torch)' if torch_loaded[src] else ''}"
            for src in args.src
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
