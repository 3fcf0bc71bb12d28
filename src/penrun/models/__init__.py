"""Networks: classifiers (teachers, students, evaluators) and generative models."""

from penrun.models.classifiers import (
    ARCHITECTURES,
    Classifier,
    CosineHead,
    LinearHead,
    build_classifier,
)

__all__ = ["ARCHITECTURES", "Classifier", "CosineHead", "LinearHead", "build_classifier"]
