"""Every metrics.json says which penrun wrote it; a reused run says so."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

import penrun

from conftest import REPO, run_task


def test_metrics_name_the_penrun_that_wrote_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    overrides = ["task=train_teacher", "trainer.max_epochs=1"]
    metrics = run_task(overrides, tmp_path)
    written = json.loads((Path(metrics["checkpoint"]).parents[1] / "metrics.json").read_text())
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
        capture_output=True,
        text=True,
    )
    assert written["penrun"] == {"version": penrun.__version__, "commit": git.stdout.strip() or None}
    with caplog.at_level(logging.INFO):
        again = run_task(overrides, tmp_path)  # the finished run is reused, not retrained
    assert again["history"] == metrics["history"]
    assert f"reusing its results (made by penrun {penrun.__version__}" in caplog.text


def test_a_cached_teacher_says_which_penrun_made_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    overrides = ["trainer.max_epochs=1", "teacher_trainer.max_epochs=1", f"paths.output_dir={tmp_path}"]
    run_task(overrides, tmp_path / "first")  # trains and caches the teacher
    with caplog.at_level(logging.INFO):
        run_task([*overrides, "seed=1"], tmp_path / "second")
    assert "using cached teacher" in caplog.text
    assert f"(made by penrun {penrun.__version__}" in caplog.text
