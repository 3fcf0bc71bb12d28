"""train/loop.py on hand-made inputs: batches on a device, one epoch's row, the epoch loop's
checkpoints and resume, divergence and Ctrl-C, the progress bar and the epoch's log line.
Numbers are worked out by hand (or by numpy / statistics), never by the loop's own formulas."""

from __future__ import annotations

import io
import logging
import math
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from penrun.data import epoch_batches
from penrun.data.folder import FolderImages
from penrun.errors import InputError
from penrun.train import distributed, loop
from penrun.train.checkpoint import load_checkpoint
from penrun.train.loop import (
    Interrupted,
    NonFiniteWatch,
    TrainerSettings,
    TrainingDiverged,
    descend,
    describe_epoch,
    device_batches,
    eager_step,
    epoch_means,
    network_input,
    progress,
    run_epoch,
    stability,
    train_epochs,
    train_steps,
)
from penrun.train.run_folder import RunFolder, read_json

CPU = torch.device("cpu")


def settings(max_epochs: int = 1, progress: bool = False) -> TrainerSettings:
    return TrainerSettings(
        max_epochs=max_epochs,
        batch_size=2,
        eval_batch_size=2,
        lr=1.0,
        optimizer="sgd",
        weight_decay=0.0,
        schedule="constant",
        device=CPU,
        num_threads=None,
        progress=progress,
    )


class TerminalStderr(io.StringIO):
    """stderr as a terminal: tqdm's bar is shown."""

    def isatty(self) -> bool:
        return True


def as_ranks(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "is_distributed", lambda: world > 1)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "is_main", lambda: rank == 0)


# ---------------------------------------------------------------- batches on a device
def test_train_steps_counts_batches_and_refuses_fewer_than_two_examples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert train_steps(11, 3) == 4 and train_steps(11, 3, drop_last=True) == 3 and train_steps(2, 5) == 1
    assert train_steps(10, 3) == 3  # a last batch of one joins the one before
    with pytest.raises(InputError, match=r"^the training set has 1 example\(s\): training needs at least 2$"):
        train_steps(1, 3)
    with pytest.raises(InputError, match="has 0 example"):
        train_steps(0, 3)
    as_ranks(monkeypatch, 0, 2)  # under torchrun the last partial batch is dropped
    assert train_steps(11, 3) == 3


def test_network_input_normalizes_uint8_and_passes_float_and_folders_through() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert network_input(x, CPU).tolist() == pytest.approx([-1.0, 51 / 127.5 - 1, 1.0])
    floats = torch.tensor([[0.25, 3.0]])
    assert network_input(floats, CPU).tolist() == [[0.25, 3.0]]
    folder = FolderImages(files=("a.png",), size=4, channels=1)
    assert network_input(folder, CPU) is folder


