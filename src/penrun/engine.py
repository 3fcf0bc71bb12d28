"""The training engine: devices, seeds, atomic files, run folders that resume, the epoch loop."""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from penrun import distributed
from penrun.data import epoch_batches, normalize, num_batches
from penrun.errors import ConfigError
from penrun.models import Classifier, build_classifier

CHECKPOINT_FORMAT = "penrun-checkpoint-v1"
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainerSettings:
    """Validated trainer options (tasks build them from the `trainer` config node)."""

    max_epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    schedule: str
    device: torch.device
    num_threads: int | None
    progress: bool


# ---------------------------------------------------------------- devices, seeds, threads
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name!r} but CUDA is not available; use auto or cpu")
        return torch.device(name)
    raise ConfigError(f"trainer.device={name!r} is invalid; valid: auto, cpu, cuda, cuda:N")


def seed_everything(seed: int) -> None:
    """One seed drives Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- atomic files
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: a reader (or a
    resumed run) sees the old file or the new one, never half of one. Under torchrun only
    rank 0 writes: the other ranks hold the same results."""
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exclusive_lock(path: Path, wait: bool) -> IO | None:
    """An exclusive lock on `path` between processes, held while the returned handle is open
    (the system drops it when the process dies, even by SIGKILL); None when another process
    holds it and `wait` is false."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")  # noqa: SIM115 (the caller keeps it open as long as it holds the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


def save_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a penrun checkpoint, refusing files that are corrupt or not penrun's."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt or unreadable: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{str(path)!r} is not a penrun checkpoint (expected format {CHECKPOINT_FORMAT!r}); "
            "pass a checkpoints/last.pt or best.pt written by penrun"
        )
    return ckpt


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """A classifier rebuilt from a penrun checkpoint alone, in eval mode, on the CPU."""
    ckpt = load_checkpoint(path)
    if "classifier" not in ckpt:
        raise ConfigError(
            f"checkpoint {str(path)!r} holds no classifier: pass one written by task=train_teacher or task=distill"
        )
    model = build_classifier(**ckpt["classifier"])
    model.load_state_dict(ckpt["modules"]["model"])
    return model.eval(), ckpt


# ---------------------------------------------------------------- config helpers
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_difference(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    raise ConfigError(f"trainer.optimizer={name!r} is invalid; valid: {list(OPTIMIZERS)}")


def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at `progress` in [0, 1) of training (per step): a function
    of the position alone, so resuming needs no scheduler state."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------- batches on a device
def progress(iterable: Iterable, *, total: int, desc: str, enabled: bool) -> Iterable:
    """A tqdm bar, quiet when disabled, when stderr is not a terminal, and on ranks other than 0."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=not (enabled and sys.stderr.isatty() and distributed.is_main()),
    )


