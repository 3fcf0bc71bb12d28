"""task=train_teacher end to end: run folder, reuse, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from penrun.engine import CHECKPOINT_FORMAT, load_checkpoint
from penrun.errors import ConfigError

from conftest import run_cli, run_task

DIGITS = ["task=train_teacher", "trainer.max_epochs=4"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    run_cli([*DIGITS, f"hydra.run.dir={out}"], cwd=out)
    return out


def test_run_folder_is_complete(digits_run: Path) -> None:
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["task"] == "train_teacher" and metrics["status"] == "complete"
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3, 4]
    assert {"train_loss", "test_acc"} <= metrics["history"][0].keys()
    assert metrics["test_acc"] > 0.9 and metrics["best_test_acc"] >= metrics["test_acc"]
    assert (digits_run / ".hydra" / "config.yaml").exists()
    assert list((digits_run / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(digits_run / "checkpoints" / name)
        assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["config"]["teacher"]["arch"] == "mlp"
        assert {"python", "numpy", "torch"} <= ckpt["rng"][0]["global"].keys() and "optimizer" in ckpt[
            "optimizers"
        ]
        stats = ckpt["activation_stats"]
        assert stats["norm_quantiles"].shape == (10, 101) and stats["count"].sum() == 1437
        assert (stats["norm_mean"] > 0).all() and (stats["fitted_kappa"] > 0).all()
    assert load_checkpoint(digits_run / "checkpoints" / "last.pt")["epoch"] == 4


def test_finished_run_is_reused_not_retrained(digits_run: Path) -> None:
    last = digits_run / "checkpoints" / "last.pt"
    before = last.stat().st_mtime_ns
    proc = run_cli([*DIGITS, f"hydra.run.dir={digits_run}"], cwd=digits_run)
    assert "reusing its results" in proc.stdout and last.stat().st_mtime_ns == before


def test_a_different_config_in_the_same_folder_is_refused(digits_run: Path) -> None:
    proc = run_cli(
        ["task=train_teacher", "trainer.max_epochs=5", f"hydra.run.dir={digits_run}"],
        cwd=digits_run,
        check=False,
    )
    assert proc.returncode == 2
    assert "holds a run of a different config" in proc.stderr and "trainer.max_epochs: 4 -> 5" in proc.stderr


def test_mnist_lenet5_from_the_offline_folder(tmp_path: Path, data_dir: Path) -> None:
    metrics = run_task(
        [
            "task=train_teacher",
            "data=mnist",
            "teacher=lenet5",
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
        ("trainer.batch_size=0", r"trainer.batch_size=0 is invalid: use an integer >= 1"),
        ("trainer.lr=-0.1", r"trainer.lr=-0.1 is invalid: use a number > 0"),
        ("trainer.device=tpu", r"trainer.device='tpu' is invalid; valid: auto, cpu, cuda"),
        (
            "trainer.optimizer=lbfgs",
            r"trainer.optimizer='lbfgs' is invalid; valid: \['adam', 'adamw', 'sgd'\]",
        ),
        ("trainer.max_epochs=0", r"trainer.max_epochs=0 is invalid"),
        ("teacher.head=arcface", r"unknown head 'arcface'; valid: \['cosine', 'linear'\]"),
        ("teacher.penultimate_dim=1", r"penultimate_dim=1 is invalid: it must be >= 2"),
        ("teacher=lenet5", r"lenet5 needs images of at least 16x16, got 8x8; set data.image_size"),
    ],
)
def test_bad_values_stop_before_training(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_task(["task=train_teacher", override], tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_bad_value_from_the_command_line_is_a_clean_error(tmp_path: Path) -> None:
    proc = run_cli(
        ["task=train_teacher", "trainer.batch_size=-4", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "trainer.batch_size=-4 is invalid" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"corrupt\.pt' is corrupt or unreadable"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ConfigError, match=r"foreign\.pt' is not a penrun checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_corrupt_last_checkpoint_in_a_run_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(ConfigError, match=r"last\.pt' is corrupt or unreadable"):
        run_task(DIGITS, tmp_path)


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path: Path) -> None:
    from penrun.engine import exclusive_lock

    folder = tmp_path / "busy"
    with exclusive_lock(folder / ".lock", wait=False):  # as a running penrun holds it
        proc = run_cli([*DIGITS, f"hydra.run.dir={folder}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert f"run folder {folder} is in use by another penrun process" in proc.stderr
    assert not (folder / "checkpoints").exists()
    run_cli([*DIGITS, "trainer.max_epochs=1", f"hydra.run.dir={folder}"], cwd=tmp_path)  # free again
