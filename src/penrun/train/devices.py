"""Devices and threads."""

from __future__ import annotations

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
