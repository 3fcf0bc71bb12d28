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
import subprocess
import sys
from functools import partial
from pathlib import Path

from machine import describe_machine
from timing import interleaved, medians, timed

COMMANDS = {
    "tab completion (`penrun task=<TAB>`)": ["-sc", "query=bash"],
    "penrun --help": ["--help"],
    "penrun --cfg job": ["--cfg", "job"],
}


def run(src: Path, args: list[str]) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "COMP_LINE": "penrun task="}
    command = [sys.executable, "-X", "importtime", "-m", "penrun", *args]
    proc, wall = timed(lambda: subprocess.run(command, env=env, capture_output=True, text=True, check=True))
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
        torch_loaded: dict[Path, bool] = {}

        def measure(
            src: Path, command: list[str] = command, loaded: dict[Path, bool] = torch_loaded
        ) -> float:
            wall, loaded[src] = run(src, command)
            return wall

        times = interleaved({src: partial(measure, src) for src in args.src}, args.repeat)
        median = medians(times)
        cells = [f"{median[src]:.2f} s{' (imports torch)' if torch_loaded[src] else ''}" for src in args.src]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
