"""penrun: the von Mises-Fisher model of penultimate activations, as a library and an
experiment runner (the `penrun` command, in penrun.app). Importing penrun loads torch only.

from penrun import PenultimateModel, VonMisesFisher
model = PenultimateModel.from_classifier(net)          # net.head: cosine or linear
activations, labels = model.sample(1000, balanced=True)
"""

from penrun.core.bessel import fit_kappa, log_bessel_iv, log_vmf_normalizer, mean_cosine
from penrun.core.penultimate import EmpiricalRadius, PenultimateModel
from penrun.core.vmf import VonMisesFisher, sample_vmf

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
