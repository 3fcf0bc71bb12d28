"""What penrun promises a lab: checkpoints never run code, numbers depend on the config alone,
broken files are rebuilt or refused in one line, a refused command touches nothing, and bad
input ends in `penrun: error: ...` (exit 2) before any work, never in a traceback."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from penrun.train import files
from penrun.train.checkpoint import CHECKPOINT_FORMAT
from penrun.train.loop import NonFiniteWatch, TrainingDiverged

from conftest import killer_script, run_main

# A tiny digits job: a teacher of one epoch on 200 images.
TINY = ["trainer.progress=false", "trainer.max_epochs=1", "data.limit_train=200"]
TINY_TEACHER = ["teacher_trainer.max_epochs=1", "teacher_trainer.progress=false"]


def penrun(args: list[str]) -> tuple[int, str]:
    """`penrun ARGS` in this process, in the current folder: exit status and stderr."""
    done = run_main(args, Path.cwd())
    return done.returncode, done.stderr


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("penrun: error: "), err
    return lines[0]


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under a folder (hidden ones too) with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def metrics_of(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    drop = {"epoch_time", "eval_time", "teacher_ckpt", "evaluator_ckpt", "checkpoint"}
    metrics["history"] = [{k: v for k, v in row.items() if k not in drop} for row in metrics["history"]]
    return {k: v for k, v in metrics.items() if k not in drop}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- 1. checkpoints never run code
class Planted:
    """Unpickling this creates the file `marker`: the stand-in for a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "modules": {}, "extra": Planted(marker)}, path)
    return path


@pytest.mark.parametrize(
    "entry",
    ["teacher_ckpt", "evaluator_ckpt", "resume", "sweep"],
)
def test_a_planted_pickle_runs_no_code(entry: str, in_tmp: Path) -> None:
    marker = in_tmp / "pwned"
    evil = in_tmp / "evil.pt"
    if entry == "teacher_ckpt":
        args = ["task=fit", f"teacher_ckpt={plant(evil, marker)}", *TINY]
    elif entry == "evaluator_ckpt":
        args = ["task=vae", "gen.cond=onehot", f"evaluator_ckpt={plant(evil, marker)}", *TINY]
    elif entry == "resume":
        plant(in_tmp / "outputs/runs/train_teacher/trainer.max_epochs=1/checkpoints/last.pt", marker)
        args = ["task=train_teacher", "trainer.max_epochs=1", "trainer.progress=false"]
    else:
        job = "outputs/multirun/train_teacher/seed=0,1,trainer.max_epochs=1/train_teacher/seed=1,trainer.max_epochs=1"
        plant(in_tmp / job / "checkpoints/last.pt", marker)
        args = ["-m", "task=train_teacher", "seed=0,1", "trainer.max_epochs=1", "trainer.progress=false"]
    line = one_line_error(*penrun(args))
    assert "refusing to load checkpoint" in line and "could run code" in line
    assert not marker.exists()


# ---------------------------------------------------------------- 2. numbers from the config alone
GENERATION = [*TINY, *TINY_TEACHER, "evaluator_trainer.max_epochs=1", "net@evaluator=mlp_small"]
GENERATION += ["evaluator_trainer.progress=false", "gen.eval_per_class=5", "gen.width=8"]
CACHED = {
    "vae": ["task=vae", *GENERATION],
    "gan": ["task=gan", *GENERATION],
    "distill": [
        *["task=distill", *TINY, *TINY_TEACHER],
        *["transfer.limit_train=200", "method=ce_dirichlet", "distill.labels=all"],
    ],
}


@pytest.mark.parametrize("task", sorted(CACHED))
def test_the_numbers_are_the_same_cold_and_warm(task: str, in_tmp: Path) -> None:
    args = CACHED[task]
    assert penrun(args)[0] == 0  # cold: trains and caches the teacher (and the evaluator)
    (run,) = (in_tmp / "outputs/runs" / task).iterdir()
    cold = metrics_of(run)
    os.rename(run, in_tmp / "cold")
    assert penrun(args)[0] == 0  # warm: they come from the cache
    assert metrics_of(run) == cold


