"""Sweeps that resume: reuse, retry and report of failed jobs, folder checks, launchers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import DictConfig

from penrun.app import sweeps
from penrun.app.cli import config_dir
from penrun.app.errors import ConfigError
from penrun.train.checkpoint import CHECKPOINT_FORMAT
from penrun.train.files import save_torch

from conftest import finish, run_main, run_task, start_cli

# Two one-epoch teacher jobs on digits; the second has an invalid learning rate.
SWEEP = ["-m", "task=train_teacher", "trainer.max_epochs=1", "trainer.lr=0.001,-1"]
GOOD = "trainer.lr=0.001,trainer.max_epochs=1"
BAD = "trainer.lr=-1,trainer.max_epochs=1"
# A sweep without an experiment name: its task, then its own overrides, sorted.
SWEEP_DIR = Path("outputs/multirun/train_teacher/trainer.lr=0.001,-1,trainer.max_epochs=1")


def job_folder(tmp_path: Path, name: str) -> Path:
    return tmp_path / SWEEP_DIR / "train_teacher" / name


# Launchers' sweeps: two parallel distill jobs that need one teacher (single-threaded jobs).
LAUNCHER_SWEEP = [
    "-m",
    "task=distill",
    "trainer.max_epochs=1",
    "teacher_trainer.max_epochs=1",
    "trainer.num_threads=1",
    "teacher_trainer.num_threads=1",
    "seed=0,1",
]
# Launched by the module's fixture (the others by their test): submitit's local launcher
# starts a fresh interpreter per job, the slowest launch of all, and is tested with -m slow.
LAUNCHERS = ("joblib",)


@dataclass
class Sweeps:
    """Every `penrun -m` of this module and the folders it ran in. The commands are launched
    in two rounds; in each, the launchers' sweeps run beside the others."""

    swept: Path  # SWEEP launched once, as it stands after that launch (tests use copies)
    again: Path  # a copy of it, launched again
    again_mtime: int  # its complete job's last.pt's mtime before that
    edited: Path  # a copy whose complete job's config was edited, launched again
    late: Path  # a sweep whose data file appeared between its two launches
    late_job: Path  # that sweep's job folder after the first launch failed
    launchers: dict[str, Path]  # launcher -> folder of its sweep, then launched again without it
    results: dict[str, subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def sweeps_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Sweeps:
    root = tmp_path_factory.mktemp("sweeps")
    swept, late_root = root / "swept", root / "late"
    launchers = {name: root / name for name in LAUNCHERS}
    for folder in (swept, late_root, *launchers.values()):
        folder.mkdir()
    late_data = late_root / "late.npz"  # a data file that appears after the first launch
    late_args = ["-m", "task=train_teacher", "trainer.max_epochs=1", "data=npz", f"data.path={late_data}"]
    # The launchers' sweeps run as a user runs them (their jobs' logs reach the command's
    # output), the others in this process meanwhile.
    first = {
        name: start_cli([*LAUNCHER_SWEEP, f"launcher={name}"], cwd=launchers[name]) for name in LAUNCHERS
    }
    results = {"swept": run_main(SWEEP, swept), "late first": run_main(late_args, late_root)}
    results |= {name: finish(proc, check=False) for name, proc in first.items()}
    failed = {p.parent for p in late_root.rglob("failed.json")}
    assert len(failed) == 1, results["late first"].stderr
    (late_job,) = failed

    again, edited = root / "again", root / "edited"
    for copy in (again, edited):
        shutil.copytree(swept / "outputs", copy / "outputs")
    again_mtime = (job_folder(again, GOOD) / "checkpoints" / "last.pt").stat().st_mtime_ns
    metrics_path = job_folder(edited, GOOD) / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["config"]["trainer"]["weight_decay"] = 0.1  # as if the config file had been edited
    metrics_path.write_text(json.dumps(metrics))
    with np.load(data_dir / "usps.npz") as usps:  # the first images of USPS: a quick job
        np.savez(late_data, **{k: usps[k][: 600 if "train" in k else 200] for k in usps.files})
    second = {f"{name} again": start_cli(LAUNCHER_SWEEP, cwd=launchers[name]) for name in LAUNCHERS}
    results |= {
        "again": run_main(SWEEP, again),
        "edited": run_main(SWEEP, edited),
        "late second": run_main(late_args, late_root),
    }
    results |= {name: finish(proc, check=False) for name, proc in second.items()}
    return Sweeps(swept, again, again_mtime, edited, late_root, late_job, launchers, results)


@pytest.fixture
def swept(sweeps_run: Sweeps, tmp_path: Path) -> Path:
    """A copy of the first launch's folder (sweep folders hold relative paths only, so a copy
    is the same sweep)."""
    shutil.copytree(sweeps_run.swept / "outputs", tmp_path / "outputs")
    return tmp_path


def test_the_first_launch_reports_its_plan_and_the_failure(sweeps_run: Sweeps) -> None:
    proc = sweeps_run.results["swept"]
    assert proc.returncode == 1, proc.stderr
    assert f"sweep {SWEEP_DIR}: 2 jobs: 2 new" in proc.stdout
    assert "1 of 2 jobs complete" in proc.stdout
    assert f"{BAD} failed: ConfigError: trainer.lr=-1.0 is invalid" in proc.stderr


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(swept: Path) -> None:
    assert json.loads((job_folder(swept, GOOD) / "metrics.json").read_text())["status"] == "complete"
    failure = json.loads((job_folder(swept, BAD) / "failed.json").read_text())
    assert failure["error"] == "ConfigError: trainer.lr=-1.0 is invalid: use a number > 0 and <= 10"
    assert failure["attempts"] == 1 and any("ConfigError" in line for line in failure["traceback"])
    status = json.loads((swept / SWEEP_DIR / "sweep_status.json").read_text())
    assert [job["state"] for job in status["jobs"]] == ["complete", "failed"]


def test_launching_again_reuses_finished_jobs_and_retries_failed_ones(sweeps_run: Sweeps) -> None:
    proc, folder = sweeps_run.results["again"], sweeps_run.again
    last = job_folder(folder, GOOD) / "checkpoints" / "last.pt"
    assert proc.returncode == 1
    assert "2 jobs: 1 complete (reused), 1 failed before (retried)" in proc.stdout
    assert last.stat().st_mtime_ns == sweeps_run.again_mtime
    assert json.loads((job_folder(folder, BAD) / "failed.json").read_text())["attempts"] == 2


def test_a_retried_job_that_succeeds_clears_its_failure(sweeps_run: Sweeps) -> None:
    first, second = sweeps_run.results["late first"], sweeps_run.results["late second"]
    assert first.returncode == 1 and "failed: ConfigError" in first.stderr
    folder = sweeps_run.late_job
    assert second.returncode == 0, second.stderr
    assert "1 jobs: 1 failed before (retried)" in second.stdout and "1 of 1 jobs complete" in second.stdout
    assert not (folder / "failed.json").exists()
    assert json.loads((folder / "metrics.json").read_text())["status"] == "complete"


def test_report_names_the_failed_job_and_its_error(swept: Path) -> None:
    sweep = swept / SWEEP_DIR
    run_task(["task=report", f"sweep_dir='{sweep}'"], swept / "r")  # the report task, in this process
    report = (sweep / "report.md").read_text()
    assert "1 complete runs" in report and "Missing or incomplete runs (1)" in report
    assert f"`train_teacher/{BAD}`: failed: ConfigError: trainer.lr=-1.0 is invalid" in report


def test_a_sweep_folder_of_a_different_config_is_refused_before_any_job(sweeps_run: Sweeps) -> None:
    proc, folder = sweeps_run.results["edited"], sweeps_run.edited
    assert proc.returncode == 2
    assert "penrun: error: the sweep folder holds runs of a different config in 1 of 2" in proc.stderr
    assert "trainer.weight_decay: 0.1 -> 0.0005" in proc.stderr
    assert "Launching" not in proc.stdout + proc.stderr
    assert json.loads((job_folder(folder, BAD) / "failed.json").read_text())["attempts"] == 1


@pytest.mark.xdist_group("test_sweeps")  # joblib's sweep is the module fixture's (getfixturevalue)
@pytest.mark.parametrize("launcher", ["joblib", pytest.param("local", marks=pytest.mark.slow)])
def test_launchers_share_teachers_and_resume_each_others_sweeps(
    launcher: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two parallel distill jobs need one teacher: the cache lock lets one train it. A sweep
    run by a launcher is found again by the default launcher and reported the same way."""
    if launcher in LAUNCHERS:
        sweeps_run: Sweeps = request.getfixturevalue("sweeps_run")
        folder, results = sweeps_run.launchers[launcher], sweeps_run.results
    else:
        folder = tmp_path / launcher
        folder.mkdir()
        results = {
            launcher: finish(start_cli([*LAUNCHER_SWEEP, f"launcher={launcher}"], cwd=folder), check=False)
        }
        results[f"{launcher} again"] = finish(start_cli(LAUNCHER_SWEEP, cwd=folder), check=False)
    proc = results[launcher]
    assert proc.returncode == 0, proc.stderr
    assert "2 of 2 jobs complete" in proc.stdout
    log = proc.stdout + "".join(p.read_text() for p in folder.rglob("*_log.out"))
    assert log.count("training teacher mlp") == 1 and log.count("using cached teacher") == 1

    again = results[f"{launcher} again"]
    assert again.returncode == 0, again.stderr
    assert "2 jobs: 2 complete (reused)" in again.stdout
    sweep = folder / "outputs/multirun/distill/seed=0,1,teacher_trainer.max_epochs=1,trainer.max_epochs=1"
    run_task(["task=report", f"sweep_dir='{sweep}'"], tmp_path / "r")  # the report task, in this process
    assert "2 complete runs" in (sweep / "report.md").read_text()


def test_the_plan_expands_an_experiments_own_sweep() -> None:
    """experiment=generation sweeps in its config (hydra.sweeper.params), not on the command line;
    a key of its sweep given on the command line (seed=14) replaces the experiment's values."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        overrides = ["experiment=generation", "trainer.lr=0.01", "seed=14"]
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        jobs = sweeps.plan_jobs(cfg)
    # task x data x 4 conditions (kappa_arm) from the experiment, each with the command line's
    # lr and seed, the longest first: the MNIST GANs, one-hot then the teacher's vMF; the digits
    # VAEs last.
    assert len(jobs) == 2 * 2 * 4 == len({job.folder for job in jobs})
    first, second, last = jobs[0], jobs[1], jobs[-1]
    assert first.folder == Path(
        "outputs/multirun/generation/gan/+kappa_arm=baseline,data=mnist,experiment=generation,seed=14,trainer.lr=0.01"
    )
    assert first.config["trainer"]["max_epochs"] == 10 and first.config["gen"]["cond"] == "onehot"
    assert second.folder.name.startswith("+kappa_arm=weights_x1,data=mnist")
    assert second.config["gen"]["cond"] == "penultimate"
    assert last.folder == Path(
        "outputs/multirun/generation/vae/+kappa_arm=class_mean_fitted,data=digits,experiment=generation,seed=14,trainer.lr=0.01"
    )
    assert last.config["task"]["name"] == "vae" and last.config["trainer"]["max_epochs"] == 100
    assert last.config["vmf"]["direction"] == "class_mean" and last.config["gen"]["cond"] == "penultimate"
    assert last.config["trainer"]["lr"] == 0.01 and last.config["seed"] == 14
    assert "hydra" not in last.config and "paths" not in last.config


@pytest.mark.parametrize(
    "overrides",
    [
        ["seed=0,1,2", "lr=1,2", "seed=5"],
        ["a=1", "b=x,y", "a=2,3", "c=z"],
        ["task=distill", "+row=kd,ce", "seed=0,1", "+row=kd"],
        ["x=1"],
    ],
)
def test_the_plans_jobs_are_hydras_basic_sweeper_jobs(overrides: list[str]) -> None:
    """The plan's jobs are the ones Hydra's BasicSweeper launches, in its order: a key given
    again takes its last values in its first place. The oracle is BasicSweeper itself."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    (hydras,) = BasicSweeper.split_arguments(parsed, None)
    assert sweeps.sweep_combinations(parsed) == hydras


def test_an_optuna_search_maximizes_the_validation_score_each_job_returns(tmp_path: Path) -> None:
    """hparams_search=distill_optuna, 3 trials: every job returns its best_val_acc (not a test
    score) and Optuna's best value is the best of the three. Launched again, the seeded
    sampler proposes the same trials and each reuses its finished run."""
    import yaml

    search = ["-m", "hparams_search=distill_optuna", "hydra.sweeper.n_trials=3", "+row_labelled=ce_kd",
              "distill.labels=10", "trainer.max_epochs=2", "teacher_trainer.max_epochs=3"]  # fmt: skip
    first = run_main(search, tmp_path)
    assert first.returncode == 0 and "report: penrun task=report" in first.stdout, first.stderr
    sweep = tmp_path / (
        "outputs/multirun/distill/+row_labelled=ce_kd,distill.labels=10,hparams_search=distill_optuna,"
        "teacher_trainer.max_epochs=3,trainer.max_epochs=2"
    )
    trials = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert len(trials) == 3 and len({(m["config"]["distill"]["tau"]) for m in trials}) == 3
    assert all(1 <= m["config"]["distill"]["tau"] <= 16 for m in trials)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(m["best_val_acc"] for m in trials))
    assert best["best_value"] != pytest.approx(max(m["transfer_acc"] for m in trials))
    stamps = {p: p.stat().st_mtime_ns for p in sweep.rglob("metrics.json")}
    again = run_main(search, tmp_path)
    assert again.stdout.count("is finished: reusing its results") == 3, again.stdout
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("metrics.json")} == stamps


def test_a_search_whose_first_trial_is_refused_stops_there_in_one_line(tmp_path: Path) -> None:
    """hparams_search=distill_optuna searches ce's weight, and ce needs labels: without a
    labelled row the config check refuses the first trial. The search stops there with the
    check's one line and exit status 2 (not 20 refused trials and Optuna's traceback), and
    leaves no trial folder behind."""
    proc = run_main(["-m", "hparams_search=distill_optuna"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "penrun: error: distill.losses.ce > 0 needs labels, but distill.labels=none; set "
        "distill.labels=all or N, or ce=0"
    ]
    assert "#0 : " in proc.stdout and "#1 : " not in proc.stdout  # one trial launched
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]


def test_rerun_moves_the_old_run_aside_and_starts_afresh(tmp_path: Path) -> None:
    """A folder of another config is refused, naming rerun=true; rerun=true renames it (nothing
    is deleted), runs afresh, and a report of the folder counts the fresh run only."""
    args = ["task=train_teacher", "trainer.max_epochs=1"]
    assert run_main(args, tmp_path).returncode == 0
    folder = tmp_path / "outputs" / "runs" / "train_teacher" / "trainer.max_epochs=1"
    edited = json.loads((folder / "metrics.json").read_text())
    edited["config"]["trainer"]["lr"] = 0.5  # as if the run were made with another config
    (folder / "metrics.json").write_text(json.dumps(edited))
    refused = run_main(args, tmp_path)
    assert refused.returncode == 2 and "add rerun=true to move it aside" in refused.stderr
    done = run_main([*args, "rerun=true"], tmp_path)
    assert done.returncode == 0 and "rerun=true: moved the previous run aside to" in done.stdout
    (old,) = [p for p in folder.parent.iterdir() if ".old-" in p.name]
    assert json.loads((old / "metrics.json").read_text()) == edited
    fresh = json.loads((folder / "metrics.json").read_text())
    assert fresh["status"] == "complete" and fresh["config"]["trainer"]["lr"] == 0.001
    run_task(["task=report", f"sweep_dir={folder.parent}"], tmp_path / "report")
    assert "1 complete runs" in (folder.parent / "report.md").read_text()


def test_a_job_returns_the_objective_its_config_names() -> None:
    from penrun.app.job import objective

    metrics = {"test_acc": 0.8, "best_val_acc": 0.9, "selected_epoch": 3, "cond": "onehot"}
    assert objective(metrics) == 0.9  # the validation score by default, not the test score
    assert objective({"cond_acc": 0.7, "frechet": 2.0}) == 0.7
    assert objective({"frechet": 2.0}) is None
    assert objective(metrics, "test_acc") == 0.8
    with pytest.raises(
        ConfigError,
        match=r"objective='val_acc' is not a number .*valid: \['best_val_acc', 'selected_epoch', 'test_acc'\]",
    ):
        objective(metrics, "val_acc")


def test_the_teacher_override_train_teacher_prints_can_be_pasted_back(tmp_path: Path) -> None:
    """Run folder names hold `=` and `,`: the printed override quotes them for Hydra and the
    shell; a run folder works as well as its checkpoint."""
    import shlex

    trained = run_main(["task=train_teacher", "seed=3", "trainer.max_epochs=1"], tmp_path)
    (line,) = [x for x in trained.stdout.splitlines() if x.startswith("use it: penrun ")]
    pasted = shlex.split(line.removeprefix("use it: penrun ").split(" (")[0])
    checkpoint = pasted[0].split("=", 1)[1].strip("'")
    assert "seed=3,trainer.max_epochs=1" in checkpoint and checkpoint.endswith("checkpoints/last.pt")
    for override in (pasted[0], f"teacher_ckpt='{Path(checkpoint).parents[1]}'"):
        done = run_main(["task=fit", override], tmp_path)
        assert done.returncode == 0 and "softmax_acc" in done.stdout, (override, done.stderr)


def test_two_sweeps_of_one_task_stay_apart_and_each_prints_its_report(tmp_path: Path) -> None:
    """Without an experiment name each sweep's folder is named by its own overrides (the
    launcher and runtime keys aside), so a report of one reads that sweep alone; the printed
    report line pastes back as it stands."""
    import shlex

    first = ["-m", "task=train_teacher", "seed=0,1", "trainer.max_epochs=1"]
    second = ["-m", "task=train_teacher", "seed=0", "trainer.max_epochs=1,2", "trainer.progress=false"]
    lines = {}
    for args in (first, second):
        done = run_main(args, tmp_path)
        assert done.returncode == 0, done.stderr
        (lines[args[2]],) = [x for x in done.stdout.splitlines() if x.startswith("report: penrun ")]
    assert lines["seed=0,1"] == (
        "report: penrun task=report \"sweep_dir='outputs/multirun/train_teacher/seed=0,1,trainer.max_epochs=1'\""
    )
    assert "sweep_dir='outputs/multirun/train_teacher/seed=0,trainer.max_epochs=1,2'" in lines["seed=0"]
    again = run_main([*first, "launcher=joblib", "trainer.num_threads=1"], tmp_path)
    assert "2 jobs: 2 complete (reused)" in again.stdout
    report = run_main(shlex.split(lines["seed=0"].removeprefix("report: penrun ")), tmp_path)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "outputs/multirun/train_teacher/seed=0,trainer.max_epochs=1,2/report.md").read_text()
    assert "2 complete runs" in text and "seed=1" not in text


# ---------------------------------------------------------------- job states, by hand-made folders
def boom(attempt: int = 1) -> ValueError:
    try:
        raise ValueError(f"boom {attempt}")
    except ValueError as err:
        return err


def test_a_failure_is_recorded_with_its_traceback_and_counted(tmp_path: Path) -> None:
    sweeps.record_failure(tmp_path, boom(1))
    sweeps.record_failure(tmp_path, boom(2))
    failure = json.loads((tmp_path / "failed.json").read_text())
    assert failure["error"] == "ValueError: boom 2" and failure["attempts"] == 2
    assert failure["traceback"][0] == "Traceback (most recent call last):\n"
    assert failure["traceback"][-1] == "ValueError: boom 2\n"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", failure["time"])


def deep(depth: int) -> None:
    """Frames of two functions in turn (Python folds a run of the same frame into one line)."""
    if depth:
        deeper(depth - 1)
    raise ValueError("deep")


def deeper(depth: int) -> None:
    deep(depth)


def test_a_failure_keeps_the_last_twenty_lines_of_a_long_traceback(tmp_path: Path) -> None:
    try:
        deep(15)  # a traceback of 33 lines
    except ValueError as err:
        sweeps.record_failure(tmp_path, err)
    lines = json.loads((tmp_path / "failed.json").read_text())["traceback"]
    assert len(lines) == 20 and lines[-1] == "ValueError: deep\n" and "Traceback" not in lines[0]


def test_a_failure_is_cleared_by_the_main_process_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweeps.clear_failure(tmp_path)  # nothing to clear: no error
    sweeps.record_failure(tmp_path, boom())
    monkeypatch.setattr(sweeps.distributed, "is_main", lambda: False)
    sweeps.clear_failure(tmp_path)
    assert (tmp_path / "failed.json").exists()
    monkeypatch.setattr(sweeps.distributed, "is_main", lambda: True)
    sweeps.clear_failure(tmp_path)
    assert not (tmp_path / "failed.json").exists()


def job(
    root: Path,
    name: str,
    metrics: dict | str | None = None,
    failed: str | None = None,
    last: dict | None = None,
) -> Path:
    """A job folder as a run leaves it: metrics.json (a dict, or raw text), failed.json, last.pt."""
    folder = root / name
    folder.mkdir(parents=True)
    if metrics is not None:
        (folder / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    if failed is not None:
        (folder / "failed.json").write_text(failed)
    if last is not None:
        save_torch(folder / "checkpoints" / "last.pt", {"format": CHECKPOINT_FORMAT, **last})
    return folder


FAILED = json.dumps({"error": "ValueError: boom", "attempts": 2})
STATES = {
    "complete": ({"status": "complete"}, FAILED, None, ("complete", "complete")),
    "failed": ({"status": "running", "history": [{}]}, FAILED, None, ("failed", "failed: ValueError: boom (attempt 2)")),
    "failed_unreadable": (None, "{trunc", None, ("failed", "failed: failed.json unreadable (attempt ?)")),
    "unreadable": ("{trunc", None, None,
                   ("interrupted", "metrics.json unreadable (rebuilt from last.pt when the job runs)")),
    "running": ({"status": "running", "history": [{}, {}, {}]}, None, None, ("interrupted", "interrupted after 3 epoch(s)")),
    "last_only": (None, None, {"epoch": 0}, ("interrupted", "interrupted after 0 epoch(s)")),
    "new": (None, None, None, ("new", "no metrics.json (not started, or killed before its first epoch)")),
}  # fmt: skip


@pytest.mark.parametrize("name", STATES)
def test_a_job_s_state_is_read_from_its_folder(tmp_path: Path, name: str) -> None:
    metrics, failed, last, expected = STATES[name]
    assert sweeps.job_state(job(tmp_path, name, metrics, failed, last)) == expected


def test_a_job_s_stored_config_is_its_metrics_then_its_last_checkpoint(tmp_path: Path) -> None:
    both = job(tmp_path, "both", {"config": {"seed": 1}}, last={"config": {"seed": 2}})
    assert sweeps.stored_config(both) == {"seed": 1}
    assert sweeps.stored_config(job(tmp_path, "last", last={"config": {"seed": 2}})) == {"seed": 2}
    assert sweeps.stored_config(job(tmp_path, "none")) is None
    assert sweeps.stored_config(job(tmp_path, "bare", {"status": "running"})) is None


def planned(folder: Path, **config: object) -> sweeps.PlannedJob:
    return sweeps.PlannedJob(folder, [], {"task": {"name": "fit"}, **config})


def test_a_sweep_over_runs_of_other_configs_is_refused_naming_them(tmp_path: Path) -> None:
    stored = {"task": {"name": "fit"}, "seed": 0, "trainer": {"lr": 0.1, "max_epochs": 2}}
    folders = [job(tmp_path, f"j{k}", {"config": stored}) for k in range(5)]
    same = [planned(folder, seed=0, trainer={"lr": 0.1, "max_epochs": 2}) for folder in folders]
    sweeps.check_same_configs([*same, planned(tmp_path / "not_started", seed=9)])  # passes
    edited = dict(seed=1, trainer={"lr": 0.2, "max_epochs": 3}, fit={"samples_per_class": 5})
    with pytest.raises(ConfigError) as refused:
        sweeps.check_same_configs([*(planned(f, **edited) for f in folders[:4]), same[4]])
    # Three folders named, each with its first three differences (keys sorted).
    named = [f"{folders[k]} (fit.samples_per_class: '<unset>' -> 5; seed: 0 -> 1; trainer.lr: 0.1 -> 0.2)"
             for k in range(3)]  # fmt: skip
    assert str(refused.value) == (
        f"the sweep folder holds runs of a different config in 4 of 5 job folder(s): {', '.join(named)}. "
        "Set experiment_name or hydra.sweep.dir to a new folder, or add rerun=true to move the old runs "
        "aside and start afresh"
    )


def test_a_key_added_since_a_run_was_stored_is_no_difference_at_its_default(tmp_path: Path) -> None:
    old = {"task": {"name": "distill"}, "distill": {"labels": None}}
    new = {"task": {"name": "distill"}, "distill": {"labels": None, "held_out": "balanced"}}
    sweeps.check_same_configs([sweeps.PlannedJob(job(tmp_path, "old", {"config": old}), [], new)])
    old = {"task": {"name": "distill"}, "distill": {"labels": 10}}
    with pytest.raises(ConfigError, match=r"distill\.held_out: 'balanced' -> 'seeded'"):
        sweeps.check_same_configs(
            [
                sweeps.PlannedJob(
                    job(tmp_path, "older", {"config": old}), [], new | {"distill": {"held_out": "seeded"}}
                )
            ]
        )


def test_the_plan_counts_jobs_by_state_in_a_fixed_order(tmp_path: Path) -> None:
    folders = [
        job(tmp_path, name, *STATES[name][:3])
        for name in ("new", "running", "failed", "complete", "unreadable")
    ]
    plan = sweeps.describe_plan("SWEEP", [planned(folder) for folder in folders])
    assert plan == (
        "sweep SWEEP: 5 jobs: 1 complete (reused), 2 interrupted (resume from last.pt), "
        "1 failed before (retried), 1 new"
    )
    assert sweeps.describe_plan("S", [planned(folders[3])]) == "sweep S: 1 jobs: 1 complete (reused)"


# ---------------------------------------------------------------- the callback, on composed sweeps
def multirun_config(overrides: list[str]) -> DictConfig:
    """The master config of `penrun -m OVERRIDES`, as Hydra hands it to the callback."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return loader.load_configuration("config", overrides, run_mode=RunMode.MULTIRUN)


