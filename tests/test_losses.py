"""penrun.core.losses: the distillation losses against closed forms, numpy and scipy.

The synthetic terms are checked on a teacher whose synthetic activations are certain to be
classified as their own class: orthogonal class directions with |w_k| = 1e4, so kappa = 1e4
and every drawn activation a lies within ~0.01 of its class direction e_y, where the teacher's
logits differ by ~1e4 and its softened targets are one-hot(y) to float64 precision. The
values are then closed forms in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from penrun.core.losses import (
    LOSSES,
    DistillBatch,
    DistillSetup,
    class_similarity,
    entropy,
    soft_cross_entropy,
    synthetic_soft_targets,
)
from penrun.core.penultimate import PenultimateModel

K = 3


TAU = 2.0


STUDENT_SCALE = 2.0  # the student's head: logits = 2 a


class Net(nn.Module):
    """features(x) = x @ A; head = a linear layer without bias of the given weight (float64)."""

    def __init__(self, features: np.ndarray, head: np.ndarray):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(features))
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(head))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a


X = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, 1.0], [-1.0, 1.0, 0.5], [0.5, -0.5, 2.0]])


STUDENT_A = np.array([[0.5, 1.0, 0.0], [-1.0, 0.0, 0.5], [0.0, 2.0, 1.0]])


def sharp_batch(y: torch.Tensor | None, similarity_weight: np.ndarray | None = None) -> DistillBatch:
    teacher = Net(np.eye(3), 1e4 * np.eye(K))
    student = Net(STUDENT_A, STUDENT_SCALE * np.eye(K))
    weight = teacher.head.weight.detach()
    setup = DistillSetup(
        teacher=teacher,
        model=PenultimateModel.from_head(weight),
        tau=TAU,
        similarity=class_similarity(
            torch.tensor(1e4 * np.eye(K) if similarity_weight is None else similarity_weight)
        ),
        dirichlet_beta=1e8,
        smooth_epsilon=0.1,
        synthetic_batch=64,
        generator=torch.Generator().manual_seed(0),
    )
    return DistillBatch(setup, student, torch.tensor(X), y)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def student_logits() -> np.ndarray:
    return STUDENT_SCALE * (X @ STUDENT_A)


def kl_loss(targets: np.ndarray, logits: np.ndarray, tau: float) -> float:
    """tau^2 KL(targets || softmax(logits / tau)), batch mean, 0 log 0 = 0."""
    log_q = np_log_softmax(logits / tau)
    safe = np.where(targets > 0, targets, 1.0)
    return tau**2 * (targets * (np.log(safe) - log_q)).sum(1).mean()


def draws_only_from(setup: DistillSetup, term: str, batch: DistillBatch) -> torch.Tensor:
    """The term's value; it must draw from the setup's generator and leave the global one alone
    (a resumed run restores the generator; the global state is not the term's to use)."""
    before, generator_before = torch.get_rng_state(), setup.generator.get_state()
    value = LOSSES[term](batch)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(setup.generator.get_state(), generator_before)
    return value


@pytest.mark.mutation
@pytest.mark.parametrize("labelled", [True, False])
def test_synthetic_targets_term_is_the_cross_entropy_to_the_own_class(labelled: bool) -> None:
    """Targets one-hot(class): the term is tau^2 * mean(-log softmax(s / tau)[class]); the class
    is the label, or the teacher's argmax (here argmax of x, teacher logits = 1e4 x)."""
    y = torch.tensor([2, 0, 1, 1])
    b = sharp_batch(y if labelled else None)
    classes = y.numpy() if labelled else X.argmax(1)
    assert not np.array_equal(classes, y.numpy()) or labelled  # the two cases differ
    value = draws_only_from(b.setup, "synthetic_targets", b)
    expected = TAU**2 * -np_log_softmax(student_logits() / TAU)[np.arange(4), classes].mean()
    assert value.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.mutation
def test_synthetic_head_term_on_activations_of_random_classes() -> None:
    """The student's head 2 a on a ~ e_y with target one-hot(y): whatever the drawn classes,
    tau^2 * log(1 + (K-1) exp(-2/tau)) (the activations' spread of ~0.01 moves it < 1 %)."""
    b = sharp_batch(torch.tensor([0, 1, 2, 0]))
    value = draws_only_from(b.setup, "synthetic_head", b)
    expected = TAU**2 * math.log(1 + (K - 1) * math.exp(-STUDENT_SCALE / TAU))
    assert value.item() == pytest.approx(expected, rel=1e-2)


def np_class_similarity(w: np.ndarray) -> np.ndarray:
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = unit @ unit.T
    low, high = cos.min(1, keepdims=True), cos.max(1, keepdims=True)
    return np.maximum((cos - low) / (high - low), 1e-3)


# rows of unequal norms whose least similar partners differ from row to row
SIMILARITY_W = np.array([[3.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 0.0], [-1.0, 0.2, 2.0]])


@pytest.mark.mutation
def test_class_similarity_against_numpy() -> None:
    sim = class_similarity(torch.tensor(SIMILARITY_W)).numpy()
    np.testing.assert_allclose(sim, np_class_similarity(SIMILARITY_W), rtol=1e-12)
    assert sim.min() == pytest.approx(1e-3)  # the floor: each row's least similar class


@pytest.mark.mutation
def test_dirichlet_term_at_a_large_concentration_is_kl_to_the_mean() -> None:
    """Dir(beta * sim[y]) with beta = 1e8 is its mean sim[y] / sum to ~1e-4."""
    y = torch.tensor([2, 0, 3, 1])
    b = sharp_batch(y, SIMILARITY_W)
    sim = np_class_similarity(SIMILARITY_W)[y.numpy()]
    student = np.concatenate([student_logits(), np.zeros((4, 1))], axis=1)  # a 4th class
    b.student.head = nn.Linear(3, 4, bias=False, dtype=torch.float64)
    with torch.no_grad():
        b.student.head.weight.copy_(torch.tensor(STUDENT_SCALE * np.eye(4, 3)))
    expected = kl_loss(sim / sim.sum(1, keepdims=True), student, TAU)
    assert LOSSES["dirichlet"](b).item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.mutation
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_cross_entropy_scales_with_tau_squared(tau: float) -> None:
    logits = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    targets = np.array([[0.2, 0.5, 0.3], [0.0, 0.9, 0.1]])
    value = soft_cross_entropy(torch.tensor(logits), torch.tensor(targets), tau).item()
    assert value == pytest.approx(kl_loss(targets, logits, tau), rel=1e-12)


@pytest.mark.mutation
def test_entropy_is_taken_over_the_last_axis() -> None:
    p = np.array([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], [[1.0, 0.0, 0.0], [0.1, 0.1, 0.8]]])
    np.testing.assert_allclose(entropy(torch.tensor(p)).numpy(), stats.entropy(p, axis=-1), rtol=1e-12)
    assert entropy(torch.tensor([0.25] * 4, dtype=torch.float64)).item() == pytest.approx(
        math.log(4), rel=1e-12
    )


@pytest.mark.mutation
def test_synthetic_activations_of_a_linear_head_have_the_class_radius() -> None:
    """space="input": the head's input r a, here |h| = 3 for every class."""
    head = Net(np.eye(3), np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    model = PenultimateModel.from_head(head.head.weight.detach(), radius=3.0)
    y = torch.tensor([0, 1, 1, 0])
    a, targets = synthetic_soft_targets(model, head, y, TAU, torch.Generator().manual_seed(1))
    np.testing.assert_allclose(a.norm(dim=1).numpy(), 3.0, rtol=1e-12)
    np.testing.assert_allclose(targets.sum(1).numpy(), 1.0, rtol=1e-12)
