"""penrun.core.diagnostics: the KS distance against SciPy, the linear probe, class cosines and the
figures of task=fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats

from penrun.core.diagnostics import (
    class_cosines,
    ks_distance,
    linear_probe_accuracy,
    plot_circle,
    plot_cosine_histograms,
)


def scipy_ks(a: torch.Tensor, b: torch.Tensor) -> float:
    return stats.ks_2samp(a.double().numpy(), b.double().numpy()).statistic


def test_ks_distance_matches_scipy() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, generator=gen), torch.randn(500, generator=gen) + 0.3
    assert ks_distance(a, b) == pytest.approx(scipy_ks(a, b), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_ks_distance_matches_scipy_on_sizes_shifts_and_ties(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, m = (int(v) for v in torch.randint(1, 400, (2,), generator=gen))
    a = torch.randn(n, generator=gen) * (1 + seed / 4)
    b = torch.randn(m, generator=gen) + 0.1 * seed
    if seed % 2:  # rounded values: ties within and between the samples
        a, b = (a * 2).round() / 2, (b * 2).round() / 2
    assert ks_distance(a, b) == pytest.approx(scipy_ks(a, b), abs=1e-12)
    assert ks_distance(a, b) == pytest.approx(ks_distance(b, a), abs=1e-15)


def test_ks_distance_at_its_extremes() -> None:
    a = torch.tensor([0.1, 0.5, 0.2])
    assert ks_distance(a, a.flip(0)) == 0.0
    assert ks_distance(a, a + 10) == 1.0
    assert ks_distance(torch.tensor([0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.5)


def test_linear_probe_separates_separable_data() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=gen)
    y = (x[:, 0] > 0).long()
    assert linear_probe_accuracy(x, y, x, y, 2, epochs=20) > 0.97


def test_linear_probe_is_reproducible_and_tested_on_the_other_set() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    y = (x[:, 1] > 0).long()
    own = linear_probe_accuracy(x, y, x, y, 2, seed=3)
    assert own == linear_probe_accuracy(x, y, x, y, 2, seed=3) > 0.9
    # The same probe (same training set and seed), tested against the flipped labels.
    assert linear_probe_accuracy(x, y, x, 1 - y, 2, seed=3) == pytest.approx(1 - own, abs=1e-12)


def test_class_cosines_are_the_cosine_to_each_class_direction() -> None:
    mu = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)
    a = F.normalize(torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), dim=1)
    torch.testing.assert_close(
        class_cosines(a, torch.tensor([0, 1, 1]), mu), torch.tensor([0.0, 2**-0.5, 2**-0.5])
    )


def test_the_figures_are_written(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(3).repeat(40)
    real, synthetic = torch.rand(120, generator=gen) * 2 - 1, torch.rand(120, generator=gen) * 2 - 1
    plot_cosine_histograms(real, synthetic, y, y, tmp_path / "hist.png")
    assert png_size(tmp_path / "hist.png") == (900, 240)  # 3 panels of 3 x 2.4 inches at 100 dpi
    mu = F.normalize(torch.randn(3, 2, generator=gen), dim=1)
    a = F.normalize(torch.randn(120, 2, generator=gen), dim=1)
    plot_circle(a, y, mu, torch.tensor([1.0, 5.0, 20.0]), tmp_path / "circle.png")
    assert png_size(tmp_path / "circle.png") == (600, 600)


def png_size(path: Path) -> tuple[int, int]:
    """The (width, height) of a PNG file (which PIL refuses if it is not one)."""
    with Image.open(path, formats=["PNG"]) as picture:
        return picture.size
