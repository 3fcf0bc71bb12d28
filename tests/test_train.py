"""The train package on its own: files that survive a kill, locks between processes, checkpoints
that load without running code, the learning-rate schedule, batches, random states and the
allocator."""

from __future__ import annotations

import math
import os
import random
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from penrun.errors import InputError
from penrun.train.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_payload,
    load_checkpoint,
    restore_random_states,
)
from penrun.train.files import atomic_write, exclusive_lock, save_json, save_torch
from penrun.train.loop import (
    TrainerSettings,
    TrainingDiverged,
    descend,
    forward_precision,
    on_device,
    optimize_epoch,
    run_epoch,
)
from penrun.train.optim import OPTIMIZERS, SCHEDULES, build_optimizer, lr_factor
from penrun.train.seeding import rng_state, seed_everything, set_rng_state


# ---------------------------------------------------------------- files
def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.json"
    atomic_write(path, lambda p: p.write_text("old"))
    atomic_write(path, lambda p: p.write_text("new"))
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]
    # The usual mode of a new file (mkstemp would make it 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_torch(path, {"epoch": 1})

    def half_written(tmp: Path) -> None:
        tmp.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # also a kill that Python sees

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_written)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_save_json_writes_tensors_and_numpy_values(tmp_path: Path) -> None:
    save_json(tmp_path / "m.json", {"a": torch.tensor([1.5, 2.0]), "b": np.float32(0.25), "c": np.arange(2)})
    assert (
        tmp_path / "m.json"
    ).read_text() == '{\n  "a": [\n    1.5,\n    2.0\n  ],\n  "b": 0.25,\n  "c": [\n    0,\n    1\n  ]\n}\n'
    with pytest.raises(TypeError, match="cannot write object to JSON"):
        save_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


class OtherProcess:
    """A forked process (penrun is loaded already: no start-up) that tries the lock, writes
    "locked" or "busy" to a pipe and ends (which releases what it took)."""

    def __init__(self, path: Path, wait: bool):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: no pytest, no cleanup, just the lock
            try:
                # Not the parent's open files: a lock is held by an open file, which a fork
                # shares, so the child would hold the parent's lock too.
                os.closerange(3, write)
                os.closerange(write + 1, 1 << 16)
                handle = exclusive_lock(path, wait=wait)
                os.write(write, b"locked" if handle is not None else b"busy")
            finally:
                os._exit(0)
        os.close(write)
        self.read = read

    def answered(self, timeout: float) -> bool:
        return bool(select.select([self.read], [], [], timeout)[0])

    def outcome(self) -> str:
        assert self.answered(60), "the other process did not answer"
        answer = os.read(self.read, 16).decode()
        os.close(self.read)
        os.waitpid(self.pid, 0)
        return answer


def test_exclusive_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "folder" / ".lock"
    held = exclusive_lock(path, wait=False)
    assert held is not None
    try:
        assert OtherProcess(path, wait=False).outcome() == "busy"
        waiting = OtherProcess(path, wait=True)
        assert not waiting.answered(0.5)  # blocked while this process holds the lock
    finally:
        held.close()
    assert waiting.outcome() == "locked"  # and gets it once it is free
    # The lock dies with its process (as after a SIGKILL): free again.
    assert OtherProcess(path, wait=False).outcome() == "locked"
    # In one process, a second handle is a second holder: refused too.
    first = exclusive_lock(path, wait=False)
    assert first is not None and exclusive_lock(path, wait=False) is None
    first.close()


