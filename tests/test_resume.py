"""A run killed by SIGKILL mid-epoch resumes from last.pt to the numbers and weights of the
uninterrupted run: random states (global and a task's own generators) travel with the weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from penrun.engine import load_checkpoint

from conftest import history_without_times, killer_script, run_cli

STEPS_PER_EPOCH = 23  # digits: 1437 training images at batch 64


@pytest.mark.parametrize(
    "args",
    [
        ["task=train_teacher", "trainer.max_epochs=4"],
        # kd + feature + synthetic_head: draws synthetic activations from its own generator
        ["task=distill", "trainer.max_epochs=3", "teacher_trainer.max_epochs=1"],
    ],
    ids=["train_teacher", "distill"],
)
def test_sigkilled_run_resumes_to_the_same_result(args: list[str], tmp_path: Path) -> None:
    args = [*args, "seed=3"]
    reference = tmp_path / "reference"
    run_cli([*args, f"hydra.run.dir={reference}"], cwd=tmp_path)  # also caches distill's teacher

    killed = tmp_path / "killed"
    script = killer_script([*args, f"hydra.run.dir={killed}"], kill_at=STEPS_PER_EPOCH * 2 + 9)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"] == 2
    assert json.loads((killed / "metrics.json").read_text())["status"] == "running"

    resumed = run_cli([*args, f"hydra.run.dir={killed}"], cwd=tmp_path)
    assert "resuming" in resumed.stderr and "from epoch 2" in resumed.stderr
    assert history_without_times(killed) == history_without_times(reference)
    ref_w = load_checkpoint(reference / "checkpoints" / "last.pt")["modules"]["model"]
    got_w = load_checkpoint(killed / "checkpoints" / "last.pt")["modules"]["model"]
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


def test_checkpoints_of_the_previous_layout_still_resume() -> None:
    """Before per-rank states, `rng` held one global state and no generators."""
    from penrun.engine import restore_random_states, rng_state

    torch.manual_seed(11)
    old_layout = rng_state()
    expected = torch.rand(3)
    generator = torch.Generator().manual_seed(5)
    untouched = generator.get_state()
    restore_random_states(old_layout, {"synthetic": generator})
    assert torch.equal(torch.rand(3), expected) and torch.equal(generator.get_state(), untouched)