def start_multirun(
    cfg: DictConfig, capsys: pytest.CaptureFixture
) -> tuple[sweeps.SweepCallback, int, str, str]:
    callback, status = sweeps.SweepCallback(), 0
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):  # the launcher's loader
        try:
            callback.on_multirun_start(cfg)
        except SystemExit as stop:
            status = stop.code
    out, err = capsys.readouterr()
    return callback, status, out, err


SEEDS = ["task=fit", "seed=0,1"]
SEEDS_DIR = "outputs/multirun/fit/seed=0,1"


def test_a_sweep_prints_its_plan_and_refuses_other_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    callback, status, out, _ = start_multirun(multirun_config(SEEDS), capsys)
    assert status == 0 and out == f"sweep {SEEDS_DIR}: 2 jobs: 2 new\n"
    assert [j.folder for j in callback.jobs] == [Path(SEEDS_DIR) / "fit" / f"seed={s}" for s in (0, 1)]
    assert [j.config["seed"] for j in callback.jobs] == [0, 1] and [j.overrides for j in callback.jobs] == [
        ["task=fit", "seed=0"], ["task=fit", "seed=1"]]  # fmt: skip
    other = dict(callback.jobs[0].config, seed=7)
    job(tmp_path, str(callback.jobs[0].folder), {"config": other, "status": "complete"})
    _, status, out, err = start_multirun(multirun_config(SEEDS), capsys)
    assert status == 2 and out == "" and err.startswith(
        "penrun: error: the sweep folder holds runs of a different config in 1 of 2 job folder(s)")  # fmt: skip
    _, status, out, err = start_multirun(multirun_config([*SEEDS, "rerun=true"]), capsys)
    assert status == 0 and err == ""
    assert (
        out
        == f"sweep {SEEDS_DIR}: 2 jobs, all afresh (rerun=true: 1 old folder(s) moved aside to <folder>.old-<time>)\n"
    )


