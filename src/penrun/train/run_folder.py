"""A run folder: metrics.json, checkpoints/, tensorboard/; finished, interrupted or new."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from penrun.errors import InputError
from penrun.train import distributed
from penrun.train.checkpoint import load_checkpoint
from penrun.train.files import exclusive_lock, save_json


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


class RunFolder:
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
            raise InputError(
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
            raise InputError(
                f"run folder {self.dir} holds a run of a different config ({where.name} differs in "
                f"{'; '.join(diff[:5])}); use another folder or move the old one aside"
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
