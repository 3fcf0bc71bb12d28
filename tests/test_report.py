"""task=report on a tiny real sweep, including an interrupted run."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from penrun.app.errors import ConfigError
from penrun.app.tasks.report import mean_std

from conftest import run_main, run_task


def test_mean_std_is_the_mean_and_the_sample_std_over_seeds() -> None:
    values = [0.4, 0.6, 0.65]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert mean_std([0.5]) == (0.5, None) and mean_std([]) == (None, None)


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
    assert table[0] == ["method", "runs", "source_acc mean", "source_acc std", "best_source_acc mean",
                        "best_source_acc std"]  # fmt: skip
    assert sorted(row[0] for row in table[1:]) == ["kd", "synthetic_head"]
    assert {row[1] for row in table[1:]} == {"1", "2"}
    # Raw numbers: the mean and std of the two complete runs' metrics.json values.
    (pair,) = [row for row in table[1:] if row[1] == "2"]
    accs = [json.loads((r / "metrics.json").read_text()) for r in runs[1:]]
    accs = [m["source_acc"] for m in accs if m["method"] == pair[0]]
    assert [float(pair[2]), float(pair[3])] == pytest.approx([np.mean(accs), np.std(accs, ddof=1)])
    (single,) = [row for row in table[1:] if row[1] == "1"]
    assert single[3] == ""  # one run: no std
    assert (sweep / "curves.png").stat().st_size > 1000
    assert f"wrote {sweep / 'report.md'}, report.csv, runs.csv, curves.png" in caplog.messages


def test_report_needs_a_folder_with_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sweep_dir='.*nowhere' is not a folder"):
        run_task(["task=report", f"sweep_dir={tmp_path / 'nowhere'}"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no complete run under"):
        run_task(["task=report", f"sweep_dir={tmp_path / 'empty'}"], tmp_path / "r")


def write_run(folder: Path, method: str, seed: int, acc: float) -> None:
    """A complete run's metrics.json as a distill job writes it (the fields report reads)."""
    folder.mkdir(parents=True)
    metrics = {"status": "complete", "transfer_acc": acc, "config": {"method": method, "seed": seed}}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_paired_differences_to_a_baseline_match_scipys_paired_t(tmp_path: Path) -> None:
    from scipy.stats import ttest_rel

    accs = {"ce": [0.70, 0.74, 0.69, 0.72], "kd": [0.73, 0.75, 0.74, 0.71], "smooth": [0.60, 0.66]}
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            write_run(tmp_path / f"{method}-{seed}", method, seed, acc)
    metrics = run_task(
        ["task=report", f"sweep_dir={tmp_path}", "report.rows=[method]", "report.values=[transfer_acc]",
         "report.baseline=ce"],
        tmp_path / "job",
    )  # fmt: skip
    assert metrics["task"] == "report"
    text = (tmp_path / "report.md").read_text()
    ci = ttest_rel(accs["kd"], accs["ce"]).confidence_interval(0.95)
    mean = sum(accs["kd"]) / 4 - sum(accs["ce"]) / 4
    assert f"| kd | {mean:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] (n=4) |" in text
    # smooth ran seeds 0 and 1 only: paired with ce's seeds 0 and 1.
    ci = ttest_rel(accs["smooth"], accs["ce"][:2]).confidence_interval(0.95)
    assert f"| smooth | {-0.09:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] (n=2) |" in text
    # One line per run, raw numbers, for pandas.
    with open(tmp_path / "runs.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 10 and {"folder", "method", "seed", "transfer_acc"} == set(lines[0])
    assert {(r["method"], int(r["seed"]), float(r["transfer_acc"])) for r in lines} == {
        (m, s, a) for m, values in accs.items() for s, a in enumerate(values)
    }


def test_an_unknown_baseline_row_is_refused_with_the_rows(tmp_path: Path) -> None:
    write_run(tmp_path / "ce-0", "ce", 0, 0.7)
    write_run(tmp_path / "kd-0", "kd", 0, 0.8)
    with pytest.raises(
        ConfigError, match=r"report.baseline='CE' is not a row of the table; rows: \['ce', 'kd'\]"
    ):
        run_task(
            ["task=report", f"sweep_dir={tmp_path}", "report.rows=[method]", "report.baseline=CE"],
            tmp_path / "job",
        )


def test_a_search_chooses_per_row_the_setting_with_the_best_mean(tmp_path: Path) -> None:
    """Per method, the tau whose mean over seeds is highest; a single lucky seed loses to a
    better mean, and a tie keeps the first tau in order."""
    scores = {
        ("kd", 1.0): [0.70, 0.72],
        ("kd", 4.0): [0.60, 0.90],  # the best single seed, the best mean (0.75)
        ("kd", 16.0): [0.74, 0.74],
        ("st", 1.0): [0.80, 0.80],  # tie with 4.0: 1.0 comes first
        ("st", 4.0): [0.79, 0.81],
        ("st", 16.0): [0.95, 0.50],
    }
    for (method, tau), values in scores.items():
        for seed, acc in enumerate(values):
            folder = tmp_path / f"{method}-{tau}-{seed}"
            folder.mkdir()
            config = {"method": method, "seed": seed, "distill": {"tau": tau}}
            metrics = {"status": "complete", "best_val_acc": acc, "config": config}
            (folder / "metrics.json").write_text(json.dumps(metrics))
    run_task(
        ["task=report", f"sweep_dir={tmp_path}", "report.rows=[method,distill.tau]",
         "report.values=[best_val_acc]", "report.choose=[distill.tau]"],
        tmp_path / "job",
    )  # fmt: skip
    with open(tmp_path / "chosen.csv") as f:
        chosen = list(csv.DictReader(f))
    assert [(r["method"], r["distill.tau"], r["mean best_val_acc"], r["runs"]) for r in chosen] == [
        ("kd", "4.0", "0.7500", "2"),
        ("st", "1.0", "0.8000", "2"),
    ]
    assert "| kd | 4.0 | 0.7500 | 2 |" in (tmp_path / "report.md").read_text()


def test_report_defaults_rows_by_method_constants_in_a_header_and_curves(tmp_path: Path) -> None:
    """No layout given: rows by the method (not by the loss weights that differ with it), the
    size every run shares in a header line, curves.png of the first metric with a history; a
    later report of runs without histories removes the stale picture."""
    for method, weight in (("kd", 0.0), ("kd+synthetic_head", 1.0)):
        for seed in (0, 1):
            folder = tmp_path / f"{method}-{seed}"
            folder.mkdir()
            history = [{"epoch": e, "source_acc": 0.5 + 0.1 * e + 0.01 * seed} for e in (1, 2)]
            config = {"seed": seed, "distill": {"losses": {"synthetic_head": weight}}}
            metrics = {"status": "complete", "method": method, "source_acc": 0.7 + 0.01 * seed,
                       "transfer_train_size": 1437, "history": history, "config": config}  # fmt: skip
            (folder / "metrics.json").write_text(json.dumps(metrics))
    run_task(["task=report", f"sweep_dir={tmp_path}"], tmp_path / "job")
    report = (tmp_path / "report.md").read_text()
    assert "The same in every run: transfer_train_size 1437." in report
    table = list(csv.reader((tmp_path / "report.csv").open()))
    assert table[0] == ["method", "runs", "source_acc mean", "source_acc std"]
    assert sorted(row[0] for row in table[1:]) == ["kd", "kd+synthetic_head"]
    runs_csv = list(csv.DictReader((tmp_path / "runs.csv").open()))  # and every config key that varies
    assert {(r["method"], r["distill.losses.synthetic_head"], r["seed"]) for r in runs_csv} == {
        ("kd", "0.0", "0"), ("kd", "0.0", "1"), ("kd+synthetic_head", "1.0", "0"), ("kd+synthetic_head", "1.0", "1")
    }  # fmt: skip
    assert (tmp_path / "curves.png").stat().st_size > 1000
    for path in tmp_path.glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        path.write_text(json.dumps({**metrics, "history": []}))
    run_task(["task=report", f"sweep_dir={tmp_path}"], tmp_path / "job2")
    assert not (tmp_path / "curves.png").exists()
