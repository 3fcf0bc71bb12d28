"""A run folder: metrics.json, checkpoints/, tensorboard/; finished, interrupted or new."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from penrun.errors import InputError
from penrun.train import distributed
from penrun.train.checkpoint import load_checkpoint
from penrun.train.files import HeldLock, exclusive_lock, save_json

log = logging.getLogger(__name__)

OLD_SUFFIX = ".old-"  # what rerun=true appends (with the time) to a folder it moves aside


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_difference(old: dict, new: dict, defaults: dict[str, Any] | None = None) -> list[str]:
    """The keys whose values differ, as `key: old -> new`. `defaults` (dotted key: value) says
    what a config that lacks a key of a node it has meant: a key added to the config after a
    run was stored holds its default there, and is no difference."""
    a, b = complete(flatten(old), defaults or {}), complete(flatten(new), defaults or {})
    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def complete(flat: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A flat config with the defaults of the keys it lacks: top-level keys, and keys of the
    nodes it has (a node it lacks, such as another task's, stays absent)."""
    nodes = {key.partition(".")[0] for key in flat}
    missing = {
        k: v for k, v in defaults.items() if k not in flat and (k.partition(".")[0] in nodes or "." not in k)
    }
    return {**flat, **missing}


class FolderRefused(InputError):
    """The folder holds another run (in use, or of a different config): nothing was written."""


