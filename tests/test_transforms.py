"""data/transforms.py: the domain shifts, each against its known result on asymmetric images
(direction included: scipy.ndimage, numpy's rot90, or by hand), resizing against Pillow, grey
against ITU-R 601 luma, and the class alignment of STL-10 with CIFAR-10."""

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


# ---------------------------------------------------------------- each shift's direction
def marked_image() -> torch.Tensor:
    """A 9x9 image with no symmetry: 200 at the top centre, 100 near the top-right corner."""
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 0, 4], x[0, 0, 1, 7] = 200, 100
    return x


def test_rotate_plus_90_turns_counterclockwise() -> None:
    """rotate(+90) turns the image a quarter counterclockwise, as numpy's rot90 and
    scipy.ndimage.rotate(+90) do (torchvision's convention too): the top centre goes to the
    left centre, the pixel near the top-right corner near the top-left one. Fails if the
    angle's sign is flipped."""
    x = marked_image()
    turned = SHIFTS["rotate"][1](x, 90.0, torch.Generator())[0, 0].round()
    assert turned[4, 0] == 200 and turned[1, 1] == 100 and turned.count_nonzero() == 2
    np.testing.assert_array_equal(turned.numpy(), np.rot90(x[0, 0].numpy(), 1))


@pytest.mark.parametrize("angle", [30.0, -45.0, 90.0, 200.0])
def test_rotate_matches_scipy_ndimage_rotate(angle: float) -> None:
    """Bilinear rotation about the centre with zeros outside: scipy.ndimage.rotate(order=1,
    mode='grid-constant', reshape=False) on a random 9x9 image, to float32 rounding."""
    x = torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(0)) * 255
    rotated = SHIFTS["rotate"][1](x, angle, torch.Generator())[0, 0].numpy()
    expected = ndimage.rotate(x[0, 0].double().numpy(), angle, reshape=False, order=1, mode="grid-constant")
    np.testing.assert_allclose(rotated, expected, atol=1e-3)


@pytest.mark.parametrize("zoom", [0.5, 0.8, 2.0])
def test_scale_zooms_about_the_centre_as_scipy_affine_transform(zoom: float) -> None:
    """scale(z): the output pixel p reads the input at c + (p - c) / z, c the centre (z < 1
    shrinks), bilinear with zeros outside: scipy.ndimage.affine_transform with that map, on
    the marked image and a random one. Fails if the zoom multiplies instead of divides."""
    for x in (marked_image(), torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(1)) * 255):
        scaled = SHIFTS["scale"][1](x, zoom, torch.Generator())[0, 0].numpy()
        centre = np.full(2, (9 - 1) / 2)
        expected = ndimage.affine_transform(
            x[0, 0].double().numpy(),
            np.eye(2) / zoom,
            offset=centre - centre / zoom,
            order=1,
            mode="grid-constant",
        )
        np.testing.assert_allclose(scaled, expected, atol=1e-3)
    # scale(0.5) reads output (2, 4) from input (4 + (2 - 4) / 0.5, 4) = (0, 4): the top centre.
    shrunk = SHIFTS["scale"][1](marked_image(), 0.5, torch.Generator())[0, 0]
    assert shrunk[2, 4].item() == pytest.approx(200, abs=1e-3)


def test_invert_blends_towards_the_negative_by_its_strength() -> None:
    """invert(s) = (1 - s) x + s (255 - x), by hand on the marked image at s = 0.25 (rounded to
    uint8): 0 -> 63.75 -> 64, 200 -> 0.75 * 200 + 0.25 * 55 = 163.75 -> 164, 100 -> 75 + 38.75
    = 113.75 -> 114. Fails if the blend runs the other way."""
    x = marked_image().to(torch.uint8)
    out = shift_images(toy(x), "invert", 0.25).x_train[0, 0]
    assert out[0, 4] == 164 and out[1, 7] == 114 and out[4, 4] == 64