# ---------------------------------------------------------------- checkpoints
class CreatesAFile:
    """A pickle that creates a file when it is unpickled (any code could run there)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": CreatesAFile(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(
        InputError, match=r"^refusing to load checkpoint '.*evil\.pt': it holds objects other than"
    ):
        load_checkpoint(evil)
    assert not marker.exists()
    # Unpickled without weights_only, the same file would have run its code.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_a_folder_or_a_missing_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^checkpoint '.*' is a folder: pass its checkpoints/last\.pt$"):
        load_checkpoint(tmp_path)
    with pytest.raises(InputError, match=r"^checkpoint '.*missing\.pt' does not exist$"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("content", [b"not a checkpoint", b"\x00" * 10], ids=["text", "zeros"])
def test_corrupt_checkpoints_are_refused_as_corrupt(tmp_path: Path, content: bytes) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(content)
    with pytest.raises(InputError, match=r"corrupt\.pt' is corrupt or unreadable"):
        load_checkpoint(corrupt)


def test_empty_foreign_and_missing_checkpoints_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.pt' is corrupt or unreadable"):
        load_checkpoint(empty)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(InputError, match=r"foreign\.pt' is not a penrun checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_payload_loads_with_weights_only(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    opt = build_optimizer("adam", net.parameters(), 1e-3, 0.0)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    generator = torch.Generator().manual_seed(3)
    payload = checkpoint_payload(
        {"seed": 1}, {"model": net}, {"optimizer": opt}, {"synthetic": generator}, 2, [{"epoch": 1}]
    )
    save_torch(tmp_path / "last.pt", payload)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["format"] == CHECKPOINT_FORMAT == "penrun-checkpoint-v2"
    assert (ckpt["epoch"], ckpt["config"], ckpt["history"]) == (2, {"seed": 1}, [{"epoch": 1}])
    assert torch.equal(ckpt["modules"]["model"]["weight"], net.weight)
    numpy_state = ckpt["rng"][0]["global"]["numpy"]
    assert isinstance(numpy_state, dict) and isinstance(numpy_state["keys"], torch.Tensor)
    assert torch.equal(ckpt["rng"][0]["generators"]["synthetic"], generator.get_state())


def test_checkpoints_of_the_previous_format_are_refused_with_what_to_do(tmp_path: Path) -> None:
    """penrun-checkpoint-v1 (NumPy's state as an ndarray, before 2026-11-26 one global state and no
    generators) needs unpickling code: v2 refuses it and says to re-create it. (This replaces the
    test that v1's rng layout still resumed: no v1 file loads any more.)"""
    old = tmp_path / "v1.pt"
    seed_everything(11)
    torch.save(
        {
            "format": "penrun-checkpoint-v1",
            "epoch": 1,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        },
        old,
    )
    with pytest.raises(
        InputError,
        match=r"^refusing to load checkpoint '.*v1\.pt'.*re-create this one with this version of penrun$",
    ):
        load_checkpoint(old)
    tensors_only = tmp_path / "v1_tensors.pt"
    torch.save({"format": "penrun-checkpoint-v1", "epoch": 1}, tensors_only)
    with pytest.raises(
        InputError, match=r"is not a penrun checkpoint \(expected format 'penrun-checkpoint-v2'\)"
    ):
        load_checkpoint(tensors_only)


def test_each_rank_restores_its_own_random_states() -> None:
    """The rng entry holds one state per rank (rank order); a rank beyond them takes rank 0's."""
    generator = torch.Generator().manual_seed(5)
    seed_everything(11)
    states = [{"global": rng_state(), "generators": {"synthetic": generator.get_state()}}]
    expected, expected_gen = torch.rand(3), torch.rand(2, generator=generator)
    seed_everything(12)
    other = torch.Generator().manual_seed(6)
    restore_random_states(states, {"synthetic": other, "unknown": torch.Generator().manual_seed(1)})
    assert torch.equal(torch.rand(3), expected) and torch.equal(torch.rand(2, generator=other), expected_gen)


# ---------------------------------------------------------------- schedule, optimizers, batches
@pytest.mark.parametrize("position", [0.0, 0.25, 0.5, 0.999, 1.0])
def test_cosine_schedule_is_the_closed_form(position: float) -> None:
    assert lr_factor("cosine", position) == pytest.approx(0.5 * (1 + math.cos(math.pi * position)), abs=1e-15)
    assert lr_factor("constant", position) == 1.0


def test_cosine_schedule_at_its_ends() -> None:
    assert lr_factor("cosine", 0.0) == 1.0
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5, abs=1e-15)
    assert lr_factor("cosine", 1.0) == pytest.approx(0.0, abs=1e-15)
    assert SCHEDULES == ("cosine", "constant")


