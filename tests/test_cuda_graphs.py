"""trainer.cuda_graphs: classifier steps replayed from a CUDA graph train as eager steps do;
the option is refused, before any work, where it cannot apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from penrun.train.cuda_graphs import capturable
from penrun.train.optim import set_lr

from conftest import run_main, run_task


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["task=distill", "trainer.cuda_graphs=true"],
            "trainer.cuda_graphs=true: task=distill trains eagerly",
        ),
        (
            ["task=train_teacher", "trainer.cuda_graphs=true", "trainer.optimizer=sgd"],
            "trainer.cuda_graphs=true needs trainer.optimizer=adam or adamw, not 'sgd'",
        ),
        (
            ["task=train_teacher", "trainer.cuda_graphs=true", "trainer.precision=bf16"],
            "trainer.cuda_graphs=true captures float32 steps: set trainer.precision=32",
        ),
        (
            ["task=train_teacher", "trainer.cuda_graphs=true", "trainer.device=cpu"],
            "trainer.cuda_graphs=true needs a CUDA device, but trainer.device='cpu' is cpu",
        ),
    ],
)
def test_cuda_graphs_refused_where_it_cannot_apply(args: list[str], message: str, tmp_path: Path) -> None:
    done = run_main(args, tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # refused before any run wrote


def test_capturable_epoch_fills_the_lr_in_place_and_restores_the_plain_form() -> None:
    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    optimizer.state[param]["step"] = torch.tensor(7.0)
    with capturable(optimizer, torch.device("cpu")):
        lr = optimizer.param_groups[0]["lr"]
        assert isinstance(lr, torch.Tensor) and optimizer.param_groups[0]["capturable"]
        set_lr(optimizer, 0.25)
        assert optimizer.param_groups[0]["lr"] is lr  # the tensor a graph reads, filled in place
        assert lr.item() == 0.25
    assert optimizer.param_groups[0]["lr"] == 0.25 and isinstance(optimizer.param_groups[0]["lr"], float)
    assert optimizer.param_groups[0]["capturable"] is False
    assert optimizer.state[param]["step"].item() == 7.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_training_matches_eager_training(tmp_path: Path) -> None:
    """Two epochs on digits (each with a partial last batch, run eagerly) with and without
    graphs, from the same seed: the same curve and accuracies, to float rounding."""
    common = ["task=train_teacher", "trainer.max_epochs=2", "trainer.device=cuda", "trainer.batch_size=50"]
    eager = run_task(common, tmp_path / "eager")
    graphed = run_task([*common, "trainer.cuda_graphs=true"], tmp_path / "graphed")
    for a, b in zip(eager["history"], graphed["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=0.01)
    assert eager["test_acc"] == pytest.approx(graphed["test_acc"], abs=0.01)
    assert graphed["test_acc"] > 0.8