def test_noise_is_added_the_same_to_every_image_of_a_seed() -> None:
    """noise adds one draw per pixel, independent of the pixel's value: two images of the same
    seed, away from the range's ends, get the same differences. Fails if noise scales with x."""
    low, high = (
        torch.full((1, 1, 8, 8), 60, dtype=torch.uint8),
        torch.full((1, 1, 8, 8), 190, dtype=torch.uint8),
    )
    a = shift_images(toy(low), "noise", 0.05, seed=5).x_train.int() - 60
    b = shift_images(toy(high), "noise", 0.05, seed=5).x_train.int() - 190
    assert torch.equal(a, b) and a.abs().max() > 0


def test_rotate_180_is_two_quarter_turns_and_360_is_identity():
    """rotate(180) is rot90(k=2) and rotate(360) the identity (to one grey level), on random 9x9
    images. Fails if the angle is taken in radians."""
    x = random_images((3, 2, 9, 9))
    assert torch.equal(shift_images(toy(x), "rotate", 180).x_train, torch.rot90(x, 2, (2, 3)))
    full = shift_images(toy(x), "rotate", 360).x_train
    assert (full.int() - x.int()).abs().max() <= 1


def test_invert_and_scale_shifts_by_hand():
    """invert(1) maps v -> 255 - v exactly and invert(0.5) maps every pixel to 127.5 (rounded
    to 127 or 128); scale(1) is the identity and scale(0.5) shrinks a white image into its
    centre with black corners. Fails if invert blends the other way round ((1-s)(255-x) +
    s x), or the zoom multiplies the grid instead of dividing it."""
    x = random_images((3, 2, 9, 9), 1)
    data = toy(x)
    assert torch.equal(shift_images(data, "invert", 1.0).x_train, 255 - x)
    half = shift_images(data, "invert", 0.5).x_train
    assert set(half.unique().tolist()) <= {127, 128}
    assert torch.equal(shift_images(data, "scale", 1.0).x_train, x)
    white = torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)
    small = shift_images(toy(white), "scale", 0.5).x_train[0, 0]
    assert small[3:5, 3:5].eq(255).all()
    assert small[0, 0] == 0 and small[-1, -1] == 0 and small[0, -1] == 0 and small[-1, 0] == 0


def test_blur_shift_keeps_constants_and_smooths_noise():
    """Gaussian blur (replicate padding) keeps a constant image exactly, keeps the mean of a
    noise image and cuts its variance by more than 4 (sigma = 1.5: a variance ratio of about
    1 / (4 pi sigma^2) ~ 0.035 for white noise). Fails with zero padding or unnormalized taps."""
    const = torch.full((2, 3, 10, 10), 77, dtype=torch.uint8)
    assert torch.equal(shift_images(toy(const), "blur", 1.5).x_train, const)
    x = random_images((4, 1, 32, 32), 2)
    blurred = shift_images(toy(x), "blur", 1.5).x_train.double()
    assert abs(blurred.mean().item() - x.double().mean().item()) < 2.0
    assert blurred.var().item() < x.double().var().item() / 4


def test_noise_shift_has_the_requested_std_and_is_reproducible():
    """noise(s) adds Gaussian noise of std 255 s: measured on a constant image (4096 pixels,
    sd of the estimate ~1.1%; uint8 rounding adds 1/12 to the variance) within 5%; the same
    seed gives the same images and another seed different ones. Fails if the std is s
    instead of 255 s, or the seed is ignored."""
    const = torch.full((16, 1, 16, 16), 128, dtype=torch.uint8)
    data = toy(const)
    noisy = shift_images(data, "noise", 0.05, seed=3).x_train
    std = (noisy.double() - 128).std().item()
    assert std == pytest.approx(255 * 0.05, rel=0.05)
    assert torch.equal(shift_images(data, "noise", 0.05, seed=3).x_train, noisy)
    assert not torch.equal(shift_images(data, "noise", 0.05, seed=4).x_train, noisy)
