"""A run killed by SIGKILL mid-epoch resumes from last.pt to the numbers and weights of the
uninterrupted run: random states (global and a task's own generators) travel with the weights."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from penrun.train.checkpoint import load_checkpoint

from conftest import Teachers, finish, history_without_times, killer_script, start_cli, start_python

STEPS_PER_EPOCH = 23  # digits: 1437 training images at batch 64
TASKS = {
    "train_teacher": ["task=train_teacher", "trainer.max_epochs=4"],
    # kd + feature + synthetic_head: draws synthetic activations from its own generator
    "distill": ["task=distill", "trainer.max_epochs=3"],
}


@dataclass
class Resumed:
    reference: Path  # the uninterrupted run
    killed: Path  # the run killed in epoch 3, then resumed
    killer: subprocess.CompletedProcess
    killed_epoch: int  # last.pt's epoch after the kill
    killed_status: str  # metrics.json's status after the kill
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory, digits_teachers: Teachers) -> dict[str, Resumed]:
    """For each task: the uninterrupted run and the run to be killed (all four at once: they are
    independent), then the resumes. One thread per process (the runs share the two cores), the
    same in every run of a task. distill's teacher is the shared one: no teacher is trained
    here, so every optimizer step the killer counts is the student's."""
    root = tmp_path_factory.mktemp("resume")
    args = {
        name: [*task, "seed=3", "trainer.num_threads=1"]
        + ([f"teacher_ckpt={digits_teachers['cosine']}"] if name == "distill" else [])
        for name, task in TASKS.items()
    }
    started = {}
    for name in TASKS:
        (root / name).mkdir()
        killed = root / name / "killed"
        script = killer_script([*args[name], f"hydra.run.dir={killed}"], kill_at=STEPS_PER_EPOCH * 2 + 9)
        started[name] = (
            start_cli([*args[name], f"hydra.run.dir={root / name / 'reference'}"], cwd=root / name),
            start_python(["-c", script], cwd=root / name),
        )
    killers = {}
    for name, (reference, killer) in started.items():
        killers[name] = finish(killer, check=False)
        finish(reference)
    after_kill = {}
    for name in TASKS:
        killed = root / name / "killed"
        after_kill[name] = (
            load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"]
            if killers[name].returncode == -9
            else -1,
            json.loads((killed / "metrics.json").read_text())["status"]
            if killers[name].returncode == -9
            else "",
        )
    resumes = {
        name: start_cli([*args[name], f"hydra.run.dir={root / name / 'killed'}"], cwd=root / name)
        for name in TASKS
    }
    return {
        name: Resumed(
            root / name / "reference",
            root / name / "killed",
            killers[name],
            *after_kill[name],
            finish(resumes[name]),
        )
        for name in TASKS
    }


@pytest.mark.parametrize("task", list(TASKS))
def test_sigkilled_run_resumes_to_the_same_result(task: str, resumed_runs: dict[str, Resumed]) -> None:
    run = resumed_runs[task]
    reference, killed = run.reference, run.killed
    assert run.killer.returncode == -9, run.killer.stderr
    assert run.killed_epoch == 2
    assert run.killed_status == "running"

    output = run.resumed.stdout + run.resumed.stderr  # the notice is logged (Hydra's console and penrun.log)
    assert f"resuming {killed} from epoch 2" in output
    assert history_without_times(killed) == history_without_times(reference)
    ref_w = load_checkpoint(reference / "checkpoints" / "last.pt")["modules"]["model"]
    got_w = load_checkpoint(killed / "checkpoints" / "last.pt")["modules"]["model"]
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
