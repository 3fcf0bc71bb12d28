"""Tests that kill mutants of penrun.data.transforms that the other tests let survive
(MUTATION.md): the blur against scipy.ndimage, the class alignment by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from penrun.data.dataset import ImageData
from penrun.data.transforms import SHIFTS, align_classes, convert_images, resize, shift_images, to_channels


@pytest.mark.parametrize("sigma", [0.45, 0.7, 1.0])
def test_blur_matches_scipy_gaussian_filter(sigma: float) -> None:
    """scipy.ndimage.gaussian_filter over the two image axes with replicate edges ("nearest")
    and the same radius (scipy's int(3 sigma + 0.5) equals round(3 sigma) at these sigmas), on
    float64 images: the taps' shape, width and normalization."""
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    blurred = SHIFTS["blur"][1](x, sigma, torch.Generator())
    expected = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(blurred.numpy(), expected, rtol=1e-6)  # float32 taps


def images(labels: list[int], name: str = "stl10") -> ImageData:
    """One 1x1 image per label whose pixel is its index, so the kept examples can be read off."""
    x = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1)
    y = torch.tensor(labels)
    return ImageData(name, x, y, x.flip(0).clone(), y.flip(0).clone(), 10, "test")


def test_stl10_is_relabelled_into_cifar10_and_its_monkeys_dropped() -> None:
    """STL-10 -> CIFAR-10: 0 1 2 3 4 5 6 7 8 9 -> 0 2 1 3 4 5 7 (monkey: none) 8 9."""
    data = align_classes(images([0, 1, 2, 7, 6, 9, 7, 8]), "cifar10")
    assert data.y_train.tolist() == [0, 2, 1, 7, 9, 8]
    assert data.x_train.flatten().tolist() == [0, 1, 2, 4, 5, 7]
    assert data.y_test.tolist() == [8, 9, 7, 1, 2, 0]
    assert data.x_test.flatten().tolist() == [7, 5, 4, 2, 1, 0]
    assert data.num_classes == 10 and data.name == "stl10"


def test_pairs_without_an_alignment_are_unchanged() -> None:
    data = images([0, 7, 3], name="cifar10")
    assert align_classes(data, "stl10") is data
    stl = images([0, 7, 3])
    assert align_classes(stl, "stl10") is stl


def random_images(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("size", [5, 27])
def test_resize_matches_pillow_bilinear(size: int) -> None:
    """Pillow's BILINEAR resize (antialiased when shrinking, pixel centres aligned) to within
    one grey level, down (16 -> 5) and up (16 -> 27); black and white stay exactly so."""
    x = random_images((2, 1, 16, 16))
    out = resize(x, size)
    assert out.dtype == torch.uint8 and out.shape == (2, 1, size, size)
    for image, resized in zip(x[:, 0].numpy(), out[:, 0].numpy(), strict=True):
        pil = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        assert np.abs(resized.astype(int) - pil.astype(int)).max() <= 1
    for level in (0, 255):
        flat = torch.full((1, 3, 16, 16), level, dtype=torch.uint8)
        assert torch.equal(resize(flat, size), torch.full((1, 3, size, size), level, dtype=torch.uint8))


def test_grey_is_the_rounded_itu_601_luma() -> None:
    rgb = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 200, 30]])
    x = rgb.to(torch.uint8).T.reshape(1, 3, 1, 6)
    expected = [
        0,
        255,
        round(0.299 * 255),
        round(0.587 * 255),
        round(0.114 * 255),
        round(2.99 + 117.4 + 3.42),
    ]
    grey = to_channels(x, 1)
    assert grey.dtype == torch.uint8 and grey.shape == (1, 1, 1, 6)
    assert grey.flatten().tolist() == expected
    assert torch.equal(to_channels(grey, 3), grey.expand(1, 3, 1, 6))


def test_convert_images_changes_only_what_differs() -> None:
    data = ImageData(
        "toy",
        random_images((4, 3, 8, 8)),
        torch.zeros(4),
        random_images((2, 3, 8, 8), 1),
        torch.zeros(2),
        1,
        "t",
    )
    same = convert_images(data, None, None)
    assert same.x_train is data.x_train and same.x_test is data.x_test
    assert convert_images(data, 8, 3).x_train is data.x_train  # nothing to do: the same tensors
    grey = convert_images(data, 4, 1)
    assert grey.x_train.shape == (4, 1, 4, 4) and grey.x_test.shape == (2, 1, 4, 4)
    assert torch.equal(grey.x_test, resize(to_channels(data.x_test, 1), 4))
    assert convert_images(data, 8, 1).x_train.shape == (4, 1, 8, 8)
    assert convert_images(data, 5, None).x_train.shape == (4, 3, 5, 5)
    rgb = convert_images(grey, None, 3)
    assert torch.equal(rgb.x_train, grey.x_train.expand(4, 3, 4, 4))


def toy(x: torch.Tensor) -> ImageData:
    return ImageData("toy", x, torch.zeros(len(x)), x.clone(), torch.zeros(len(x)), 1, "test")


def test_shifted_data_is_named_and_both_splits_shifted() -> None:
    x = random_images((2, 1, 6, 6))
    data = shift_images(toy(x), "invert", 1.0)
    assert data.name == "toy+invert(1)"
    assert torch.equal(data.x_train, 255 - x) and torch.equal(data.x_test, 255 - x)
    assert data.x_train.dtype == torch.uint8
    assert shift_images(toy(x), "rotate", 22.5).name == "toy+rotate(22.5)"


@pytest.mark.parametrize("level", [0, 255])
def test_noise_is_clamped_to_the_pixel_range(level: int) -> None:
    """noise(0.1) (std 25.5) on a black or white image: the draws that leave [0, 255] stop at
    its end (about half of them), none wraps around the uint8 range."""
    x = torch.full((16, 1, 16, 16), level, dtype=torch.uint8)
    out = shift_images(toy(x), "noise", 0.1, seed=1).x_train
    at_level = (out == level).double().mean().item()
    assert 0.45 < at_level < 0.6
    far = (out.int() - level).abs()
    assert far.max().item() < 130  # 5 sd: a wrapped value would be ~255 away


@pytest.mark.parametrize(
    ("shift", "strength", "message"),
    [
        ("sharpen", 1.0, "shift='sharpen' is invalid; valid: none, invert, rotate, scale, noise, blur"),
        ("rotate", 0, "strength=0 is invalid for rotate: use rotation in degrees (> 0)"),
        ("blur", -1.0, "strength=-1.0 is invalid for blur: use Gaussian blur sigma in pixels (> 0)"),
        ("invert", 1.5, "strength=1.5 is invalid for invert: use blend towards the negative image, 0..1 (> 0)"),
        ("noise", "0.1", "strength='0.1' is invalid for noise: use std of Gaussian pixel noise, in units of the 0..255 range (> 0)"),
    ],
)  # fmt: skip
def test_bad_shifts_are_refused_saying_what_is_valid(shift: str, strength: object, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        shift_images(toy(random_images((1, 1, 4, 4))), shift, strength)  # type: ignore[arg-type]
    assert str(refused.value) == message