def test_a_kill_right_after_the_caches_resumes_to_the_same_numbers(in_tmp: Path) -> None:
    args = CACHED["vae"]
    assert penrun(args)[0] == 0
    (run,) = (in_tmp / "outputs/runs/vae").iterdir()
    uninterrupted = metrics_of(run)
    shutil.rmtree(in_tmp / "outputs")
    # 200 images in batches of 64: 4 steps train the teacher, 4 the evaluator; the VAE's first
    # step is the 9th of the process, after both caches were written.
    script = in_tmp / "kill.py"
    script.write_text(killer_script(args, kill_at=9))
    killed = subprocess.run([sys.executable, str(script)], cwd=in_tmp, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert (in_tmp / "outputs/evaluators").is_dir() and not (run / "metrics.json").exists()
    assert penrun(args)[0] == 0
    assert metrics_of(run) == uninterrupted


# ---------------------------------------------------------------- 3. unreadable metrics.json
def test_a_truncated_metrics_file_is_rebuilt_from_last_pt(in_tmp: Path) -> None:
    args = ["task=train_teacher", *TINY]
    assert penrun(args)[0] == 0
    (run,) = (in_tmp / "outputs/runs/train_teacher").iterdir()
    before = metrics_of(run)
    text = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(text[: len(text) // 2])
    assert penrun(args)[0] == 0
    assert metrics_of(run) == before


def test_a_sweep_and_its_report_survive_a_broken_job(in_tmp: Path) -> None:
    args = ["-m", "task=train_teacher", "seed=0,1", *TINY]
    assert penrun(args)[0] == 0
    sweep = in_tmp / "outputs/multirun/train_teacher/data.limit_train=200,seed=0,1,trainer.max_epochs=1"
    jobs = sorted((sweep / "train_teacher").iterdir())
    (jobs[0] / "metrics.json").write_text('{"status": "compl')
    code, _err = penrun(["task=report", f"sweep_dir='{sweep}'", "trainer.progress=false"])
    assert code == 0 and "metrics.json unreadable" in (sweep / "report.md").read_text()
    assert penrun(args)[0] == 0  # the sweep rebuilds the broken job from its last.pt
    assert json.loads((jobs[0] / "metrics.json").read_text())["status"] == "complete"
    (jobs[1] / "metrics.json").unlink()
    (jobs[1] / "checkpoints/last.pt").write_bytes(b"not a checkpoint")
    before = fingerprint(jobs[0])
    line = one_line_error(*penrun(args))  # refused before any job starts, naming the file
    last = jobs[1].relative_to(in_tmp) / "checkpoints/last.pt"
    assert f"checkpoint '{last}' is corrupt or unreadable: move it aside" in line
    assert fingerprint(jobs[0]) == before


# ---------------------------------------------------------------- 4. a refused command touches nothing
def test_a_refused_command_leaves_the_other_run_untouched(in_tmp: Path) -> None:
    assert penrun(["task=train_teacher", *TINY])[0] == 0
    (run,) = (in_tmp / "outputs/runs/train_teacher").iterdir()
    before = fingerprint(run)
    line = one_line_error(*penrun(["task=train_teacher", *TINY, f"hydra.run.dir='{run}'", "trainer.lr=0.01"]))
    assert "holds a run of a different config" in line
    lock = files.exclusive_lock(run / ".lock", wait=False)  # another process holds the folder
    try:
        line = one_line_error(*penrun(["task=train_teacher", *TINY]))
    finally:
        lock.close()
    assert "is in use by another penrun process" in line
    assert fingerprint(run) == before


# ---------------------------------------------------------------- 5, 8. degenerate sizes, odd data
def test_a_last_batch_of_one_trains(in_tmp: Path) -> None:
    # 1437 training digits = 4 x 359 + 1: the last example joins the batch before it.
    code, err = penrun(
        ["task=train_teacher", "trainer.max_epochs=1", "trainer.batch_size=4", "trainer.progress=false"]
    )
    assert code == 0, err


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    base = {
        "x_train": rng.integers(0, 255, (40, 8, 8), dtype=np.uint8),
        "y_train": np.arange(40) % 4,
        "x_test": rng.integers(0, 255, (12, 8, 8), dtype=np.uint8),
        "y_test": np.arange(12) % 4,
    }
    np.savez(path, **{**base, **arrays})
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.limit_train=1"], "the training set has 1 example(s): training needs at least 2"),
        (["data.limit_train=0"], "data.limit_train=0 is invalid: use an integer >= 1"),
        (["data.limit_train=-5"], "data.limit_train=-5 is invalid: use an integer >= 1"),
        (["trainer.lr=inf"], "trainer.lr=inf is invalid: use a finite number"),
        (
            ["+trainer.max_epoch=3"],
            "trainer.max_epoch is not a key of penrun's config; did you mean trainer.max_epochs?",
        ),
        (["teacher.penultimate_dim=0"], "teacher.penultimate_dim=0 is invalid: use an integer >= 2"),
        (["teacher_ckpt=."], "teacher_ckpt='.' is a folder without checkpoints/last.pt: pass a checkpoint"),
    ],
)
def test_bad_training_input_is_one_line(args: list[str], message: str, in_tmp: Path) -> None:
    task = ["task=fit"] if args[0].startswith("teacher_ckpt") else ["task=train_teacher"]
    assert message in one_line_error(*penrun([*task, *TINY, *args]))
    assert not (in_tmp / "outputs/runs").exists() or not any((in_tmp / "outputs/runs").rglob("*.json"))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y_train": np.r_[np.arange(39) % 4, 99999]}, "labels found: [0, 1, 2, 3, 99999]"),
        (
            {"x_train": np.zeros((0, 8, 8), np.uint8), "y_train": np.zeros(0, np.int64)},
            "the train split is empty",
        ),
        (
            {"x_test": np.zeros((0, 8, 8), np.uint8), "y_test": np.zeros(0, np.int64)},
            "the test split is empty",
        ),
        (
            {"x_train": np.zeros((40, 1, 1), np.uint8), "x_test": np.zeros((12, 1, 1), np.uint8)},
            "images are 1x1",
        ),
    ],
)
def test_odd_npz_data_is_refused(arrays: dict, message: str, in_tmp: Path) -> None:
    path = write_npz(in_tmp / "odd.npz", **arrays)
    args = ["task=train_teacher", "data=npz", f"data.path={path}", *TINY]
    assert message in one_line_error(*penrun(args))


