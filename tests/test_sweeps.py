"""Sweeps that resume: reuse, retry and report of failed jobs, folder checks, launchers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from penrun import sweeps
from penrun.cli import config_dir
from penrun.errors import ConfigError

from conftest import run_cli

# Two one-epoch teacher jobs on digits; the second has an invalid learning rate.
SWEEP = ["-m", "task=train_teacher", "trainer.max_epochs=1", "trainer.lr=0.001,-1"]
GOOD = "trainer.lr=0.001,trainer.max_epochs=1"
BAD = "trainer.lr=-1,trainer.max_epochs=1"


def job_folder(tmp_path: Path, name: str, experiment: str = "train_teacher") -> Path:
    return tmp_path / "outputs" / "multirun" / experiment / "train_teacher" / name


@pytest.fixture
def swept(tmp_path: Path) -> Path:
    proc = run_cli(SWEEP, cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "sweep outputs/multirun/train_teacher: 2 jobs: 2 new" in proc.stdout
    assert "1 of 2 jobs complete" in proc.stdout
    assert f"{BAD}: failed: ConfigError: trainer.lr=-1 is invalid" in proc.stderr
    return tmp_path


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(swept: Path) -> None:
    assert json.loads((job_folder(swept, GOOD) / "metrics.json").read_text())["status"] == "complete"
    failure = json.loads((job_folder(swept, BAD) / "failed.json").read_text())
    assert failure["error"] == "ConfigError: trainer.lr=-1 is invalid: use a number > 0"
    assert failure["attempts"] == 1 and any("ConfigError" in line for line in failure["traceback"])
    status = json.loads((swept / "outputs" / "multirun" / "train_teacher" / "sweep_status.json").read_text())
    assert [job["state"] for job in status["jobs"]] == ["complete", "failed"]


def test_launching_again_reuses_finished_jobs_and_retries_failed_ones(swept: Path) -> None:
    last = job_folder(swept, GOOD) / "checkpoints" / "last.pt"
    before = last.stat().st_mtime_ns
    proc = run_cli(SWEEP, cwd=swept, check=False)
    assert proc.returncode == 1
    assert "2 jobs: 1 complete (reused), 1 failed before (retried)" in proc.stdout
    assert last.stat().st_mtime_ns == before
    assert json.loads((job_folder(swept, BAD) / "failed.json").read_text())["attempts"] == 2


def test_a_retried_job_that_succeeds_clears_its_failure(tmp_path: Path, data_dir: Path) -> None:
    late = tmp_path / "late.npz"  # a data file that appears after the first launch
    args = ["-m", "task=train_teacher", "trainer.max_epochs=1", "data=npz", f"data.path={late}"]
    first = run_cli(args, cwd=tmp_path, check=False)
    assert first.returncode == 1 and "failed: ConfigError" in first.stderr
    (folder,) = {p.parent for p in tmp_path.rglob("failed.json")}

    shutil.copy(data_dir / "usps.npz", late)
    second = run_cli(args, cwd=tmp_path)
    assert "1 jobs: 1 failed before (retried)" in second.stdout and "1 of 1 jobs complete" in second.stdout
    assert not (folder / "failed.json").exists()
    assert json.loads((folder / "metrics.json").read_text())["status"] == "complete"


def test_report_names_the_failed_job_and_its_error(swept: Path) -> None:
    sweep = swept / "outputs" / "multirun" / "train_teacher"
    run_cli(["task=report", f"sweep_dir={sweep}", f"hydra.run.dir={swept / 'r'}"], cwd=swept)
    report = (sweep / "report.md").read_text()
    assert "1 complete runs" in report and "Missing or incomplete runs (1)" in report
    assert f"`train_teacher/{BAD}`: failed: ConfigError: trainer.lr=-1 is invalid" in report


def test_a_sweep_folder_of_a_different_config_is_refused_before_any_job(swept: Path) -> None:
    metrics_path = job_folder(swept, GOOD) / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["config"]["trainer"]["weight_decay"] = 0.1  # as if the config file had been edited
    metrics_path.write_text(json.dumps(metrics))
    proc = run_cli(SWEEP, cwd=swept, check=False)
    assert proc.returncode == 2
    assert "penrun: error: the sweep folder holds runs of a different config in 1 of 2" in proc.stderr
    assert "trainer.weight_decay: 0.1 -> 0.0005" in proc.stderr
    assert "Launching" not in proc.stdout + proc.stderr
    assert json.loads((job_folder(swept, BAD) / "failed.json").read_text())["attempts"] == 1


@pytest.mark.parametrize("launcher", ["joblib", "local"])
def test_launchers_share_teachers_and_resume_each_others_sweeps(launcher: str, tmp_path: Path) -> None:
    """Two parallel distill jobs need one teacher: the cache lock lets one train it. A sweep
    run by a launcher is found again by the default launcher and reported the same way."""
    args = [
        "-m",
        "task=distill",
        "trainer.max_epochs=1",
        "teacher_trainer.max_epochs=1",
        "trainer.num_threads=1",
        "teacher_trainer.num_threads=1",
        "seed=0,1",
    ]
    proc = run_cli([*args, f"launcher={launcher}"], cwd=tmp_path)
    assert "2 of 2 jobs complete" in proc.stdout
    log = proc.stdout + "".join(p.read_text() for p in tmp_path.rglob("*_log.out"))
    assert log.count("training teacher mlp") == 1 and log.count("using cached teacher") == 1

    again = run_cli(args, cwd=tmp_path)
    assert "2 jobs: 2 complete (reused)" in again.stdout
    sweep = tmp_path / "outputs" / "multirun" / "distill"
    run_cli(["task=report", f"sweep_dir={sweep}", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert "2 complete runs" in (sweep / "report.md").read_text()


@pytest.mark.parametrize(
    ("arg", "package"),
    [
        ("hydra/launcher=joblib", "hydra-joblib-launcher"),
        ("launcher=slurm", "hydra-submitit-launcher"),
        ("hydra/launcher=submitit_local", "hydra-submitit-launcher"),
    ],
)
def test_a_missing_launcher_plugin_names_its_package(
    arg: str, package: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sweeps.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=rf"needs the Hydra launcher plugin '{package}'"):
        sweeps.check_launcher_plugins(["-m", arg, "seed=0,1"])

    from penrun.cli import main

    monkeypatch.setattr(sys, "argv", ["penrun", "-m", arg])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "pip install 'penrun[cluster]'" in capsys.readouterr().err


def test_installed_launchers_pass_the_check() -> None:
    sweeps.check_launcher_plugins(["hydra/launcher=joblib", "launcher=slurm", "launcher=local"])


def test_the_plan_expands_an_experiments_own_sweep() -> None:
    """experiment=generation sweeps in its config (hydra.sweeper.params), not on the command line."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config", overrides=["experiment=generation", "trainer.lr=0.01"], return_hydra_config=True
        )
        jobs = sweeps.plan_jobs(cfg)
    # task x gen.cond x data x seed from the experiment, each with the command line's lr
    assert len(jobs) == 2 * 2 * 2 * 3 == len({job.folder for job in jobs})
    last = jobs[-1]
    assert last.folder == Path(
        "outputs/multirun/generation/gan/data=mnist,experiment=generation,gen.cond=penultimate,seed=2,trainer.lr=0.01"
    )
    assert last.config["task"]["name"] == "gan" and last.config["trainer"]["max_epochs"] == 10
    assert last.config["trainer"]["lr"] == 0.01
    assert "hydra" not in last.config and "paths" not in last.config
