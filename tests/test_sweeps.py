"""Sweeps that resume: reuse, retry and report of failed jobs, folder checks, launchers."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from penrun.app import sweeps
from penrun.app.cli import config_dir
from penrun.app.errors import ConfigError

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
