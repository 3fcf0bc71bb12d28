"""How the benchmark scripts time things: one call on the wall clock (waiting for the GPU's queued
work, which would otherwise be charged to whatever runs next), variants measured in interleaved
rounds (so the load of a shared machine hits them alike), and a penrun command in a fresh process."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
PENRUN = [sys.executable, "-m", "penrun"]


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device: str | torch.device = "cpu") -> tuple[T, float]:
    """fn's result and the seconds it took, including the device work it queued."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def interleaved(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each measurement `rounds` times, the variants taking turns within every round."""
    times: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            times[name].append(measure())
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """The median of each variant's rounds (the interleaved rounds' summary)."""
    return {name: statistics.median(values) for name, values in times.items()}


def per_step(step: Callable[[], object], steps: int, device: str | torch.device = "cpu") -> float:
    """Seconds per call of `step`, over `steps` calls in a row."""

    def run() -> None:
        for _ in range(steps):
            step()

    return timed(run, device)[1] / steps


def run_command(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """Wall seconds of a command (e.g. [*PENRUN, ...]) in `cwd`, start-up included; a command that
    fails stops the benchmark with its error."""
    environment = {**os.environ, **(env or {})}
    _, wall = timed(
        lambda: subprocess.run(command, cwd=cwd, check=True, env=environment, capture_output=True)
    )
    return wall
