"""Image transforms, done once on whole uint8 tensors: resize, grey <-> RGB, the domain shifts
of a transfer set, and class alignment between datasets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from penrun.data.dataset import ImageData

# ITU-R 601 luma weights: how RGB images become grey.
LUMA = torch.tensor([0.299, 0.587, 0.114])


def convert_images(data: ImageData, image_size: int | None, channels: int | None) -> ImageData:
    """Bring both splits to `image_size` x `image_size` and `channels` (None keeps them)."""

    def convert(x: torch.Tensor) -> torch.Tensor:
        if channels is not None and x.shape[1] != channels:
            x = to_channels(x, channels)
        if image_size is not None and x.shape[2:] != (image_size, image_size):
            x = resize(x, image_size)
        return x

    return replace(data, x_train=convert(data.x_train), x_test=convert(data.x_test))


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 grey <-> RGB."""
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    grey = torch.einsum("nchw,c->nhw", x.float(), LUMA)
    return grey.round_().clamp_(0, 255).to(torch.uint8)[:, None]


def resize(x: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 images, in chunks to bound memory."""
    out = torch.empty((len(x), x.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _affine(x: torch.Tensor, angle_deg: float, zoom: float) -> torch.Tensor:
    """Rotate by `angle_deg` and zoom by `zoom` about the centre (zeros fill the corners)."""
    theta = torch.tensor(angle_deg * torch.pi / 180)
    rot = (
        torch.stack([torch.stack([theta.cos(), -theta.sin()]), torch.stack([theta.sin(), theta.cos()])])
        / zoom
    )
    matrix = torch.cat([rot, torch.zeros(2, 1)], dim=1).expand(len(x), 2, 3)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, round(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(
        F.pad(x, (radius, radius, 0, 0), mode="replicate"),
        taps.view(1, 1, 1, -1).expand(c, 1, 1, -1),
        groups=c,
    )
    return F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="replicate"),
        taps.view(1, 1, -1, 1).expand(c, 1, -1, 1),
        groups=c,
    )


# Each shift maps float images in [0, 255] to shifted ones; `strength` means:
SHIFTS: dict[str, tuple[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]]] = {
    "invert": (
        "blend towards the negative image, 0..1",
        lambda x, s, g: (1 - s) * x + s * (255 - x),
    ),
    "rotate": ("rotation in degrees", lambda x, s, g: _affine(x, s, 1.0)),
    "scale": ("zoom factor (< 1 shrinks)", lambda x, s, g: _affine(x, 0.0, s)),
    "noise": (
        "std of Gaussian pixel noise, in units of the 0..255 range",
        lambda x, s, g: x + 255 * s * torch.randn(x.shape, generator=g),
    ),
    "blur": ("Gaussian blur sigma in pixels", lambda x, s, g: _gaussian_blur(x, s)),
}


def shift_images(data: ImageData, shift: str, strength: float, seed: int = 0) -> ImageData:
    """A shifted copy of both splits (a domain shift of one dataset)."""
    if shift not in SHIFTS:
        raise ValueError(f"shift={shift!r} is invalid; valid: none, {', '.join(SHIFTS)}")
    if not isinstance(strength, int | float) or strength <= 0 or (shift == "invert" and strength > 1):
        raise ValueError(f"strength={strength!r} is invalid for {shift}: use {SHIFTS[shift][0]} (> 0)")
    rng = torch.Generator().manual_seed(seed)
    fn = SHIFTS[shift][1]

    def apply(x: torch.Tensor) -> torch.Tensor:
        return fn(x.float(), float(strength), rng).round_().clamp_(0, 255).to(torch.uint8)

    name = f"{data.name}+{shift}({strength:g})"
    return replace(data, name=name, x_train=apply(data.x_train), x_test=apply(data.x_test))


# Where one dataset's classes sit in another's label space (None: no counterpart). STL-10 has
# a monkey where CIFAR-10 has a frog, and orders car/bird the other way round.
CLASS_ALIGNMENT: dict[tuple[str, str], list[int | None]] = {
    ("stl10", "cifar10"): [0, 2, 1, 3, 4, 5, 7, None, 8, 9],
}


def align_classes(data: ImageData, target: str) -> ImageData:
    """Relabel `data` into the classes of dataset `target` where they differ, dropping the
    examples of classes `target` lacks; unchanged when no alignment is known."""
    mapping = CLASS_ALIGNMENT.get((data.name, target))
    if mapping is None:
        return data
    table = torch.tensor([-1 if m is None else m for m in mapping])

    def relabel(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = table[y]
        keep = new >= 0
        return x[keep], new[keep]

    x_train, y_train = relabel(data.x_train, data.y_train)
    x_test, y_test = relabel(data.x_test, data.y_test)
    return replace(
        data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=len(table)
    )
