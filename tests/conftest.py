"""Shared fixtures: the offline data folder, Hydra composition, in-process and CLI runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from penrun.app.cli import config_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PENRUN_DATA_DIR") or REPO.parent / "shared" / "data")
# Fast settings for every test run: no bars, one torch thread. Two threads on these small
# networks took 10x the CPU time of one as soon as a third process held a core (OpenMP threads
# wait for each other; BENCHMARKS.md, "Threads and parallel jobs"), and the suite runs beside
# its own subprocesses.
QUICK = ["trainer.progress=false", "trainer.num_threads=1"]
# The same for what num_threads leaves at torch's default (teacher_trainer, evaluator_trainer,
# the unit tests): in this process, and in the subprocesses the tests start.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `pytest -n 2` (with --dist loadgroup, in pyproject.toml) the tests that use a
    module-scoped fixture run in one worker, so that the fixture is built once, not once per
    worker (tests/test_sweeps.py's sweeps took 24 s in each)."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        for name in info.names_closure:
            definitions = info.name2fixturedefs.get(name, ())
            if definitions and definitions[-1].scope == "module":
                item.add_marker(pytest.mark.xdist_group(item.module.__name__))
                break


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED_DATA / "mnist.npz").exists():
        pytest.skip(f"offline data folder not found at {SHARED_DATA} (set PENRUN_DATA_DIR)")
    return SHARED_DATA


# The teachers tests share (trained once per session, in this process): an mlp on digits with
# the default cosine head, and one with a linear head (whose checkpoint records the per-class
# activation statistics a linear head needs). Four epochs: test accuracy above 0.9.
TEACHER_EPOCHS = 4


class Teachers:
    """teachers["cosine"] or teachers["linear"]: the last.pt of a train_teacher run on digits
    (mlp, seed 0), trained on first use. Read-only: a test that changes one copies it first."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: dict[str, Path] = {}

    def __getitem__(self, head: str) -> Path:
        if head not in self.paths:
            metrics = run_task(
                ["task=train_teacher", f"teacher.head={head}", f"trainer.max_epochs={TEACHER_EPOCHS}"],
                self.root / head,
            )
            assert metrics["test_acc"] > 0.9, metrics["test_acc"]
            self.paths[head] = Path(metrics["checkpoint"])
        return self.paths[head]


@pytest.fixture(scope="session")
def digits_teachers(tmp_path_factory: pytest.TempPathFactory) -> Teachers:
    return Teachers(tmp_path_factory.mktemp("digits-teachers"))


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


def start_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `python -m penrun ARGS` in a subprocess, as a user would run it; `finish` waits.
    Independent commands started together share the two cores (a start-up is single-threaded)."""
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return start_python(["-m", "penrun", *flags, *QUICK, *overrides], cwd, env)


def start_python(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ONE_THREAD, **(env or {})},
    )
    proc.description = " ".join(args)  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, check: bool = True) -> subprocess.CompletedProcess:
    """Wait for a started command; with check, a non-zero exit is an AssertionError."""
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{proc.description} failed ({proc.returncode}):\n{stdout}\n{stderr}")
    return done


def run_main(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`penrun ARGS` in this process: penrun.app.cli.main, the console script's entry point, with
    sys.argv and the cwd set for it; its exit status, stdout and stderr. For commands whose
    subject is not a fresh interpreter (a process of its own costs seconds of imports)."""
    from penrun.app.cli import main

    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    argv, here = sys.argv, Path.cwd()
    sys.argv = ["penrun", *flags, *QUICK, *overrides]
    os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess(["penrun", *args], code, out.getvalue(), err.getvalue())


def run_cli(
    args: list[str], cwd: Path, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m penrun ARGS` in a subprocess, as a user would run it."""
    return finish(start_cli(args, cwd, env), check)


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
