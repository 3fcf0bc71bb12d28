"""penrun: the von Mises-Fisher model of penultimate activations, as an experiment runner.

from penrun import PenultimateModel, VonMisesFisher
model = PenultimateModel.from_classifier(net)          # net.head: cosine or linear
activations, labels = model.sample(1000, balanced=True)
"""

from penrun import sweeps  # noqa: F401 (registers the run_key resolver that names run folders)
from penrun.errors import ConfigError
from penrun.penultimate import PenultimateModel
from penrun.vmf import VonMisesFisher, fit_kappa, log_bessel_iv, log_vmf_normalizer, mean_cosine, sample_vmf

__all__ = [
    "ConfigError",
    "PenultimateModel",
    "VonMisesFisher",
    "fit_kappa",
    "log_bessel_iv",
    "log_vmf_normalizer",
    "mean_cosine",
    "sample_vmf",
]
__version__ = "0.1.0"
