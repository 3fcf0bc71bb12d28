"""task=report on a tiny real sweep, including an interrupted run."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from penrun.app.errors import ConfigError
from penrun.app.tasks.report import mean_std

from conftest import run_main, run_task


def test_mean_std() -> None:
    assert mean_std([0.5]) == "0.5000"
    assert mean_std([0.4, 0.6]) == "0.5000 ± 0.1414"
    assert mean_std([]) == "-"


def test_report_of_a_sweep_with_a_missing_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    sweep = tmp_path / "sweep"
    # The sweep by the command line's entry point, in this process.
    proc = run_main(
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
        tmp_path,
        capsys,
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 4
    # Make one run look interrupted after its first epoch.
    broken = runs[0] / "metrics.json"
    metrics = json.loads(broken.read_text())
    broken.write_text(json.dumps({**metrics, "status": "running", "history": metrics["history"][:1]}))

    # The report task in this process. Its log: caplog's handler on penrun's logger (the sweep's
    # Hydra set the root logger's handlers anew).
    penrun_log = logging.getLogger("penrun")
    with caplog.at_level(logging.INFO, logger="penrun"):
        penrun_log.addHandler(caplog.handler)
        run_task(
            [
                "task=report",
                f"sweep_dir={sweep}",
                "report.rows=[method]",
                "report.values=[source_acc,best_source_acc]",
                "report.curve=source_acc",
            ],
            tmp_path / "r",
        )
        penrun_log.removeHandler(caplog.handler)
    report = (sweep / "report.md").read_text()
    assert "3 complete runs" in report and "Missing or incomplete runs (1)" in report
    assert f"`{runs[0].relative_to(sweep)}`: interrupted after 1 epoch(s)" in report
    table = list(csv.reader((sweep / "report.csv").open()))
    assert table[0] == ["method", "runs", "source_acc", "best_source_acc"]
    assert sorted(row[0] for row in table[1:]) == ["kd", "synthetic_head"]
    assert {row[1] for row in table[1:]} == {"1", "2"}
    assert "±" in next(row[2] for row in table[1:] if row[1] == "2")
    assert (sweep / "curves.png").stat().st_size > 1000
    assert f"wrote {sweep / 'report.md'}, report.csv, curves.png" in caplog.messages


def test_report_needs_a_folder_with_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sweep_dir='.*nowhere' is not a folder"):
        run_task(["task=report", f"sweep_dir={tmp_path / 'nowhere'}"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no complete run under"):
        run_task(["task=report", f"sweep_dir={tmp_path / 'empty'}"], tmp_path / "r")