def test_optimizers_and_the_argument_named_error() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    kinds = {name: type(build_optimizer(name, params, 0.1, 0.0)).__name__ for name in OPTIMIZERS}
    assert kinds == {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}
    with pytest.raises(
        ValueError, match=r"^optimizer='lbfgs' is invalid; valid: \['adam', 'adamw', 'sgd'\]$"
    ):
        build_optimizer("lbfgs", params, 0.1, 0.0)


def two_step_settings() -> TrainerSettings:
    """Epoch 2 of 2 in two steps: the cosine schedule at positions 1/2 and 3/4."""
    return TrainerSettings(
        max_epochs=2,
        batch_size=1,
        eval_batch_size=1,
        lr=1.0,
        optimizer="sgd",
        weight_decay=0.0,
        schedule="cosine",
        device=torch.device("cpu"),
        num_threads=None,
        progress=False,
    )


def test_an_epoch_of_two_optimizers_schedules_both_and_averages_their_logs() -> None:
    """Two plain SGD optimizers, each on its own weight w with loss w * input (gradient: the
    input), stepped by one step function as the GAN's D and G are. By hand: the learning rates
    are 0.5 and (1 - 1/sqrt(2)) / 2; a -> -0.5 -> -0.5 - 3 f2, b -> -1 -> -1 - 4 f2. Fails if
    the schedule skips an optimizer, a gradient leaks into the next step, or a log is summed."""
    a, b = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(()))
    opt_a, opt_b = torch.optim.SGD([a], lr=9.0), torch.optim.SGD([b], lr=9.0)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        descend(opt_a, a * x)
        descend(opt_b, b * y)
        return (a + b).detach(), {"a": a.detach().clone(), "b": b.detach().clone()}

    batches = [(torch.tensor(1.0), torch.tensor(2.0)), (torch.tensor(3.0), torch.tensor(4.0))]
    row = run_epoch(batches, 2, [opt_a, opt_b], step, two_step_settings(), epoch=2)
    f2 = (1 - 1 / math.sqrt(2)) / 2
    assert a.item() == pytest.approx(-0.5 - 3 * f2) and b.item() == pytest.approx(-1 - 4 * f2)
    assert row["train_a"] == pytest.approx((-0.5 + (-0.5 - 3 * f2)) / 2)
    assert row["train_b"] == pytest.approx((-1 + (-1 - 4 * f2)) / 2)
    assert set(row) == {"train_a", "train_b", "epoch_time"}


def test_an_epoch_stops_at_the_first_step_whose_watched_loss_is_not_finite() -> None:
    """The step's first output is watched (the GAN's is D's loss plus G's); its logs are not."""
    w = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([w], lr=0.1)
    losses = iter([1.0, math.inf, 2.0])

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.tensor(next(losses)), {"other": torch.tensor(math.nan)}

    batches = [(torch.zeros(()), torch.zeros(()))] * 3
    with pytest.raises(TrainingDiverged, match="at epoch 2, step 2;"):
        run_epoch(batches, 3, [opt], step, two_step_settings(), epoch=2)


def precision_settings(precision: str, channels_last: bool = False) -> TrainerSettings:
    return TrainerSettings(
        max_epochs=1,
        batch_size=8,
        eval_batch_size=8,
        lr=1e-2,
        optimizer="adam",
        weight_decay=0.0,
        schedule="constant",
        device=torch.device("cpu"),
        num_threads=None,
        progress=False,
        precision=precision,
        channels_last=channels_last,
    )


def test_bf16_runs_a_forward_matrix_product_on_bfloat16_operands() -> None:
    """Under "bf16" a linear layer gives what float32 arithmetic on its operands rounded to
    bfloat16 gives, rounded to bfloat16 (autocast); under "32" the float32 product itself."""
    gen = torch.Generator().manual_seed(0)
    x, layer = torch.randn(5, 7, generator=gen), torch.nn.Linear(7, 3, bias=False)
    exact = x @ layer.weight.detach().T
    rounded = (x.bfloat16().float() @ layer.weight.detach().bfloat16().float().T).bfloat16()
    with forward_precision(precision_settings("bf16")):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, rounded, rtol=1e-2, atol=0)  # one bfloat16 rounding apart at most
    assert not torch.equal(out.float(), exact)
    with forward_precision(precision_settings("32")):
        assert torch.equal(layer(x), exact)


def small_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )


def test_precision_32_trains_bit_for_bit_as_a_bare_loop_and_bf16_trains_otherwise() -> None:
    """An epoch of 6 Adam steps on one batch: under "32" the weights equal a plain PyTorch
    loop's, bit for bit; under "bf16" they differ from them while the loss still falls."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    bare = small_convnet()
    optimizer = torch.optim.Adam(bare.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(bare(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained, losses = {}, {}
    for precision in ("32", "bf16"):
        net, losses[precision] = small_convnet(), []
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=0.0)

        def loss_fn(xb: torch.Tensor, yb: torch.Tensor, net=net, seen=losses[precision]) -> tuple:
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            seen.append(loss.item())
            return loss, {}

        optimize_epoch([(x, y)] * 6, 6, optimizer, loss_fn, precision_settings(precision), epoch=1)
        trained[precision] = list(net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(trained["32"], bare.parameters(), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(trained["bf16"], bare.parameters(), strict=True))
    assert all(p.dtype == torch.float32 for p in trained["bf16"])  # the weights stay float32
    assert losses["bf16"][-1] < 0.8 * losses["bf16"][0]


def test_channels_last_puts_conv_weights_in_nhwc_and_keeps_the_outputs() -> None:
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    plain = on_device(small_convnet(), precision_settings("32"))
    nhwc = on_device(small_convnet(), precision_settings("32", channels_last=True))
    assert plain[0].weight.is_contiguous() and not plain[0].weight.is_contiguous(
        memory_format=torch.channels_last
    )
    assert nhwc[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc[3].weight.is_contiguous()  # a linear layer's weights are left as they were
    torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- random states
def draw_all() -> tuple:
    return (
        random.random(),
        np.random.random(3).tolist(),
        np.random.standard_normal(),
        torch.rand(3).tolist(),
    )


def test_random_states_round_trip_for_python_numpy_and_torch() -> None:
    seed_everything(7)
    draw_all()
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    state = rng_state()
    expected = draw_all()
    seed_everything(99)
    assert draw_all() != expected
    set_rng_state(state)
    assert draw_all() == expected
    # A state survives a weights_only round trip through a checkpoint file, as in a resume.
    set_rng_state(state)
    assert {"python", "numpy", "torch"} <= state.keys()
    assert isinstance(state["numpy"]["keys"], torch.Tensor)


def test_random_states_survive_a_checkpoint_file(tmp_path: Path) -> None:
    seed_everything(5)
    save_torch(tmp_path / "state.pt", {"rng": rng_state()})
    expected = draw_all()
    seed_everything(6)
    set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert draw_all() == expected


# ---------------------------------------------------------------- allocator
# 30 training steps of a small convolutional network, after one to warm up, in a fresh process.
TRAINING_STEPS = """
import resource, sys, torch
from penrun.train.devices import keep_freed_memory
made = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 64, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(64, 128, 4, 2, 1),
    torch.nn.Flatten(), torch.nn.Linear(128 * 7 * 7, 10),
)
x = torch.randn(64, 1, 28, 28)
net(x).square().mean().backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    net(x).square().mean().backward()
print(made, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", TRAINING_STEPS, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")


@linux_only
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in_again() -> None:
    """With glibc's defaults each step's activations and gradients are mapped afresh and faulted
    in page by page: 29,780 to 71,928 page faults in 30 steps, measured. Kept, the steps reuse
    the heap: 8 to 792, its one-off growth. Fails if keep_freed_memory sets nothing or reports
    settings it did not make. The three settings overlap here: any one of them left at glibc's
    default still passes (the table's speed measured them together,
    BENCHMARKS.md#same-numbers)."""
    made, kept = page_faults("keep")
    _, default = page_faults("default")
    assert made == "True"
    assert default > 10_000 and kept < default / 10


@linux_only
def test_the_users_own_glibc_settings_win() -> None:
    """MALLOC_TOP_PAD_ in the environment (any of glibc's three) leaves the allocator as the user
    set it: nothing is changed, and the steps fault in tens of thousands of pages (288,259 with
    this one, measured)."""
    made, faults = page_faults("keep", MALLOC_TOP_PAD_="131072")
    assert made == "False" and faults > 10_000