def train_steps(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimizer steps per epoch of `device_batches`."""
    return num_batches(n, batch_size, drop_last or distributed.is_distributed())


def device_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches of (normalized images, labels) on `device`, sliced from uint8 tensors
    in memory. Under torchrun each rank takes its shard of every global batch of `batch_size`
    and the last partial batch is dropped, so that all ranks step on equal shards."""
    drop_last = drop_last or distributed.is_distributed()
    for idx in epoch_batches(
        len(y), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last
    ):
        idx = distributed.shard(idx)
        yield normalize(x[idx].to(device, non_blocking=True)), y[idx].to(device, non_blocking=True)


StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def optimize_epoch(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: StepFn,
    settings: TrainerSettings,
    epoch: int,
) -> dict[str, float]:
    """One epoch of optimizer steps with a per-step learning-rate schedule; returns the mean
    of the loss and of every logged term as train_<name>, and the epoch's wall time."""
    start, sums = time.perf_counter(), {}
    bar = progress(batches, total=steps, desc=f"epoch {epoch}", enabled=settings.progress)
    for step, (x, y) in enumerate(bar):
        position = (epoch - 1 + step / steps) / settings.max_epochs
        set_lr(optimizer, settings.lr * lr_factor(settings.schedule, position))
        loss, logs = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in {"loss": loss.detach(), **logs}.items():
            sums[name] = sums.get(name, 0.0) + value
    return {**epoch_means(sums, steps), "epoch_time": time.perf_counter() - start}


def epoch_means(sums: dict[str, torch.Tensor | float], steps: int) -> dict[str, float]:
    """train_<name>: the epoch's mean of each summed term, over all ranks under torchrun."""
    if not sums:
        return {}
    means = distributed.mean_over_ranks(
        torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in sums.values()]) / steps
    )
    return {f"train_{name}": float(value) for name, value in zip(sums, means, strict=True)}


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate activations and logits of a classifier on uint8 images (on the CPU).
    Under torchrun each rank computes a contiguous chunk and every rank gets all of them."""
    was_training = model.training
    model.eval()
    local, sizes = distributed.local_chunk(x)
    feats, logits = [], []
    for idx in epoch_batches(len(local), batch_size, shuffle=False):
        h = model.features(normalize(local[idx].to(device)))
        feats.append(h)
        logits.append(model.head(h))
    model.train(was_training)
    return (
        distributed.gather_chunks(torch.cat(feats), sizes).cpu(),
        distributed.gather_chunks(torch.cat(logits), sizes).cpu(),
    )


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


# ---------------------------------------------------------------- the run folder
class Run:
    """A run folder: metrics.json, checkpoints/, tensorboard/. Knows whether the run is
    finished (reuse it), interrupted (resume from last.pt) or new."""

    def __init__(self, directory: str | os.PathLike, config: dict[str, Any], progress: bool = True):
        self.dir = Path(directory)
        self.config = config
        self.progress = progress
        self.metrics_path = self.dir / "metrics.json"
        self.last_path = self.dir / "checkpoints" / "last.pt"
        self.best_path = self.dir / "checkpoints" / "best.pt"
        self._writer = None
        self._lock: IO | None = None

    def claim(self) -> None:
        """Hold the folder for this process (rank 0 under torchrun) until `close`: a second
        penrun on the same folder, such as the same sweep launched twice, stops here instead
        of writing over a run in progress."""
        if not distributed.is_main():
            return
        self._lock = exclusive_lock(self.dir / ".lock", wait=False)
        if self._lock is None:
            raise ConfigError(
                f"run folder {self.dir} is in use by another penrun process; wait for it to end "
                "(launching the same command again then resumes or reuses the run)"
            )

    def finished_metrics(self) -> dict[str, Any] | None:
        """The metrics of a finished run of the same config, else None."""
        if not self.metrics_path.exists():
            return None
        metrics = json.loads(self.metrics_path.read_text())
        self.check_same_config(metrics.get("config"), self.metrics_path)
        return metrics if metrics.get("status") == "complete" else None

    def check_same_config(self, old: dict | None, where: Path) -> None:
        if old is None:
            return
        diff = config_difference(old, self.config)
        if diff:
            raise ConfigError(
                f"run folder {self.dir} holds a run of a different config ({where.name} differs in "
                f"{'; '.join(diff[:5])}); set hydra.run.dir to a new folder or remove the old one"
            )

    def load_last(self) -> dict[str, Any] | None:
        if not self.last_path.exists():
            return None
        ckpt = load_checkpoint(self.last_path)
        self.check_same_config(ckpt.get("config"), self.last_path)
        return ckpt

    @property
    def writer(self):
        """TensorBoard's writer (rank 0 only: other ranks get one that writes nothing)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = (
                SummaryWriter(str(self.dir / "tensorboard")) if distributed.is_main() else _NoWriter()
            )
        return self._writer

    def log_scalars(self, row: dict[str, Any], step: int) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def write_metrics(self, metrics: dict[str, Any], status: str) -> None:
        save_json(self.metrics_path, {**metrics, "status": status, "config": self.config})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class _NoWriter:
    """What ranks other than 0 log to."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def checkpoint_payload(
    run: Run,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    epoch: int,
    history: list[dict],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    # Random states of every rank (rank order), so that each resumes its own stream.
    states = distributed.gather_objects(
        {"global": rng_state(), "generators": {name: g.get_state() for name, g in generators.items()}}
    )
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "config": run.config,
        "history": history,
        "modules": {name: m.state_dict() for name, m in modules.items()},
        "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
        "rng": states,
        **(extra or {}),
    }


def restore_random_states(
    states: list[dict[str, Any]] | dict[str, Any], generators: dict[str, torch.Generator]
) -> None:
    """This rank's random states from a checkpoint (rank 0's if it was written by fewer ranks).
    Checkpoints of penrun 0.1.0 before 2026-11-26 hold one global state and no generators."""
    if isinstance(states, dict):
        states = [{"global": states, "generators": {}}]
    state = states[distributed.rank()] if distributed.rank() < len(states) else states[0]
    set_rng_state(state["global"])
    for name, generator in generators.items():
        if name in state["generators"]:
            generator.set_state(state["generators"][name])


def train_epochs(
    run: Run,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    max_epochs: int,
    train_epoch: Callable[[int], dict[str, float]],
    evaluate: Callable[[int], dict[str, float]],
    monitor: str,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The epoch loop: train, evaluate, log, checkpoint. Resumes from last.pt when present;
    random states (global and the task's own `generators`) are restored with the weights, so
    a resumed run reproduces the uninterrupted one."""
    generators = generators or {}
    history: list[dict[str, Any]] = []
    start = 1
    ckpt = run.load_last()
    if ckpt is not None:
        for name, module in modules.items():
            module.load_state_dict(ckpt["modules"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        restore_random_states(ckpt["rng"], generators)
        history, start = ckpt["history"], ckpt["epoch"] + 1
        if distributed.is_main():
            print(f"resuming {run.dir} from epoch {ckpt['epoch']}", file=sys.stderr)
    best = max((row[monitor] for row in history), default=-math.inf)
    for epoch in range(start, max_epochs + 1):
        row = {"epoch": epoch, **train_epoch(epoch), **evaluate(epoch)}
        history.append(row)
        run.log_scalars(row, epoch)
        payload = checkpoint_payload(run, modules, optimizers, generators, epoch, history, extra)
        if row[monitor] > best:
            best = row[monitor]
            save_torch(run.best_path, payload)
        save_torch(run.last_path, payload)
        run.write_metrics({"history": history}, status="running")
        distributed.barrier()  # no rank reads last.pt before rank 0 has written it
    return history


def stability(values: list[float], last: int = 5) -> dict[str, float]:
    """Std over the last epochs and the largest drop between consecutive epochs."""
    tail = values[-last:]
    drops = [a - b for a, b in itertools.pairwise(values)]
    return {
        "std_last": float(np.std(tail)) if tail else 0.0,
        "max_drop": float(max([0.0, *drops])),
    }