def test_a_text_file_is_not_called_pickled_data(in_tmp: Path) -> None:
    (in_tmp / "notes.npz").write_text("x_train,y_train\n1,2\n")
    args = ["task=train_teacher", "data=npz", f"data.path={in_tmp / 'notes.npz'}", *TINY]
    line = one_line_error(*penrun(args))
    assert "is not an .npz file (a zip archive of .npy arrays" in line and "pickled" not in line


# ---------------------------------------------------------------- 6. non-finite numbers
@pytest.mark.parametrize(
    "arg", ["distill.tau=inf", "distill.losses.kd=inf", "vmf.kappa_scale=nan", "distill.dirichlet_beta=0"]
)
def test_non_finite_or_out_of_range_distill_settings_are_refused(arg: str) -> None:
    assert arg.split("=")[0] in one_line_error(*penrun([arg, *TINY]))


def test_vmf_kappa_scale_must_be_a_number() -> None:
    line = one_line_error(*penrun(["vmf.kappa_scale=big", *TINY]))
    assert "vmf.kappa_scale='big' is invalid" in line


def test_a_diverging_loss_stops_at_its_epoch_and_step() -> None:
    watch = NonFiniteWatch()
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0]):
        watch.update(torch.tensor(value), step)
    with pytest.raises(TrainingDiverged, match="became NaN or infinite at epoch 7, step 3"):
        watch.check(7)
    finite = NonFiniteWatch()
    finite.update(torch.tensor(1.0), 0)
    finite.check(1)


