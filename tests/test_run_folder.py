"""penrun.train.run_folder: each method on a temporary folder, against contents written out by
hand (the training tests reach the run folder only end to end)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from penrun.train import distributed, run_folder
from penrun.train.checkpoint import CHECKPOINT_FORMAT
from penrun.train.run_folder import (
    FolderRefused,
    RunFolder,
    config_difference,
    flatten,
    made_by,
    provenance,
    read_json,
    tensorboard_tag,
)

CONFIG = {"task": {"name": "fit"}, "seed": 0}


def not_main(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to be a rank other than 0 under torchrun."""
    monkeypatch.setattr(distributed, "is_main", lambda: False)


@pytest.mark.mutation
def test_flatten_and_config_difference_by_hand() -> None:
    tree = {"a": {"b": 1, "c": {"d": [2]}}, "e": None}
    assert flatten(tree) == {"a.b": 1, "a.c.d": [2], "e": None}
    assert flatten({}) == {}
    assert config_difference(tree, tree) == []
    old, new = {"a": {"b": 1}, "x": 2}, {"a": {"b": 3}, "y": "s"}
    assert config_difference(old, new) == ["a.b: 1 -> 3", "x: 2 -> '<unset>'", "y: '<unset>' -> 's'"]


@pytest.mark.mutation
def test_read_json_takes_objects_only(tmp_path: Path) -> None:
    cases = {"object": '{"a": 1}', "list": "[1, 2]", "broken": '{"a": ', "empty": ""}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    assert read_json(tmp_path / "object") == {"a": 1}
    for name in ("list", "broken", "empty", "missing"):
        assert read_json(tmp_path / name) is None, name
    assert read_json(tmp_path) is None  # a folder: an OSError, not a crash


@pytest.mark.mutation
def test_a_new_folder_has_nothing_to_reuse_or_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = RunFolder(tmp_path / "run", CONFIG)
    assert folder.metrics_path == tmp_path / "run" / "metrics.json"
    assert folder.last_path == tmp_path / "run" / "checkpoints" / "last.pt"
    assert folder.best_path == tmp_path / "run" / "checkpoints" / "best.pt"
    with caplog.at_level(logging.WARNING):
        assert folder.finished_metrics() is None
        assert folder.load_last() is None
    assert caplog.records == []  # a missing metrics.json is no cause for a warning


@pytest.mark.mutation
def test_metrics_round_trip_and_only_a_complete_run_is_reused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, CONFIG)
    folder.write_metrics({"test_acc": 0.5}, "interrupted")
    stamp = provenance()
    expected = {"test_acc": 0.5, "status": "interrupted", "penrun": stamp, "config": CONFIG}
    assert json.loads(folder.metrics_path.read_text()) == expected
    assert folder.finished_metrics() is None
    folder.write_metrics({"test_acc": 0.75}, "complete")
    done = {"test_acc": 0.75, "status": "complete", "penrun": stamp, "config": CONFIG}
    assert folder.finished_metrics() == done


@pytest.mark.mutation
def test_a_folder_of_another_config_is_refused_naming_five_differences(tmp_path: Path) -> None:
    old = {f"k{i}": i for i in range(7)}
    RunFolder(tmp_path, old).write_metrics({}, "complete")
    folder = RunFolder(tmp_path, {f"k{i}": i + 1 for i in range(7)})
    with pytest.raises(FolderRefused) as refused:
        folder.finished_metrics()
    message = str(refused.value)
    assert "metrics.json differs in k0: 0 -> 1; k1: 1 -> 2; k2: 2 -> 3; k3: 3 -> 4; k4: 4 -> 5)" in message
    assert "k5" not in message
    folder.check_same_config(None, folder.metrics_path)  # a file without a config is not refused


def write_last(folder: RunFolder, config: dict) -> None:
    folder.last_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "epoch": 2}, folder.last_path)


