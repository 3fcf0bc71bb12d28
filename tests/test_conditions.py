"""penrun.core.conditions: the conditions of class-conditional generation (one-hot labels or
draws from a final layer's vMF model), the uint8 conversion, generation from a seed and the
picture grid, against values written out by hand and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from penrun.core.conditions import (
    CONDITIONS,
    ConditionSampler,
    balanced_labels,
    generate,
    sample_grid,
    to_uint8,
)
from penrun.core.penultimate import PenultimateModel

CPU = torch.device("cpu")


def sharp_model(num_classes: int = 3, dim: int = 5) -> PenultimateModel:
    """Orthogonal class directions e_k with |w_k| = 1e4 (float64): kappa = 1e4, so every draw
    lies within ~0.03 of its class's direction."""
    return PenultimateModel.from_head(1e4 * torch.eye(num_classes, dim, dtype=torch.float64))


def test_the_two_conditions_are_named() -> None:
    assert CONDITIONS == ("onehot", "penultimate")


def test_onehot_conditions_are_rows_of_the_identity() -> None:
    sampler = ConditionSampler(4)
    y = torch.tensor([2, 0, 3, 3])
    before = torch.get_rng_state()
    c = sampler(y, torch.Generator().manual_seed(0))
    assert sampler.dim == 4
    assert c.dtype == torch.float32
    np.testing.assert_array_equal(c.numpy(), np.eye(4, dtype=np.float32)[[2, 0, 3, 3]])
    assert torch.equal(torch.get_rng_state(), before)


