"""The per-class activation statistics a teacher records (penrun.core.statistics), against
numpy written out by hand and scipy's Bessel functions."""

from __future__ import annotations

import numpy as np
import torch
from scipy import optimize, special

from penrun.core.statistics import NUM_QUANTILES, activation_statistics


def test_activation_statistics_match_numpy():
    """norm_mean, norm_std (population, ddof=0), norm_quantiles (linear interpolation at
    linspace(0, 1, Q)), count and mean_resultant_length |mean of h/|h|| per class, against
    numpy on a small random (h, y). Fails if the std uses Bessel's correction, the quantiles
    are taken over all classes, or the mean resultant length averages the raw h instead of
    its directions."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(30, 4)) * rng.uniform(0.5, 3.0, size=(30, 1)) + np.array([1.0, 0.0, 0.0, 0.0])
    y = np.array([0] * 11 + [1] * 7 + [2] * 12)
    rng.shuffle(y)
    stats = activation_statistics(torch.tensor(h), torch.tensor(y), 3)
    probs = np.linspace(0, 1, NUM_QUANTILES)
    for k in range(3):
        hk = h[y == k]
        norms = np.sqrt((hk**2).sum(1))
        assert stats["count"][k].item() == len(hk)
        np.testing.assert_allclose(stats["norm_mean"][k].item(), norms.sum() / len(norms), rtol=1e-12)
        pop_std = np.sqrt(((norms - norms.mean()) ** 2).sum() / len(norms))
        np.testing.assert_allclose(stats["norm_std"][k].item(), pop_std, rtol=1e-12)
        np.testing.assert_allclose(stats["norm_quantiles"][k].numpy(), np.quantile(norms, probs), rtol=1e-12)
        directions = hk / norms[:, None]
        length = np.sqrt((directions.mean(0) ** 2).sum())
        np.testing.assert_allclose(stats["mean_resultant_length"][k].item(), length, rtol=1e-12)


def test_fitted_kappa_and_mean_direction_are_the_ml_vmf_fit():
    """Per class, mean_direction is the normalized mean of h/|h| (numpy) and fitted_kappa solves
    A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa) = R (scipy's brentq on scipy's Bessel ratio);
    a class without activations has count 0 and zero norm statistics. The keys are exactly the
    seven a teacher records (record_statistics writes them under these names)."""
    rng = np.random.default_rng(1)
    d = 5
    centres = np.array([[3.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0, 1.0]])
    y = np.array([0] * 40 + [1] * 25)
    h = centres[y] + rng.normal(size=(len(y), d))
    stats = activation_statistics(torch.tensor(h), torch.tensor(y), 3)
    assert set(stats) == {
        "norm_mean",
        "norm_std",
        "norm_quantiles",
        "count",
        "mean_resultant_length",
        "fitted_kappa",
        "mean_direction",
    }
    for k in range(2):
        directions = h[y == k] / np.linalg.norm(h[y == k], axis=1, keepdims=True)
        mean = directions.mean(0)
        length = np.linalg.norm(mean)
        np.testing.assert_allclose(stats["mean_direction"][k].numpy(), mean / length, rtol=1e-12)

        def ratio_minus_r(kappa: float, r: float = length) -> float:
            return special.ive(d / 2, kappa) / special.ive(d / 2 - 1, kappa) - r

        kappa = optimize.brentq(ratio_minus_r, 1e-6, 1e4, xtol=1e-14, rtol=1e-14)
        np.testing.assert_allclose(stats["fitted_kappa"][k].item(), kappa, rtol=1e-9)
    assert stats["count"].tolist() == [40, 25, 0]
    for key in ("norm_mean", "norm_std", "norm_quantiles"):
        assert not stats[key][2].any(), key
