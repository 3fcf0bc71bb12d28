"""Files that survive a kill: atomic writes, and locks between processes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

from penrun.train import distributed

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, flush it to the disk, then rename:
    a reader (or a resumed run) sees the old file or the new one, never half of one, even
    after a power cut. Under torchrun only rank 0 writes: the other ranks hold the same
    results."""
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HeldLock:
    """An acquired lock between processes; `close()` (or leaving a `with` block) releases it."""

    def __init__(self, lock: FileLock):
        self._lock = lock

    def close(self) -> None:
        self._lock.release(force=True)

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exclusive_lock(path: Path, wait: bool) -> HeldLock | None:
    """An exclusive lock on `path` between processes (the `filelock` package: flock on POSIX,
    msvcrt on Windows; the system drops it when the process dies, even by SIGKILL); None when
    another process holds it and `wait` is false."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None
    return HeldLock(lock)


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


def save_image_grid(grid: torch.Tensor, path: Path) -> None:
    """A float (C, H, W) image in [0, 1] as a PNG file."""
    from torchvision.utils import save_image  # torchvision is slow to import: only for pictures

    atomic_write(path, lambda tmp: save_image(grid, str(tmp), format="png"))