def test_penultimate_conditions_are_float32_unit_draws_near_their_class_direction() -> None:
    """The condition of class y is a draw from p(a | y): a float32 unit vector (the model is
    float64), within 0.1 of e_y at kappa = 1e4, of the activations' dimension, and drawn from the
    generator given (same seed, same draws; the global random state untouched)."""
    sampler = ConditionSampler(3, sharp_model())
    assert sampler.dim == 5
    y = torch.tensor([0, 2, 1, 2, 0, 1])
    before = torch.get_rng_state()
    c = sampler(y, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
    assert c.dtype == torch.float32 and c.shape == (6, 5)
    np.testing.assert_allclose(np.linalg.norm(c.numpy(), axis=1), 1.0, rtol=1e-6)
    assert np.abs(c.numpy() - np.eye(3, 5)[y.numpy()]).max() < 0.1
    assert torch.equal(c, sampler(y, torch.Generator().manual_seed(3)))
    assert not torch.equal(c, sampler(y, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(-1.0, 0), (1.0, 255), (0.0, 128), (-0.5, 64), (0.2, 153), (-3.0, 0), (2.5, 255), (0.9921875, 254)],
)
def test_to_uint8_maps_minus_one_to_one_onto_0_to_255(value: float, expected: int) -> None:
    """(v + 1) * 127.5 rounded half to even, clamped: 0 -> 127.5 -> 128, -0.5 -> 63.75 -> 64,
    0.2 -> 153.0, 0.9921875 -> 254.00390625 -> 254 (all by hand)."""
    got = to_uint8(torch.tensor([value], dtype=torch.float64))
    assert got.dtype == torch.uint8 and got.tolist() == [expected]


def test_to_uint8_computes_half_precision_images_in_float32() -> None:
    """A bfloat16 image (as a decoder under autocast gives) at -0.4921875: (1 - 0.4921875) * 127.5
    = 64.746... -> 65 by hand; in bfloat16 arithmetic the product rounds to 64 first."""
    assert to_uint8(torch.tensor([-0.4921875], dtype=torch.bfloat16)).tolist() == [65]


def test_balanced_labels_are_grouped_by_class() -> None:
    assert balanced_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert balanced_labels(2, 1).tolist() == [0, 1]


def test_generate_draws_z_and_c_from_the_seed_batch_by_batch() -> None:
    """The decoder gets, per batch of at most batch_size labels, the conditions of those labels
    and z ~ N(0, I) of shape (batch, z_dim), drawn in that order from Generator(seed): checked
    against the draws made by hand. The images are the decoder's output in uint8, on the CPU,
    and the global random state is not drawn from."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def decoder(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append((z, c))
        return torch.tanh(z[:, :1] + c[:, :1]).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 3)

    sampler = ConditionSampler(3, sharp_model())
    y = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    before = torch.get_rng_state()
    images = generate(decoder, sampler, y, z_dim=4, seed=11, batch_size=3, device=CPU)
    assert torch.equal(torch.get_rng_state(), before)
    rng = torch.Generator().manual_seed(11)
    assert [len(z) for z, _ in calls] == [3, 3, 1]
    for (z, c), batch in zip(calls, (y[:3], y[3:6], y[6:]), strict=True):
        torch.testing.assert_close(c, sampler(batch, rng), rtol=0, atol=0)
        torch.testing.assert_close(z, torch.randn(len(batch), 4, generator=rng), rtol=0, atol=0)
    assert images.dtype == torch.uint8 and images.shape == (7, 1, 2, 3)
    z = torch.cat([z for z, _ in calls]).numpy()
    c = torch.cat([c for _, c in calls]).numpy()
    expected = np.clip(np.round((np.tanh(z[:, 0] + c[:, 0]) + 1) * 127.5), 0, 255)
    np.testing.assert_array_equal(images[:, 0, 0, 0].numpy(), expected)
    assert torch.equal(images, generate(decoder, sampler, y, 4, 11, 3, CPU))
    assert not torch.equal(images, generate(decoder, sampler, y, 4, 12, 3, CPU))


def grid_cell(grid: torch.Tensor, row: int, col: int, side: int) -> np.ndarray:
    """The image at (row, col) of a grid with 2-pixel padding."""
    top, left = 2 + row * (side + 2), 2 + col * (side + 2)
    return grid[:, top : top + side, left : left + side].numpy()


def test_sample_grid_enlarges_small_images_to_28_pixels_by_nearest_neighbour() -> None:
    """7 x 7 images -> 28 x 28 (each pixel a 4 x 4 block: numpy's kron), /255 to [0, 1], per_row a
    row, 2-pixel padding of 0.5; grey images take three channels."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 7, 7), dtype=torch.uint8, generator=gen)
    grid = sample_grid(images, per_row=2)
    assert grid.shape == (3, 2 + 3 * 30, 2 + 2 * 30)
    for i in range(5):
        block = np.kron(images[i, 0].numpy() / 255, np.ones((4, 4)))
        for channel in grid_cell(grid, i // 2, i % 2, 28):
            np.testing.assert_allclose(channel, block, rtol=1e-6)
    assert (grid[:, :2] == 0.5).all() and (grid[:, :, :2] == 0.5).all()


def test_sample_grid_keeps_images_of_min_side_or_more() -> None:
    images = torch.full((2, 3, 30, 30), 51, dtype=torch.uint8)
    grid = sample_grid(images, per_row=2)
    assert grid.shape == (3, 34, 66)
    np.testing.assert_allclose(grid_cell(grid, 0, 1, 30), 0.2, rtol=1e-6)
    assert sample_grid(images[:, :, :10, :10], per_row=2, min_side=10).shape == (3, 14, 26)


def test_onehot_conditions_have_every_class_even_when_the_batch_lacks_the_last() -> None:
    c = ConditionSampler(5)(torch.tensor([1, 0, 1]), torch.Generator())
    np.testing.assert_array_equal(c.numpy(), np.eye(5, dtype=np.float32)[[1, 0, 1]])


def test_sample_grid_doubles_14_pixel_images_and_scales_by_the_width() -> None:
    """14 x 14 -> 28 x 28 (scale 2); a 7-high, 14-wide image is scaled by its width: 14 x 28."""
    square = torch.arange(196, dtype=torch.uint8).reshape(1, 1, 14, 14).expand(2, 1, 14, 14)
    grid = sample_grid(square, per_row=2)
    assert grid.shape == (3, 32, 62)
    block = np.kron(square[0, 0].numpy() / 255, np.ones((2, 2)))
    np.testing.assert_allclose(grid_cell(grid, 0, 1, 28)[0], block, rtol=1e-6)
    wide = sample_grid(torch.zeros(2, 1, 7, 14, dtype=torch.uint8), per_row=2)
    assert wide.shape == (3, 2 + 14 + 2, 2 + 2 * (28 + 2))
