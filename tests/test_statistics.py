"""The per-class activation statistics a teacher records (penrun.core.statistics), against
numpy written out by hand."""

from __future__ import annotations

import numpy as np
import torch

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
