"""penrun: the von Mises-Fisher model of penultimate activations, as a library and an
experiment runner (the `penrun` command, in penrun.app).

from penrun import PenultimateModel, VonMisesFisher
model = PenultimateModel.from_classifier(net)          # net.head: cosine or linear
activations, labels = model.sample(1000, balanced=True)

The names below are loaded on first use (PEP 562), so that the command line composes its
config, answers --help and tab completion without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from penrun.core.bessel import fit_kappa, log_bessel_iv, log_vmf_normalizer, mean_cosine
    from penrun.core.penultimate import EmpiricalRadius, PenultimateModel
    from penrun.core.vmf import VonMisesFisher, sample_vmf

_EXPORTS = {
    "EmpiricalRadius": "penrun.core.penultimate",
    "PenultimateModel": "penrun.core.penultimate",
    "VonMisesFisher": "penrun.core.vmf",
    "fit_kappa": "penrun.core.bessel",
    "log_bessel_iv": "penrun.core.bessel",
    "log_vmf_normalizer": "penrun.core.bessel",
    "mean_cosine": "penrun.core.bessel",
    "sample_vmf": "penrun.core.vmf",
}
__all__ = [
    "EmpiricalRadius",
    "PenultimateModel",
    "VonMisesFisher",
    "fit_kappa",
    "log_bessel_iv",
    "log_vmf_normalizer",
    "mean_cosine",
    "sample_vmf",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'penrun' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