def test_a_sweep_of_a_value_that_does_not_compose_stops_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    _, status, out, err = start_multirun(multirun_config(["task=fit", "seed=0,x"]), capsys)
    assert status == 2 and out == ""
    assert (
        err
        == "penrun: error: seed='x' is invalid: Value 'x' of type 'str' could not be converted to Integer\n"
    )


def test_a_search_s_jobs_are_chosen_as_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = multirun_config(["hparams_search=distill_optuna"])
    assert sweeps.chooses_as_it_goes(cfg.hydra) and not sweeps.chooses_as_it_goes(
        multirun_config(SEEDS).hydra
    )
    callback, status, out, _ = start_multirun(cfg, capsys)
    assert status == 0 and callback.jobs == []
    assert out == f"sweep {cfg.hydra.sweep.dir}: jobs chosen as it goes by OptunaSweeper\n"
    import optuna

    library = optuna.logging._get_library_root_logger()  # its lines reach Hydra's log, not stderr
    assert library.propagate and not library.handlers
    callback.on_multirun_end(cfg)
    assert capsys.readouterr().out == f"report: penrun task=report \"sweep_dir='{cfg.hydra.sweep.dir}'\"\n"


def test_a_sweep_s_end_records_every_job_and_names_the_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = multirun_config(SEEDS)
    callback, *_ = start_multirun(cfg, capsys)
    done, broken = (j.folder for j in callback.jobs)
    job(tmp_path, str(done), {"status": "complete"})
    job(tmp_path, str(broken), failed=FAILED)
    try:
        callback.on_multirun_end(cfg)
        assert sweeps.failed_jobs == [broken]
    finally:
        sweeps.failed_jobs.clear()
    out, err = capsys.readouterr()
    assert (
        out
        == f"sweep {SEEDS_DIR}: 1 of 2 jobs complete\nreport: penrun task=report \"sweep_dir='{SEEDS_DIR}'\"\n"
    )
    assert (
        err
        == f"  {broken}: failed: ValueError: boom (attempt 2)\nlaunch the same command again to retry them\n"
    )
    status = json.loads((tmp_path / SEEDS_DIR / "sweep_status.json").read_text())
    assert [(j["folder"], j["overrides"], j["state"]) for j in status["jobs"]] == [
        (str(done), ["task=fit", "seed=0"], "complete"), (str(broken), ["task=fit", "seed=1"], "failed")]  # fmt: skip
    assert status["jobs"][1]["description"] == "failed: ValueError: boom (attempt 2)"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", status["time"])
    (tmp_path / done / "metrics.json").unlink()
    try:
        callback.on_multirun_end(cfg)
    finally:
        sweeps.failed_jobs.clear()
    out, _ = capsys.readouterr()
    assert out == f"sweep {SEEDS_DIR}: 0 of 2 jobs complete\n"  # no report of nothing