@pytest.mark.mutation
def test_an_unreadable_metrics_file_is_rebuilt_from_last_pt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = RunFolder(tmp_path, CONFIG)
    write_last(folder, CONFIG)
    folder.metrics_path.write_text('{"status": "compl')
    with caplog.at_level(logging.WARNING):
        assert folder.finished_metrics() is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder.metrics_path} is unreadable: rebuilding it from last.pt"
    ]
    assert folder.load_last()["epoch"] == 2
    write_last(folder, {**CONFIG, "seed": 1})
    with pytest.raises(FolderRefused, match=r"last\.pt differs in seed: 1 -> 0\)"):
        folder.finished_metrics()  # last.pt of another run: refused before anything is written


@pytest.mark.mutation
def test_claim_holds_the_folder_until_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = RunFolder(tmp_path, CONFIG), RunFolder(tmp_path, CONFIG)
    assert first.claim() is True
    assert (tmp_path / ".lock").is_file()  # the name the CLI knows when it tidies a folder
    with pytest.raises(FolderRefused) as refused:
        second.claim()
    assert str(refused.value) == (
        f"run folder {tmp_path} is in use by another penrun process; wait for it to end "
        "(launching the same command again then resumes or reuses the run)"
    )
    first.close()
    first.close()  # closing twice is harmless
    assert second.claim() is True
    second.start_log()
    second.close()
    second.close()
    monkeypatch.setattr(
        run_folder, "exclusive_lock", lambda *a, **k: (_ for _ in ()).throw(PermissionError())
    )
    assert RunFolder(tmp_path, CONFIG).claim() is False  # read-only: a finished run is still readable


@pytest.mark.mutation
def test_other_ranks_neither_lock_nor_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_main(monkeypatch)
    folder = RunFolder(tmp_path, CONFIG)
    assert folder.claim() is True
    folder.start_log()
    assert folder.writer.add_scalar("loss", 1.0, 0) is None
    folder.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class RecordingWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple] = []
        self.summaries: list = []
        self.flushes = 0
        self.closed = False

    def add_scalar(self, key: str, value: float, step: int | None = None) -> None:
        self.scalars.append((key, value, step))

    def _get_file_writer(self) -> RecordingWriter:  # what log_hparams writes summaries through
        return self

    def add_summary(self, summary) -> None:
        self.summaries.append(summary)

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


@pytest.mark.mutation
def test_log_scalars_writes_the_numbers_but_the_epoch(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, CONFIG)
    folder._writer = writer = RecordingWriter()
    row = {"epoch": 3, "train_loss": 0.5, "val_acc": 0.75, "source_acc": 0.7, "epoch_time": 2.0, "correct": 7,
           "status": "ok", "history": [1.0]}  # fmt: skip
    folder.log_scalars(row, step=9)
    assert writer.scalars == [
        ("train/loss", 0.5, 9),
        ("val/acc", 0.75, 9),
        ("test/source_acc", 0.7, 9),
        ("time/epoch_time", 2.0, 9),
        ("test/correct", 7, 9),
    ]
    assert writer.flushes == 1
    folder.close()
    assert writer.closed and folder._writer is None


@pytest.mark.mutation
def test_the_writer_writes_tensorboard_events_into_the_folder(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, CONFIG)
    writer = folder.writer
    assert folder.writer is writer
    folder.log_scalars({"loss": 0.5}, step=1)
    folder.close()
    assert [p.name.split(".")[0] for p in (tmp_path / "tensorboard").iterdir()] == ["events"]


@pytest.mark.mutation
def test_start_log_copies_the_log_with_times_until_close(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, CONFIG)
    folder.start_log()
    log = logging.getLogger("penrun.mutants")
    log.warning("kept")
    folder.close()
    log.warning("after close")
    lines = (tmp_path / "penrun.log").read_text().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]\[penrun\.mutants\]\[WARNING\] kept", lines[0]
    )


