"""Per-class statistics of penultimate activations, recorded with a teacher so that the
sampler needs no data later (radius for linear heads; the class mean directions and fitted
kappa for `direction: class_mean`, `kappa: fitted` and `kappa: matched`)."""

from __future__ import annotations

import torch

from penrun.core.penultimate import fit_kappa_from_activations

NUM_QUANTILES = 101


def activation_statistics(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Norm statistics (mean, std, quantiles of |h|) and the vMF fit of h/|h|, per class."""
    h = h.double()
    norms = h.norm(dim=1)
    probs = torch.linspace(0, 1, NUM_QUANTILES, dtype=h.dtype)
    quantiles = torch.zeros(num_classes, NUM_QUANTILES, dtype=h.dtype)
    mean, std = torch.zeros(num_classes, dtype=h.dtype), torch.zeros(num_classes, dtype=h.dtype)
    for k in range(num_classes):
        class_norms = norms[y == k]
        if len(class_norms):
            quantiles[k] = torch.quantile(class_norms, probs)
            mean[k], std[k] = class_norms.mean(), class_norms.std(correction=0)
    fit = fit_kappa_from_activations(h, y, num_classes)
    return {
        "norm_mean": mean,
        "norm_std": std,
        "norm_quantiles": quantiles,
        "count": fit["count"],
        "mean_resultant_length": fit["mean_resultant_length"],
        "fitted_kappa": fit["fitted_kappa"],
        "mean_direction": fit["mean_direction"],
    }