def images_and_labels(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value 2 i; its label is i."""
    x = (2 * torch.arange(n, dtype=torch.uint8)).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return x, torch.arange(n)


def labels_of_images(images: torch.Tensor) -> list[int]:
    """Back from normalized images to the labels they were made with (value 2 i)."""
    return [round((float(v) + 1) * 127.5 / 2) for v in images[:, 0, 0, 0]]


def test_device_batches_in_order_join_a_last_batch_of_one_and_drop_a_partial_one() -> None:
    x, y = images_and_labels(7)
    batches = list(device_batches(x, y, 3, CPU, shuffle=False, seed=0, epoch=1))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5, 6]]
    assert all(labels_of_images(xb) == yb.tolist() for xb, yb in batches)
    assert all(xb.dtype == torch.float32 for xb, _ in batches)
    dropped = list(device_batches(x, y, 3, CPU, shuffle=False, seed=0, epoch=1, drop_last=True))
    assert [b[1].tolist() for b in dropped] == [[0, 1, 2], [3, 4, 5]]


def test_shuffled_device_batches_follow_the_seed_and_the_epoch() -> None:
    """The order is epoch_batches' for (seed, epoch), each image with its own label."""
    x, y = images_and_labels(12)

    def order(seed: int, epoch: int) -> list[int]:
        batches = list(device_batches(x, y, 5, CPU, shuffle=True, seed=seed, epoch=epoch))
        assert all(labels_of_images(xb) == yb.tolist() for xb, yb in batches)
        return [label for _, yb in batches for label in yb.tolist()]

    expected = torch.cat(list(epoch_batches(12, 5, shuffle=True, seed=3, epoch=2))).tolist()
    assert order(3, 2) == expected and sorted(expected) == list(range(12)) and expected != list(range(12))
    assert order(3, 5) != expected and order(4, 2) != expected


def test_each_rank_takes_its_shard_of_full_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = images_and_labels(7)
    as_ranks(monkeypatch, 1, 2)
    batches = list(device_batches(x, y, 3, CPU, shuffle=False, seed=0, epoch=1))
    assert [b[1].tolist() for b in batches] == [[1], [4]]  # strided shards of [0 1 2] [3 4 5]; 6 dropped


# ---------------------------------------------------------------- steps and an epoch's row
def test_eager_step_logs_the_loss_first_and_steps_on_the_loss_alone() -> None:
    w = torch.nn.Parameter(torch.tensor(2.0))
    opt = torch.optim.SGD([w], lr=0.5)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return w * x + y, {"term": torch.tensor(7.0)}

    loss, logs = eager_step(opt, loss_fn, torch.tensor(3.0), torch.tensor(1.0))
    assert loss.item() == 7.0 and list(logs) == ["loss", "term"] and logs["loss"].item() == 7.0
    assert not logs["loss"].requires_grad
    assert w.item() == 2.0 - 0.5 * 3.0  # d(w x + y)/dw = x


def test_descend_drops_the_gradients_of_earlier_steps() -> None:
    """With momentum, a parameter the second loss does not use keeps its value only if its old
    gradient was dropped (set to None: SGD skips it) rather than zeroed (momentum moves it)."""
    a, b = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    descend(opt, a + b)
    assert a.item() == pytest.approx(0.9) and b.item() == pytest.approx(0.9)
    descend(opt, 2 * a)
    assert b.item() == pytest.approx(0.9) and b.grad is None
    assert a.item() == pytest.approx(0.9 - 0.1 * (0.9 * 1 + 2))  # momentum 0.9 x 1, plus the new gradient 2


def test_an_epoch_row_is_the_mean_of_each_log_and_its_wall_time() -> None:
    w = torch.nn.Parameter(torch.tensor(0.0))
    opt = torch.optim.SGD([w], lr=0.1)
    values = iter([(1.0, 10.0), (2.0, 20.0), (6.0, 60.0)])

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, other = next(values)
        return torch.tensor(loss), {"loss": torch.tensor(loss), "other": torch.tensor(other)}

    before = time.perf_counter()
    row = run_epoch([(torch.zeros(()), torch.zeros(()))] * 3, 3, [opt], step, settings(), epoch=1)
    elapsed = time.perf_counter() - before
    assert list(row) == ["train_loss", "train_other", "epoch_time"]
    assert row["train_loss"] == pytest.approx(3.0) and row["train_other"] == pytest.approx(30.0)
    assert 0 <= row["epoch_time"] <= elapsed
    assert opt.param_groups[0]["lr"] == 1.0  # settings.lr times the constant schedule's 1


def test_the_bar_shows_the_first_steps_loss_and_the_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shown (a terminal, rank 0, progress=true), the bar names the epoch and shows the loss of
    every 50th step from the first, to four significant digits."""
    monkeypatch.setattr("sys.stderr", TerminalStderr())
    bars = []

    def keep(*args, **kwargs):
        bars.append(progress(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(loop, "progress", keep)
    losses = iter([1.23456, 2.5, 3.5])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=0.1)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.tensor(next(losses)), {}

    batches = iter([(torch.zeros(()), torch.zeros(()))] * 3)  # no len(): the bar's total is the steps
    run_epoch(batches, 3, [opt], step, settings(4, progress=True), epoch=2)
    (bar,) = bars
    assert bar.desc == "epoch 2/4" and bar.total == 3  # (closed: disabled now)
    assert bar.postfix == "loss=1.235"


def test_progress_is_quiet_unless_enabled_on_a_terminal_on_rank_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", TerminalStderr())
    shown = progress(iter(range(3)), total=3, desc="d", enabled=True)  # a generator: no len()
    assert not shown.disable and shown.leave is False and shown.dynamic_ncols and shown.desc == "d"
    assert shown.total == 3 and list(shown) == [0, 1, 2]
    assert progress(range(3), total=3, desc="d", enabled=False).disable
    as_ranks(monkeypatch, 1, 2)
    assert progress(range(3), total=3, desc="d", enabled=True).disable
    monkeypatch.setattr("sys.stderr", io.StringIO())
    as_ranks(monkeypatch, 0, 1)
    assert progress(range(3), total=3, desc="d", enabled=True).disable


def test_non_finite_watch_finds_the_first_bad_step() -> None:
    watch = NonFiniteWatch()
    watch.check(1)  # nothing seen: nothing to say
    for step, loss in enumerate([1.0, math.nan, math.inf, 2.0]):
        watch.update(torch.tensor(loss), step)
    with pytest.raises(
        TrainingDiverged, match=r"^the training loss became NaN or infinite at epoch 4, step 2;"
    ):
        watch.check(4)
    fine = NonFiniteWatch()
    for step in range(3):
        fine.update(torch.tensor(float(step)), step)
    fine.check(1)


def test_epoch_means_divide_each_sum_by_the_steps() -> None:
    assert epoch_means({}, 3) == {}
    means = epoch_means({"loss": torch.tensor(6.0), "acc": 1.5}, 3)
    assert means == {"train_loss": pytest.approx(2.0), "train_acc": pytest.approx(0.5)}
    assert all(type(v) is float for v in means.values())


# ---------------------------------------------------------------- the epoch loop
VALIDATION = {1: 0.5, 2: 0.7, 3: 0.7, 4: 0.6}  # best at 2; 3 ties it, 4 is worse


class Trainee:
    """A one-weight model trained by SGD with momentum, drawing from the global torch stream and
    its own generator every epoch: a resumed run reproduces the uninterrupted one only if the
    weights, the optimizer's momentum and both random states come back."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(self.model.weight)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.gen = torch.Generator().manual_seed(5)
        self.epochs: list[int] = []

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.epochs.append(epoch)
        noise = torch.rand(()) + torch.rand((), generator=self.gen)
        descend(self.opt, (self.model.weight.sum() - noise) ** 2)
        return {"train_w": self.model.weight.item()}

    def run(self, folder: RunFolder, max_epochs: int) -> list[dict]:
        return train_epochs(
            folder,
            modules={"net": self.model},
            optimizers={"opt": self.opt},
            max_epochs=max_epochs,
            train_epoch=self.train_epoch,
            evaluate=lambda epoch: {"val": VALIDATION[epoch]},
            monitor="val",
            generators={"own": self.gen},
            extra={"note": "kept"},
        )


def quiet_folder(path: Path) -> tuple[RunFolder, list]:
    """A run folder whose TensorBoard scalars are recorded in a list instead."""
    folder, logged = RunFolder(path, {"seed": 0}), []
    folder.log_scalars = lambda row, step: logged.append((dict(row), step))
    return folder, logged


def test_the_epoch_loop_keeps_the_best_and_the_last_epoch_and_resumes_as_if_uninterrupted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(1)
    whole = Trainee()
    straight = whole.run(quiet_folder(tmp_path / "straight")[0], 4)

    torch.manual_seed(1)
    first = Trainee()
    folder, logged = quiet_folder(tmp_path / "resumed")
    with caplog.at_level(logging.INFO, logger="penrun.train.loop"):
        history = first.run(folder, 2)
    assert [row["epoch"] for row in history] == [1, 2] and list(history[0]) == ["epoch", "train_w", "val"]
    assert [step for _, step in logged] == [1, 2] and logged[1][0] == history[1]
    assert f"epoch 1/2: train_w {history[0]['train_w']:.4g}  val 0.5" in caplog.messages
    assert load_checkpoint(folder.best_path)["epoch"] == 2
    metrics = read_json(folder.metrics_path)
    assert metrics["status"] == "running" and metrics["history"] == history

    torch.manual_seed(99)  # the resumed run restores the random states of the file, not these
    second = Trainee()
    folder, _ = quiet_folder(tmp_path / "resumed")
    with caplog.at_level(logging.INFO, logger="penrun.train.loop"):
        resumed = second.run(folder, 4)
    assert second.epochs == [3, 4]
    assert f"resuming {folder.dir} from epoch 2" in caplog.messages
    assert resumed == straight  # weights, momentum, both random streams and the history came back
    assert second.model.weight.item() == whole.model.weight.item()
    best, last = load_checkpoint(folder.best_path), load_checkpoint(folder.last_path)
    assert (
        best["epoch"] == 2 and last["epoch"] == 4 and last["note"] == "kept" and last["config"] == {"seed": 0}
    )
    assert best["history"] == straight[:2] and last["history"] == straight
    assert load_checkpoint(tmp_path / "straight" / "checkpoints" / "best.pt")["epoch"] == 2


def test_a_diverged_epoch_is_recorded_and_a_ctrl_c_names_its_epoch(tmp_path: Path) -> None:
    def diverge(epoch: int) -> dict[str, float]:
        if epoch == 2:
            raise TrainingDiverged(epoch, 7)
        return {"train_loss": 1.0}

    def interrupt(epoch: int) -> dict[str, float]:
        if epoch == 2:
            raise KeyboardInterrupt
        return {"train_loss": 1.0}

    common = dict(modules={}, optimizers={}, max_epochs=3, evaluate=lambda e: {"val": 0.5}, monitor="val")
    folder, _ = quiet_folder(tmp_path / "diverged")
    with pytest.raises(TrainingDiverged) as caught:
        train_epochs(folder, train_epoch=diverge, **common)
    assert str(caught.value) == (
        "the training loss became NaN or infinite at epoch 2, step 7; the run stopped there (a smaller "
        "learning rate, temperature or loss weight usually helps)"
    )
    metrics = read_json(folder.metrics_path)
    assert metrics["status"] == "diverged" and metrics["error"].startswith("the training loss became NaN")
    assert [row["epoch"] for row in metrics["history"]] == [1]
    folder, _ = quiet_folder(tmp_path / "interrupted")
    with pytest.raises(Interrupted, match=r"^in epoch 2 of 3 \(1 saved\)$"):
        train_epochs(folder, train_epoch=interrupt, **common)


# ---------------------------------------------------------------- summaries
def test_stability_is_the_tail_std_and_the_largest_drop() -> None:
    values = [1.0, 3.0, 2.0, 5.0, 4.0, 0.0, 0.5]
    assert stability(values) == {
        "std_last": pytest.approx(statistics.pstdev([2.0, 5.0, 4.0, 0.0, 0.5])),
        "max_drop": 4.0,
    }
    assert stability(values, last=2)["std_last"] == pytest.approx(float(np.std([0.0, 0.5])))
    assert stability([1.0, 2.0, 3.0]) == {"std_last": pytest.approx(math.sqrt(2 / 3)), "max_drop": 0.0}
    assert stability([]) == {"std_last": 0.0, "max_drop": 0.0}


def test_describe_epoch_rounds_the_floats_and_leaves_out_the_rest() -> None:
    row = {"epoch": 3, "train_loss": 0.123456, "steps": 10, "val_acc": 0.5, "note": "x"}
    assert describe_epoch(row, 7) == "epoch 3/7: train_loss 0.1235  val_acc 0.5"
