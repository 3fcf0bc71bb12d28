"""task=report on a tiny real sweep, including an interrupted run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from penrun.errors import ConfigError
from penrun.report import mean_std

from conftest import run_cli


def test_mean_std() -> None:
    assert mean_std([0.5]) == "0.5000"
    assert mean_std([0.4, 0.6]) == "0.5000 ± 0.1414"
    assert mean_std([]) == "-"


def test_report_of_a_sweep_with_a_missing_run(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "task=distill",
            "method=kd,synthetic_head",
            "seed=0,1",
            "trainer.max_epochs=2",
            "teacher_trainer.max_epochs=2",
            "teacher_trainer.progress=false",
            f"paths.output_dir={tmp_path}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 4
    # Make one run look interrupted after its first epoch.
    broken = runs[0] / "metrics.json"
    metrics = json.loads(broken.read_text())
    broken.write_text(json.dumps({**metrics, "status": "running", "history": metrics["history"][:1]}))

    proc = run_cli(
        [
            "task=report",
            f"sweep_dir={sweep}",
            "report.rows=[method]",
            "report.values=[source_acc,best_source_acc]",
            "report.curve=source_acc",
            f"hydra.run.dir={tmp_path / 'r'}",
        ],
        cwd=tmp_path,
    )
    report = (sweep / "report.md").read_text()
    assert "3 complete runs" in report and "Missing or incomplete runs (1)" in report
    assert f"`{runs[0].relative_to(sweep)}`: interrupted after 1 epoch(s)" in report
    table = list(csv.reader((sweep / "report.csv").open()))
    assert table[0] == ["method", "runs", "source_acc", "best_source_acc"]
    assert sorted(row[0] for row in table[1:]) == ["kd", "synthetic_head"]
    assert {row[1] for row in table[1:]} == {"1", "2"}
    assert "±" in next(row[2] for row in table[1:] if row[1] == "2")
    assert (sweep / "curves.png").stat().st_size > 1000 and "report.md" in proc.stdout


def test_report_needs_a_folder_with_runs(tmp_path: Path) -> None:
    from conftest import run_task

    with pytest.raises(ConfigError, match=r"sweep_dir='.*nowhere' is not a folder"):
        run_task(["task=report", f"sweep_dir={tmp_path / 'nowhere'}"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no complete run under"):
        run_task(["task=report", f"sweep_dir={tmp_path / 'empty'}"], tmp_path / "r")
