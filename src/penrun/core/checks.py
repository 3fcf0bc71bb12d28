"""Argument checks shared by the core modules: ValueError messages that name the argument,
the first bad value and where it is."""

from __future__ import annotations

import torch
from torch import Tensor


def where(mask: Tensor) -> str:
    """' at index 3' or ' at index (1, 2)' for the first True of mask; '' for a scalar."""
    if mask.dim() == 0:
        return ""
    idx = tuple(int(i) for i in mask.nonzero()[0])
    return f" at index {idx[0]}" if len(idx) == 1 else f" at index {idx}"


def first_bad(values: Tensor, bad: Tensor) -> str:
    return f"{values[bad].flatten()[0].item()}{where(bad)}"


def check_dim(d: int) -> None:
    if isinstance(d, bool) or not isinstance(d, int) or d < 2:
        raise ValueError(f"d must be an integer >= 2 (the sphere S^(d-1) in R^d), got {d!r}")


def check_kappa(kappa: Tensor, name: str = "kappa") -> None:
    bad = ~(torch.isfinite(kappa) & (kappa >= 0))
    if bad.any():
        raise ValueError(f"{name} must be >= 0 and finite, got {first_bad(kappa, bad)}")


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator must be on the samples' device ({device.type}), "
            f"got a generator on {generator.device.type}"
        )


def check_option(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}")


def check_positive(values: Tensor, name: str) -> None:
    bad = ~(torch.isfinite(values) & (values > 0))
    if bad.any():
        raise ValueError(f"{name} must be > 0 and finite, got {first_bad(values, bad)}")
