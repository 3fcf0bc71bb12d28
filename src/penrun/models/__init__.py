"""Networks: classifiers (teachers, students, evaluators) and generative models."""

from penrun.models.classifiers import (
    ARCHITECTURES,
    Classifier,
    CosineHead,
    LinearHead,
    build_classifier,
)
from penrun.models.hooked import HookedClassifier

__all__ = ["ARCHITECTURES", "Classifier", "CosineHead", "HookedClassifier", "LinearHead", "build_classifier"]
