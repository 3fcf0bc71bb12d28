"""Devices, threads and the host memory allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from penrun.errors import InputError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"device={name!r} but CUDA is not available; use auto or cpu")
        return torch.device(name)
    raise InputError(f"device={name!r} is invalid; valid: auto, cpu, cuda, cuda:N")


def set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)


# glibc's mallopt parameters (malloc.h) and the values penrun sets.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MIB = 1 << 20
ALLOCATOR_SETTINGS = {
    # Tensors up to 32 MiB (the ceiling of glibc's own adaptive threshold on 64-bit) come from
    # the heap from the first step on...
    M_MMAP_THRESHOLD: 32 * MIB,
    # ...and their memory stays there when freed, instead of going back to the kernel and being
    # faulted in, page by page, by the next step's tensors of the same size.
    M_TRIM_THRESHOLD: 1024 * MIB,
    # The heap grows 256 MiB at a time, not by each request: a pass over a dataset in large
    # batches ran 1.5x faster (BENCHMARKS.md#same-numbers).
    M_TOP_PAD: 256 * MIB,
}
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Have glibc keep a training process's freed tensor memory for the next step.

    With glibc's defaults a step's large temporaries (activations, gradients) are mapped anew and
    every page faulted in again. In the generation table's two side-by-side jobs that was 134 s of
    system time (29 s after), and a teacher's pass over MNIST took 4.5 s instead of 2.7 s
    (BENCHMARKS.md#same-numbers). The arithmetic is the same either way. Skipped off Linux, and
    when the user set glibc's own MALLOC_* variables. Returns whether the settings were made.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in GLIBC_VARIABLES):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    return all(mallopt(param, value) == 1 for param, value in ALLOCATOR_SETTINGS.items())
