"""Shared fixtures: the offline data folder, Hydra composition, in-process and CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from penrun.app.cli import config_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PENRUN_DATA_DIR") or REPO.parent / "shared" / "data")
# Fast settings for every test run: few epochs, no bars, both cores.
QUICK = ["trainer.progress=false", "trainer.num_threads=2"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED_DATA / "mnist.npz").exists():
        pytest.skip(f"offline data folder not found at {SHARED_DATA} (set PENRUN_DATA_DIR)")
    return SHARED_DATA


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_task(overrides: list[str], run_dir: Path, data_dir: Path | None = None) -> dict:
    """Run a task in this process, writing into run_dir (the cwd stands in for Hydra's run dir)."""
    from penrun.app.tasks import get_task

    extra = [f"paths.data_dir={data_dir}"] if data_dir else []
    cfg = compose_config([*QUICK, *extra, *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    os.chdir(run_dir)
    try:
        return get_task(cfg.task.name)(cfg)
    finally:
        os.chdir(cwd)


def run_cli(
    args: list[str], cwd: Path, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m penrun ARGS` in a subprocess, as a user would run it."""
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    proc = subprocess.run(
        [sys.executable, "-m", "penrun", *flags, *QUICK, *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"penrun {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


KILLER = """
import os, signal, sys, torch
steps = 0
original = torch.optim.Adam.step
def step(self, *args, **kwargs):
    global steps
    steps += 1
    if steps == {kill_at} and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
torch.optim.Adam.step = step
sys.argv = ["penrun", *{args!r}]
from penrun.app.cli import main
main()
"""


def killer_script(args: list[str], kill_at: int) -> str:
    """A Python program that runs `penrun ARGS` and SIGKILLs itself (rank 0 under torchrun)
    at the `kill_at`-th optimizer step of the process."""
    return KILLER.format(kill_at=kill_at, args=[*QUICK, *args])


def history_without_times(folder: Path) -> list[dict]:
    """A complete run's per-epoch history, without the wall-clock fields."""
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    return [{k: v for k, v in row.items() if k != "epoch_time"} for row in metrics["history"]]
