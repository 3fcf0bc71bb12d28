"""Files that survive a kill: atomic writes, and locks between processes."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

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


def save_image_grid(grid: torch.Tensor, path: Path) -> None:
    """A float (C, H, W) image in [0, 1] as a PNG file."""
    from torchvision.utils import save_image  # torchvision is slow to import: only for pictures

    atomic_write(path, lambda tmp: save_image(grid, str(tmp), format="png"))
