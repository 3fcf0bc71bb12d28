"""One run on two CPU processes (torchrun, gloo) against one process; resume under DDP; errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from penrun.app.errors import ConfigError
from penrun.errors import InputError
from penrun.train import distributed
from penrun.train.checkpoint import load_checkpoint

from conftest import QUICK, finish, history_without_times, killer_script, start_python

# 1024 digits (16 global batches of 64, none partial) so that 1 and 2 processes see the same
# batches; one thread per process on the 2-core machine.
ARGS = [
    "task=train_teacher",
    "trainer.max_epochs=3",
    "data.limit_train=1024",
    "seed=5",
    *QUICK,
    "trainer.num_threads=1",
    "trainer.device=cpu",  # gloo on the CPU, also on a machine with one GPU
]
STEPS_PER_EPOCH = 16


def start_torchrun(target: list[str], cwd: Path) -> subprocess.Popen:
    return start_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target],
        cwd=cwd,
        env={"OMP_NUM_THREADS": "1"},
    )


def torchrun(target: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return finish(start_torchrun(target, cwd), check)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run on two processes and the same run on one, at the same time (three
    single-threaded processes on the two cores)."""
    root = tmp_path_factory.mktemp("ddp")
    one = start_python(["-m", "penrun", *ARGS, f"hydra.run.dir={root / 'one'}"], cwd=root)
    torchrun(["-m", "penrun", *ARGS, f"hydra.run.dir={root / 'two'}"], cwd=root)
    finish(one)
    return {"one": root / "one", "two": root / "two"}


@pytest.fixture(scope="module")
def two_process_run(runs: dict[str, Path]) -> Path:
    return runs["two"]


def test_two_processes_match_one_process(runs: dict[str, Path]) -> None:
    single, double = history_without_times(runs["one"]), history_without_times(runs["two"])
    # Same global batches and averaged gradients; batch norm normalizes each rank's half of a
    # batch on the CPU (SyncBatchNorm needs a GPU), and two ranks drop the last partial batch, so
    # the runs differ slightly: measured 0.006 in accuracy and 0.066 in the first epoch's mean
    # loss at most.
    for a, b in zip(single, double, strict=True):
        assert abs(a["val_acc"] - b["val_acc"]) <= 0.03, (a, b)
        assert abs(a["train_loss"] - b["train_loss"]) <= 0.1, (a, b)
    assert double[-1]["val_acc"] > 0.9


def test_only_rank_zero_writes(two_process_run: Path) -> None:
    assert len(list((two_process_run / "tensorboard").iterdir())) == 1
    assert not list(two_process_run.rglob("*.tmp"))
    assert sorted(p.name for p in (two_process_run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_killed_two_process_run_resumes_to_the_same_result(two_process_run: Path, tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    args = [*ARGS, f"hydra.run.dir={killed}"]
    script = tmp_path / "killer.py"
    script.write_text(killer_script(args, kill_at=STEPS_PER_EPOCH * 2 + 5))
    proc = torchrun([str(script)], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"] == 2

    resumed = torchrun(["-m", "penrun", *args], cwd=tmp_path)
    assert "from epoch 2" in resumed.stdout + resumed.stderr  # logged: Hydra's console and penrun.log
    assert history_without_times(killed) == history_without_times(two_process_run)
    ref = load_checkpoint(two_process_run / "checkpoints" / "last.pt")["modules"]["model"]
    got = load_checkpoint(killed / "checkpoints" / "last.pt")["modules"]["model"]
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match=r"started 4 processes on this node but it has 2 CUDA device"):
        distributed.process_device(torch.device("cuda"), "auto")


def test_a_pinned_gpu_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match=r"^device='cuda:1' pins one GPU, but torchrun started 2 processes"):
        distributed.process_device(torch.device("cuda", 1), "cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.process_device(torch.device("cuda"), "auto") == torch.device("cuda", 1)


def test_a_global_batch_that_does_not_split_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InputError, match=r"^batch_size=64 cannot be split evenly over the 3 torchrun"):
        distributed.check_batch_size(64)


def test_torchrun_errors_name_the_trainer_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app says the same of the keys a user sets, for trainer and teacher_trainer."""
    from penrun.app.config import trainer_settings

    from conftest import compose_config

    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = compose_config(["trainer.device=cpu"])
    with pytest.raises(
        ConfigError, match=r"^trainer.batch_size=64 cannot be split evenly over the 3 torchrun"
    ):
        trainer_settings(cfg)
    cfg = compose_config(["teacher_trainer.batch_size=32", "teacher_trainer.device=cpu"])
    with pytest.raises(
        ConfigError, match=r"^teacher_trainer.batch_size=32 cannot be split evenly over the 3 torchrun"
    ):
        trainer_settings(cfg, "teacher_trainer")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = compose_config(["trainer.device=cuda:1"])
    with pytest.raises(ConfigError, match=r"^trainer.device='cuda:1' pins one GPU, but torchrun started 2"):
        trainer_settings(cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    "task",
    [
        # a loss that leaves the student's body without gradient
        ["task=distill", "method=synthetic_head"],
        ["task=vae", "evaluator_trainer.max_epochs=1", "evaluator_trainer.device=cpu"],
        # two networks, two optimizers and three discriminator passes per step
        ["task=gan", "gan.consistency=1", "evaluator_trainer.max_epochs=1", "evaluator_trainer.device=cpu"],
    ],
)
def test_every_training_task_runs_on_two_processes(task: list[str], tmp_path: Path) -> None:
    quick = [
        "trainer.max_epochs=1",
        "teacher_trainer.max_epochs=1",
        *QUICK,
        "trainer.num_threads=1",
        *[f"{node}.device=cpu" for node in ("trainer", "teacher_trainer")],
    ]
    torchrun(["-m", "penrun", *task, *quick, "hydra.run.dir=run"], cwd=tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and len(metrics["history"]) == 1


def _two_rank_worker(rank: int, init_file: str, out: str) -> None:
    """One of two gloo processes: the epoch-loss average and the synthetic seed of its rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mean = distributed.mean_over_ranks(torch.tensor([1.0 + 2 * rank, 10.0 * rank]))
        torch.save({"mean": mean, "seed": distributed.rank_seed(7)}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_average_their_losses_and_draw_from_their_own_seeds(tmp_path: Path) -> None:
    """Epoch losses are averaged over ranks (rank 0 logs 1 and 0, rank 1 logs 3 and 10: every
    rank then holds 2 and 5); rank 0 keeps the run's seed (it draws as one process would), the
    other rank gets another."""
    torch.multiprocessing.spawn(
        _two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    for result in results:
        assert result["mean"].tolist() == [2.0, 5.0]
    assert results[0]["seed"] == 7 and results[1]["seed"] not in (7, results[0]["seed"])
    assert distributed.rank_seed(7) == 7  # one process