@pytest.mark.mutation
def test_remove_orphans_takes_the_temporaries_of_atomic_writes_only(tmp_path: Path) -> None:
    orphans = [tmp_path / ".metrics.json.abc.tmp", tmp_path / "checkpoints" / ".last.pt.x1.tmp"]
    kept = [tmp_path / "keep.tmp", tmp_path / ".hidden", tmp_path / "a" / "b" / ".deep.tmp"]
    for path in orphans + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    RunFolder(tmp_path, CONFIG).remove_orphans()
    assert [p.exists() for p in orphans] == [False, False]
    assert [p.exists() for p in kept] == [True, True, True]


@pytest.mark.mutation
def test_ranks_other_than_zero_leave_the_temporaries_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun rank 0 holds the folder and writes its files; a temporary file there may be
    rank 0's write in flight, which another rank must not delete."""
    in_flight = tmp_path / ".config.yaml.abc.tmp"
    in_flight.write_text("being written")
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    RunFolder(tmp_path, CONFIG).remove_orphans()
    assert in_flight.exists()


@pytest.mark.mutation
def test_tensorboard_tags_group_by_what_a_number_measures() -> None:
    assert tensorboard_tag("train_loss") == "train/loss"
    assert tensorboard_tag("val_train_acc") == "val/train_acc"  # the first prefix only
    assert tensorboard_tag("eval_time") == "time/eval_time"
    assert tensorboard_tag("transfer_acc") == "test/transfer_acc"
    assert tensorboard_tag("time_x") == "test/time_x"


@pytest.mark.mutation
def test_made_by_names_the_version_and_the_commit() -> None:
    assert made_by({"penrun": {"version": "0.3.0", "commit": "abc123-dirty"}}) == (
        "made by penrun 0.3.0, commit abc123-dirty"
    )
    assert made_by({"penrun": {"version": "0.3.0", "commit": None}}) == "made by penrun 0.3.0"
    for unstamped in (None, {}, {"penrun": None}, {"penrun": {}}):
        assert made_by(unstamped) == "made by penrun 0.2.0 or older"


@pytest.mark.mutation
def test_move_aside_renames_the_folder_and_deletes_nothing(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run", CONFIG)
    assert folder.move_aside() is None  # nothing there
    (tmp_path / "run").mkdir()
    assert folder.move_aside() is None  # empty
    (tmp_path / "run" / "metrics.json").write_text('{"a": 1}')
    moved = folder.move_aside()
    assert re.fullmatch(r"run\.old-\d{8}-\d{6}", moved.name) and moved.parent == tmp_path
    assert (moved / "metrics.json").read_text() == '{"a": 1}' and not (tmp_path / "run").exists()

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    holder = RunFolder(tmp_path / "run", CONFIG)
    assert holder.claim() is True
    with pytest.raises(FolderRefused, match=r"is in use by another penrun process: .*rerun=true$"):
        folder.move_aside()
    holder.close()
    assert (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.mutation
def test_a_complete_run_gives_the_hparams_tab_its_config_and_final_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = RunFolder(tmp_path, {**CONFIG, "trainer": {"lr": 0.01, "progress": True}})
    folder._writer = writer = RecordingWriter()
    metrics = {"test_acc": 0.9, "ok": True, "nested": {"n": 3}, "history": [{"x": 1}], "name": "kd"}
    folder.write_metrics(metrics, "running")
    assert writer.summaries == [] and writer.scalars == []
    folder.write_metrics(metrics, "complete")
    assert sorted(writer.scalars) == [("final/nested.n", 3, None), ("final/test_acc", 0.9, None)]
    experiment, session_start, _end = (bytes(s.SerializeToString()) for s in writer.summaries)
    for key in (b"task.name", b"seed", b"trainer.lr", b"trainer.progress"):
        assert key in session_start  # the run's config, flattened
    assert b"final/test_acc" in experiment and b"final/ok" not in experiment
    json.loads((tmp_path / "metrics.json").read_text())  # written before TensorBoard
    not_main(monkeypatch)
    folder._writer = other = RecordingWriter()
    folder.write_metrics(metrics, "complete")  # other ranks write metrics.json only
    assert other.summaries == []