class RunFolder:
    """A run folder: metrics.json, checkpoints/, tensorboard/. Knows whether the run is
    finished (reuse it), interrupted (resume from last.pt) or new."""

    def __init__(
        self, directory: str | os.PathLike, config: dict[str, Any], defaults: dict[str, Any] | None = None
    ):
        self.dir = Path(directory)
        self.config = config
        self.defaults = defaults  # of keys a stored config may lack (config_difference)
        self.metrics_path = self.dir / "metrics.json"
        self.last_path = self.dir / "checkpoints" / "last.pt"
        self.best_path = self.dir / "checkpoints" / "best.pt"
        self._writer = None
        self._lock: HeldLock | None = None
        self._log: logging.Handler | None = None

    def claim(self) -> bool:
        """Hold the folder for this process (rank 0 under torchrun) until `close`: a second
        penrun on the same folder, such as the same sweep launched twice, stops here instead
        of writing over a run in progress. False when the folder cannot be written to (a
        finished run can still be read from it)."""
        if not distributed.is_main():
            return True
        try:
            self._lock = exclusive_lock(self.dir / ".lock", wait=False)
        except PermissionError:
            return False
        if self._lock is None:
            raise FolderRefused(
                f"run folder {self.dir} is in use by another penrun process; wait for it to end "
                "(launching the same command again then resumes or reuses the run)"
            )
        return True

    def move_aside(self) -> Path | None:
        """Rename what this folder holds to `<folder>.old-<time>` (nothing is deleted) so that a
        fresh run starts here; None when it holds nothing. Refused while another process holds
        the folder."""
        if not self.dir.is_dir() or not any(self.dir.iterdir()):
            return None
        lock = exclusive_lock(self.dir / ".lock", wait=False)
        if lock is None:
            raise FolderRefused(
                f"run folder {self.dir} is in use by another penrun process: wait for it to end, "
                "then run again with rerun=true"
            )
        lock.close()
        target = self.dir.with_name(f"{self.dir.name}{OLD_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}")
        self.dir.rename(target)
        return target

    def finished_metrics(self) -> dict[str, Any] | None:
        """The metrics of a finished run of the same config, else None. An unreadable
        metrics.json (truncated, edited) is rebuilt: the run resumes from last.pt, whose
        history holds every epoch's numbers, or starts afresh when there is none."""
        metrics = read_json(self.metrics_path)
        if metrics is None:
            if self.metrics_path.exists():
                log.warning(f"{self.metrics_path} is unreadable: rebuilding it from last.pt")
            self.load_last()  # a folder of another config is refused before anything is written
            return None
        self.check_same_config(metrics.get("config"), self.metrics_path)
        return metrics if metrics.get("status") == "complete" else None

    def check_same_config(self, old: dict | None, where: Path) -> None:
        if old is None:
            return
        diff = config_difference(old, self.config, self.defaults)
        if diff:
            raise FolderRefused(
                f"run folder {self.dir} holds a run of a different config ({where.name} differs in "
                f"{'; '.join(diff[:5])}); add rerun=true to move it aside and start afresh, or use another folder"
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
            from torch.utils.tensorboard import SummaryWriter  # slow to import: only when used

            self._writer = (
                SummaryWriter(str(self.dir / "tensorboard")) if distributed.is_main() else _NoWriter()
            )
        return self._writer

    def log_scalars(self, row: dict[str, Any], step: int) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(tensorboard_tag(key), value, step)
        self.writer.flush()

    def write_metrics(self, metrics: dict[str, Any], status: str) -> None:
        stamped = {**metrics, "status": status, "penrun": provenance(), "config": self.config}
        save_json(self.metrics_path, stamped)
        if status == "complete" and distributed.is_main():
            self.log_hparams(metrics)

    def log_hparams(self, metrics: dict[str, Any]) -> None:
        """The run's config and final numbers in TensorBoard's HParams tab, which compares the
        runs of a sweep (`tensorboard --logdir outputs/multirun/NAME`)."""
        from torch.utils.tensorboard.summary import hparams

        params = {k: v for k, v in flatten(self.config).items() if isinstance(v, bool | int | float | str)}
        finals = {
            f"final/{k}": v
            for k, v in flatten({k: v for k, v in metrics.items() if k not in ("history", "config")}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        for summary in hparams(params, finals):
            self.writer._get_file_writer().add_summary(summary)
        for key, value in finals.items():
            self.writer.add_scalar(key, value)
        self.writer.flush()

    def start_log(self) -> None:
        """Copy what the process logs into the folder's penrun.log, with times (rank 0)."""
        if not distributed.is_main():
            return
        self._log = logging.FileHandler(self.dir / "penrun.log")
        self._log.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        logging.getLogger().addHandler(self._log)

    def remove_orphans(self) -> None:
        """Temporary files that a killed atomic write left behind. Only the folder's holder
        removes them (rank 0 under torchrun: another rank would delete rank 0's writes in flight)."""
        if not distributed.is_main():
            return
        for pattern in (".*.tmp", "*/.*.tmp"):
            for orphan in self.dir.glob(pattern):
                orphan.unlink(missing_ok=True)

    def close(self) -> None:
        if self._log is not None:
            logging.getLogger().removeHandler(self._log)
            self._log.close()
            self._log = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


@functools.cache
def provenance() -> dict[str, str | None]:
    """The penrun that wrote a run: its version and, run from a source checkout, the git
    commit (`git describe --dirty`: uncommitted changes show); None for an installed wheel."""
    checkout = Path(__file__).resolve().parents[3]
    commit = None
    if (checkout / "pyproject.toml").exists() and (checkout / ".git").exists():
        try:
            described = subprocess.run(
                ["git", "-C", str(checkout), "describe", "--always", "--dirty", "--abbrev=12"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            commit = described.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        version = importlib.metadata.version("penrun")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree on PYTHONPATH
        version = "unknown (not installed)"
    return {"version": version, "commit": commit}


def made_by(metrics: dict[str, Any] | None) -> str:
    """Which penrun wrote a finished run, in words (older runs carry no stamp)."""
    stamp = (metrics or {}).get("penrun") or {}
    if not stamp:
        return "made by penrun 0.2.0 or older"
    commit = f", commit {stamp['commit']}" if stamp.get("commit") else ""
    return f"made by penrun {stamp['version']}{commit}"


def tensorboard_tag(key: str) -> str:
    """A per-epoch number's TensorBoard tag, grouped by what it measures: train/ (training-step
    means), val/ (the validation split), time/, and test/ (the test splits, and an evaluator's
    scores of generated samples)."""
    for prefix, group in (("train_", "train"), ("val_", "val")):
        if key.startswith(prefix):
            return f"{group}/{key.removeprefix(prefix)}"
    return f"time/{key}" if key.endswith("_time") else f"test/{key}"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file holding an object (metrics.json, failed.json) as a dict; None when it is
    missing or unreadable."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


class _NoWriter:
    """What ranks other than 0 log to."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None