def test_a_diverged_run_says_so_in_its_status(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import penrun.train.classifier as classifier

    monkeypatch.setattr(classifier.F, "cross_entropy", lambda logits, y: logits.sum() * float("nan"))
    code, err = penrun(["task=train_teacher", *TINY])
    assert code == 1 and "penrun: error: the training loss became NaN or infinite at epoch 1, step 1" in err
    (run,) = (in_tmp / "outputs/runs/train_teacher").iterdir()
    assert json.loads((run / "metrics.json").read_text())["status"] == "diverged"


# ---------------------------------------------------------------- 7. damaged files, read-only, full disk
@pytest.mark.parametrize("damage", ["no modules", "other network"])
def test_a_hand_edited_checkpoint_is_one_line(damage: str, in_tmp: Path) -> None:
    assert penrun(["task=train_teacher", *TINY])[0] == 0
    (last,) = in_tmp.glob("outputs/runs/train_teacher/*/checkpoints/last.pt")
    ckpt = torch.load(last, weights_only=True)
    if damage == "no modules":
        del ckpt["modules"]
    else:
        ckpt["classifier"]["penultimate_dim"] += 16
    torch.save(ckpt, in_tmp / "edited.pt")
    line = one_line_error(*penrun(["task=fit", f"teacher_ckpt={in_tmp / 'edited.pt'}", *TINY]))
    assert "is damaged: its classifier cannot be rebuilt from it" in line


def test_a_finished_run_is_reused_from_a_read_only_folder(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["task=train_teacher", *TINY]
    assert penrun(args)[0] == 0

    def read_only(path: Path, wait: bool) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("penrun.train.run_folder.exclusive_lock", read_only)
    assert penrun(args)[0] == 0  # reused: nothing to write
    line = one_line_error(*penrun([*args, "seed=3"]))
    assert "cannot be written to (read-only?)" in line


def test_a_read_only_sweep_folder_is_reported_elsewhere(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert penrun(["-m", "task=train_teacher", "seed=0,1", *TINY])[0] == 0
    sweep = in_tmp / "outputs/multirun/train_teacher/data.limit_train=200,seed=0,1,trainer.max_epochs=1"
    real_write = files.atomic_write

    def read_only_sweep(path: Path, write) -> None:
        if sweep in path.parents:
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        real_write(path, write)

    monkeypatch.setattr("penrun.app.tasks.report.atomic_write", read_only_sweep)
    code, _ = penrun(["task=report", f"sweep_dir='{sweep}'", "trainer.progress=false"])
    assert code == 0 and not (sweep / "report.md").exists()
    (report,) = (in_tmp / "outputs/runs/report").glob("*/report.md")
    assert "2 complete runs" in report.read_text()


def test_a_full_disk_is_one_line_and_keeps_the_files(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: Path, write) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("penrun.train.loop.save_torch", lambda path, obj: full(path, None))
    code, err = penrun(["task=train_teacher", *TINY])
    assert code == 1 and "Traceback" not in err
    assert (
        err.startswith("penrun: error: no space left on device writing")
        and len(err.strip().splitlines()) == 1
    )


# ---------------------------------------------------------------- 9. atomic writes
def test_atomic_writes_are_flushed_and_orphans_removed(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    files.save_json(in_tmp / "a.json", {"x": 1})
    assert len(synced) == 2  # the file, then the folder that holds the rename
    args = ["task=train_teacher", *TINY]
    assert penrun(args)[0] == 0
    (run,) = (in_tmp / "outputs/runs/train_teacher").iterdir()
    orphans = [run / ".metrics.json.a1b2.tmp", run / "checkpoints" / ".last.pt.x1y2.tmp"]
    for orphan in orphans:  # what a kill during an atomic write leaves
        orphan.write_bytes(b"half a file")
    assert penrun(args)[0] == 0  # the folder is opened again (and reused)
    assert not any(orphan.exists() for orphan in orphans)


# ---------------------------------------------------------------- resume restores every random state
# Kill points: 200 images in batches of 64 make 4 steps a epoch (the GAN drops the last
# partial batch and steps twice per batch: 6); the teacher and the evaluator train 4 steps
# each first. Each kill falls in the second epoch, after last.pt of the first was written.
# The Adam step to kill at, counted from the process start: the teacher's and evaluator's epoch
# (200 images less 20 held out for validation: 3 steps of 64), the first epoch of the task (vae:
# 3 steps, drop_last; gan: 3 batches of 2 steps; distill: 200 transfer images less 10 per class
# held out, 2 steps), then into the second.
RESUMED = {
    "vae": (["task=vae", *GENERATION, "trainer.max_epochs=2"], 3 + 3 + 3 + 2),
    "gan": (["task=gan", *GENERATION, "trainer.max_epochs=2"], 3 + 3 + 6 + 2),
    "ce_dirichlet": ([*CACHED["distill"], "trainer.max_epochs=2"], 3 + 2 + 1),
}


@pytest.mark.parametrize(
    "name",
    ["ce_dirichlet", "vae", pytest.param("gan", marks=pytest.mark.slow)],  # gan: as vae, slower
)
def test_a_run_killed_in_its_second_epoch_resumes_bit_identically(name: str, in_tmp: Path) -> None:
    """These tasks draw from the global random state while training (the VAE's and GAN's
    noise, the Dirichlet targets): fails if resume does not restore it."""
    args, kill_at = RESUMED[name]
    script = in_tmp / "kill.py"
    script.write_text(killer_script(args, kill_at=kill_at))
    (in_tmp / "killed").mkdir()
    killed = subprocess.run(
        [sys.executable, str(script)], cwd=in_tmp / "killed", capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (run,) = (in_tmp / "killed/outputs/runs").glob("*/*")
    assert json.loads((run / "metrics.json").read_text())["status"] == "running"
    assert run_main(args, in_tmp / "killed").returncode == 0
    (in_tmp / "whole").mkdir()
    assert run_main(args, in_tmp / "whole").returncode == 0
    (whole,) = (in_tmp / "whole/outputs/runs").glob("*/*")
    assert metrics_of(run) == metrics_of(whole)


def test_ctrl_c_says_where_it_stopped_and_the_same_command_resumes(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the second epoch: one line (no traceback) with exit status 130; the same
    command then resumes from the first epoch's checkpoint and finishes."""
    from penrun.app.tasks import distill

    args = [*CACHED["distill"], "trainer.max_epochs=3"]
    optimize_epoch = distill.optimize_epoch

    def interrupted_in_epoch_2(*a, **kw):
        if a[-1] == 2:  # optimize_epoch(batches, steps, optimizer, step, settings, epoch)
            raise KeyboardInterrupt
        return optimize_epoch(*a, **kw)

    monkeypatch.setattr(distill, "optimize_epoch", interrupted_in_epoch_2)
    stopped = run_main(args, in_tmp)
    assert stopped.returncode == 130
    assert stopped.stderr == (
        "penrun: error: interrupted in epoch 2 of 3 (1 saved); run the same command to resume\n"
    )
    monkeypatch.setattr(distill, "optimize_epoch", optimize_epoch)
    resumed = run_main(args, in_tmp)
    assert resumed.returncode == 0 and "from epoch 1" in resumed.stdout
    (run,) = (in_tmp / "outputs/runs").glob("*/*")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "complete" and [row["epoch"] for row in metrics["history"]] == [1, 2, 3]
