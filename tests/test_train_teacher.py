"""task=train_teacher end to end: run folder, reuse, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from penrun.app.errors import ConfigError
from penrun.data import load_dataset
from penrun.errors import InputError
from penrun.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, load_classifier
from penrun.train.files import exclusive_lock

from conftest import run_main, run_task

DIGITS = ["task=train_teacher", "trainer.max_epochs=4"]


@dataclass
class Commands:
    """The module's `penrun` commands (run in this process) and what they left."""

    digits: Path  # a finished train_teacher run on digits
    reused: Path  # a copy of it, launched again with the same config
    reused_mtime: int  # its last.pt's mtime before that
    other: Path  # a copy of it, launched again with another config
    busy: Path  # a folder whose lock this process held while a command was launched into it
    results: dict[str, subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> Commands:
    root = tmp_path_factory.mktemp("commands")
    digits, busy = root / "digits", root / "busy"
    held = exclusive_lock(busy / ".lock", wait=False)  # as a running penrun holds it
    try:
        results = {
            "digits": run_main([*DIGITS, f"hydra.run.dir={digits}"], root),
            "bad value": run_main(
                ["task=train_teacher", "trainer.batch_size=-4", f"hydra.run.dir={root / 'bad'}"], root
            ),
            "busy": run_main([*DIGITS, f"hydra.run.dir={busy}"], root),
        }
    finally:
        held.close()
    assert results["digits"].returncode == 0, results["digits"].stderr
    reused, other = root / "reused", root / "other"
    shutil.copytree(digits, reused)
    shutil.copytree(digits, other)
    reused_mtime = (reused / "checkpoints" / "last.pt").stat().st_mtime_ns
    results |= {
        "reused": run_main([*DIGITS, f"hydra.run.dir={reused}"], reused),
        "other": run_main(["task=train_teacher", "trainer.max_epochs=5", f"hydra.run.dir={other}"], other),
    }
    return Commands(digits, reused, reused_mtime, other, busy, results)


@pytest.fixture(scope="module")
def digits_run(commands: Commands) -> Path:
    return commands.digits


def test_run_folder_is_complete(digits_run: Path) -> None:
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["task"] == "train_teacher" and metrics["status"] == "complete"
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3, 4]
    # Epochs are scored on a tenth of the training split held out (143 of digits' 1437); the
    # test split is evaluated once, at the end.
    assert all(
        row.keys() >= {"train_loss", "val_acc"} and "test_acc" not in row for row in metrics["history"]
    )
    val = [row["val_acc"] for row in metrics["history"]]
    assert metrics["selected_epoch"] == val.index(max(val)) + 1 and metrics["val_size"] == 143
    assert metrics["test_acc"] > 0.9
    # test_acc is last.pt's (the weights later tasks load), whichever epoch validation chose.
    model, _ = load_classifier(digits_run / "checkpoints" / "last.pt")
    test = load_dataset("digits")
    correct = (model(test.x_test.float() / 127.5 - 1).argmax(1) == test.y_test).float().mean().item()
    assert metrics["test_acc"] == pytest.approx(correct, abs=1e-6)
    assert (digits_run / ".hydra" / "config.yaml").exists()
    assert list((digits_run / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(digits_run / "checkpoints" / name)
        assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["config"]["teacher"]["arch"] == "mlp"
        assert {"python", "numpy", "torch"} <= ckpt["rng"][0]["global"].keys() and "optimizer" in ckpt[
            "optimizers"
        ]
        stats = ckpt["activation_stats"]
        assert stats["norm_quantiles"].shape == (10, 101) and stats["count"].sum() == 1437 - 143
        assert (stats["norm_mean"] > 0).all() and (stats["fitted_kappa"] > 0).all()
    assert load_checkpoint(digits_run / "checkpoints" / "last.pt")["epoch"] == 4


def test_finished_run_is_reused_not_retrained(commands: Commands) -> None:
    proc = commands.results["reused"]
    assert proc.returncode == 0, proc.stderr
    last = commands.reused / "checkpoints" / "last.pt"
    assert "reusing its results" in proc.stdout and last.stat().st_mtime_ns == commands.reused_mtime


def test_a_different_config_in_the_same_folder_is_refused(commands: Commands) -> None:
    proc = commands.results["other"]
    assert proc.returncode == 2
    assert "holds a run of a different config" in proc.stderr and "trainer.max_epochs: 4 -> 5" in proc.stderr


def test_mnist_lenet5_from_the_offline_folder(tmp_path: Path, data_dir: Path) -> None:
    metrics = run_task(
        [
            "task=train_teacher",
            "data=mnist",
            "net@teacher=lenet5",
            "trainer.max_epochs=2",
            "data.limit_train=3000",
            "data.limit_test=1000",
        ],
        tmp_path,
        data_dir,
    )
    assert metrics["test_acc"] > 0.85  # 3000 images, two epochs: far above chance (0.1)
    assert "mnist.npz" in metrics["data"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.batch_size=0", r"^trainer.batch_size=0 is invalid: use an integer >= 2"),
        ("trainer.lr=-0.1", r"^trainer.lr=-0.1 is invalid: use a number > 0"),
        ("trainer.lr=nan", r"^trainer.lr=nan is invalid: use a finite number$"),
        ("trainer.device=tpu", r"^trainer.device='tpu' is invalid; valid: auto, cpu, cuda, cuda:N$"),
        ("trainer.optimizer=lbfgs", r"^trainer.optimizer='lbfgs' is invalid; valid: adam, adamw, sgd$"),
        ("trainer.precision=16", r"^trainer.precision='16' is invalid; valid: 32, bf16$"),
        ("trainer.max_epochs=0", r"^trainer.max_epochs=0 is invalid: use an integer >= 1"),
        ("teacher.head=arcface", r"^teacher.head='arcface' is invalid; valid: cosine, linear$"),
        ("teacher.penultimate_dim=1", r"^teacher.penultimate_dim=1 is invalid: use an integer >= 2"),
        (
            "net@teacher=lenet5",
            r"^teacher.arch='lenet5' needs images of at least 16x16, got data.image_size=8; "
            r"resize the images \(e.g. to 28\) or use teacher.arch='mlp'$",
        ),
    ],
)
def test_bad_values_stop_before_training(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_task(["task=train_teacher", override], tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_bad_value_from_the_command_line_is_a_clean_error(commands: Commands) -> None:
    proc = commands.results["bad value"]
    assert proc.returncode == 2 and "trainer.batch_size=-4 is invalid" in proc.stderr
    assert "Traceback" not in proc.stderr


# test_corrupt_and_foreign_checkpoints_are_refused moved to test_train.py (load_checkpoint).


def test_corrupt_last_checkpoint_in_a_run_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match=r"last\.pt' is corrupt or unreadable"):
        run_task(DIGITS, tmp_path)


def test_a_run_folder_in_use_by_another_process_is_refused(commands: Commands) -> None:
    folder, proc = commands.busy, commands.results["busy"]
    assert proc.returncode == 2
    assert f"run folder {folder} is in use by another penrun process" in proc.stderr
    assert not (folder / "checkpoints").exists()
    # Free again once the other process lets go (in this process: the same claim of the folder).
    assert run_task([*DIGITS, "trainer.max_epochs=1"], folder)["task"] == "train_teacher"
    assert json.loads((folder / "metrics.json").read_text())["status"] == "complete"
