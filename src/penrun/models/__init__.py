"""Networks: classifiers (teachers, students, evaluators) from penrun, torchvision or timm, and
generative models."""

from penrun.models.classifiers import (
    ARCHITECTURES,
    Classifier,
    CosineHead,
    LinearHead,
)
from penrun.models.hooked import HookedClassifier
from penrun.models.networks import SOURCES, build_classifier

__all__ = [
    "ARCHITECTURES",
    "SOURCES",
    "Classifier",
    "CosineHead",
    "HookedClassifier",
    "LinearHead",
    "build_classifier",
]
