"""task=distill: each loss term on its own, both protocols end to end, the bad-input errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from penrun.app import schema
from penrun.app.config import trainer_settings
from penrun.app.errors import ConfigError
from penrun.app.tasks import distill
from penrun.app.tasks.distill import (
    Outcome,
    Protocol,
    StudentExamples,
    final_metrics,
    held_out_indices,
    student_examples,
)
from penrun.core.losses import (
    LOSSES,
    DistillBatch,
    DistillSetup,
    class_similarity,
    dirichlet_targets,
    entropy,
    matched_smoothing,
    smoothed_targets,
    soft_cross_entropy,
    synthetic_soft_targets,
    total_loss,
)
from penrun.core.penultimate import PenultimateModel
from penrun.data import ImageData, labelled_subset, shift_images
from penrun.data.corruptions import corrupt_images
from penrun.models import build_classifier
from penrun.models.classifiers import CosineHead
from penrun.train.checkpoint import CHECKPOINT_FORMAT
from penrun.train.files import save_torch
from penrun.train.run_folder import RunFolder

from conftest import Teachers, compose_config, run_main, run_task

QUICK_DISTILL = [
    "task=distill",
    "trainer.max_epochs=2",
    "teacher_trainer.max_epochs=3",
    "teacher_trainer.progress=false",
]


@pytest.fixture
def digits_teacher(digits_teachers: Teachers) -> str:
    """The shared digits teacher (conftest: mlp, cosine head, 4 epochs), as an override. A
    mutation run of distill.py may name one trained beforehand by task=train_teacher (which no
    mutant of distill.py changes) in PENRUN_TEST_TEACHER, instead of training it per mutant."""
    return f"teacher_ckpt={os.environ.get('PENRUN_TEST_TEACHER') or digits_teachers['cosine']}"


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    net = build_classifier("mlp", channels=1, image_size=8, num_classes=10, penultimate_dim=16)
    return net.eval()


def test_synthetic_targets_are_the_teacher_head_on_the_drawn_activations(teacher) -> None:
    model = PenultimateModel.from_classifier(teacher)
    y = torch.arange(10).repeat(5)
    a, targets = synthetic_soft_targets(model, teacher, y, 4.0, torch.Generator().manual_seed(1))
    expected = F.softmax(teacher.head(a) / 4.0, dim=1)
    assert torch.allclose(targets, expected, atol=1e-7)
    assert torch.allclose(a.norm(dim=1), torch.ones(50), atol=1e-5)  # a cosine head: unit activations
    # The same generator seed gives the same draw; a synthetic a of class y mostly scores y.
    a2, _ = synthetic_soft_targets(model, teacher, y, 4.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, a2)


def test_dirichlet_targets_mean_is_the_normalized_class_similarity(teacher) -> None:
    sim = class_similarity(teacher.head.effective_weight().detach())
    assert sim.shape == (10, 10) and torch.allclose(sim.diagonal(), torch.ones(10))
    torch.manual_seed(0)
    y = torch.full((20000,), 3)
    targets = dirichlet_targets(sim, y, beta=2.0)
    expected = sim[3] / sim[3].sum()
    # Standard error of each mean is at most sqrt(p(1-p)/(n(beta*sum+1))) < 0.004.
    assert torch.allclose(targets.mean(0), expected, atol=0.004)
    assert torch.allclose(targets.sum(1), torch.ones(20000), atol=1e-5)


def test_smoothing_matches_the_requested_entropy() -> None:
    eps = matched_smoothing(1.2, 10)
    targets = smoothed_targets(torch.tensor([0, 4]), 10, eps)
    assert entropy(targets).tolist() == pytest.approx([1.2, 1.2], abs=1e-6)
    assert targets[1, 4] == pytest.approx(1 - eps) and targets[1, 0] == pytest.approx(eps / 9)
    assert matched_smoothing(10.0, 10) == pytest.approx(0.9, abs=1e-3)  # capped at uniform


def test_soft_cross_entropy_is_tau_squared_kl() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    targets = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    p = F.softmax(logits / 2.0, dim=1)
    kl = (targets * (targets / p).log()).sum()
    assert soft_cross_entropy(logits, targets, 2.0).item() == pytest.approx(4 * kl.item(), rel=1e-12)


def test_unlabeled_protocol_on_shifted_digits(tmp_path: Path, digits_teacher: str) -> None:
    metrics = run_task(
        [
            *QUICK_DISTILL,
            digits_teacher,
            "transfer.shift=rotate",
            "transfer.shift_strength=20",
            f"paths.output_dir={tmp_path}",
        ],
        tmp_path / "run",
    )
    assert metrics["task"] == "distill" and metrics["method"] == "kd+synthetic_head+feature"
    assert metrics["transfer"] == "digits+rotate(20)" and metrics["labels"] == "none"
    # The unlabeled protocol's curve is the source test set, every epoch; the transfer test set
    # is evaluated once, at the end.
    history = metrics["history"]
    assert [sorted(k for k in row if k.endswith("_acc")) for row in history] == [["source_acc"]] * 2
    assert set(metrics["stability"]) == {"source"} and "best_transfer_acc" not in metrics
    assert metrics["source_acc"] == history[-1]["source_acc"]
    # The epoch is chosen by agreement with the teacher on 10 held-out transfer images per class,
    # never on a test set; those images are not in the student's transfer set.
    agreement = [row["val_agreement"] for row in history]
    assert metrics["selected_epoch"] == agreement.index(max(agreement)) + 1
    assert metrics["selected_source_acc"] == history[metrics["selected_epoch"] - 1]["source_acc"]
    assert metrics["val_size"] == 100 and metrics["transfer_train_size"] == 1437 - 100
    # Two epochs from the teacher's outputs alone lift the student far above chance (0.1).
    assert metrics["teacher_source_acc"] > 0.8
    assert metrics["source_acc"] > 0.5 and metrics["transfer_acc"] > 0.3


@pytest.mark.parametrize("method", ["ce_synthetic_targets", "ce_dirichlet", "ce_smooth", "kd_feature"])
def test_labelled_protocol_each_method_runs(tmp_path: Path, method: str, digits_teacher: str) -> None:
    labels = "distill.labels=5" if method != "kd_feature" else "distill.labels=none"
    metrics = run_task(
        [*QUICK_DISTILL, digits_teacher, f"method={method}", labels, f"paths.output_dir={tmp_path}"],
        tmp_path / "run",
    )
    assert metrics["method"] == method.replace("ce_", "ce+").replace("kd_", "kd+")
    if labels == "distill.labels=5":
        assert metrics["transfer_train_size"] == 50


def test_mnist_to_usps_from_the_offline_folder(tmp_path: Path, data_dir: Path) -> None:
    metrics = run_task(
        [
            *QUICK_DISTILL,
            "pair=mnist_usps",  # mnist -> usps, lenet5 -> lenet5_half
            "student.penultimate_dim=64",
            "data.limit_train=2000",
            "data.limit_test=500",
            "transfer.limit_train=500",
            "transfer.limit_test=300",
            "method=ce_kd",
            "distill.labels=all",
            f"paths.output_dir={tmp_path}",
        ],
        tmp_path / "run",
        data_dir,
    )
    assert metrics["source"] == "mnist" and metrics["transfer"] == "usps"
    # 10 transfer images per class are held out to validate on.
    assert metrics["transfer_train_size"] == 500 - 100 and metrics["val_size"] == 100
    assert metrics["teacher_source_acc"] > 0.7


@pytest.mark.parametrize(("value", "option"), [(None, None), ("none", None), ("all", "all"), (1, 1), (7, 7)])
def test_the_labels_option_is_none_all_or_a_count(value: Any, option: Any) -> None:
    assert distill.labels_option(value) == option


@pytest.mark.parametrize("value", [0, -1, True, "ALL", 2.5])
def test_other_labels_options_are_refused(value: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        distill.labels_option(value)
    assert str(refused.value) == (
        f"distill.labels={value!r} is invalid: use none, all, or a number of labels per class >= 1"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["distill.losses.kd=0", "distill.losses.synthetic_head=0", "distill.losses.feature=0"],
            rf"^all loss weights are zero: set at least one of distill\.losses\.{{{', '.join(LOSSES)}}} > 0$",
        ),
        (
            ["method=ce", "distill.labels=none"],
            r"^distill\.losses\.ce > 0 needs labels, but distill\.labels=none; set distill\.labels=all or N, or ce=0$",
        ),
        (
            ["student.penultimate_dim=8"],
            r"distill.losses.synthetic_head needs the student's penultimate space to match the teacher's: student penultimate_dim=8, teacher penultimate_dim=32",
        ),
        (
            ["method=kd_feature", "student.penultimate_dim=8"],
            r"distill.losses.feature needs .* student penultimate_dim=8, teacher penultimate_dim=32",
        ),
        (["distill.labels=many"], r"distill.labels='many' is invalid: use none, all, or a number"),
        (
            ["distill.labels=1000", "method=ce"],
            r"^distill.labels=1000 asks for more examples per class than there are \(the rarest class has 129\)$",  # 10 per class held out
        ),
        (["distill.losses.kd=-1"], r"^distill.losses.kd=-1.0 is invalid: use a number >= 0"),
        (
            ["transfer.shift=warp"],
            r"^transfer.shift='warp' is invalid; valid: none, invert, rotate, scale, noise, blur, corruption$",
        ),
        (["transfer.shift_strength=0"], r"^transfer.shift_strength=0.0 is invalid: use a number > 0"),
        (
            ["transfer.shift=invert", "transfer.shift_strength=2"],
            r"^transfer.shift_strength=2.0 is invalid for invert: use blend towards the negative image, 0..1 \(> 0\)$",
        ),
    ],
)
def test_bad_distill_settings_stop_before_training(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run_task([*QUICK_DISTILL, *overrides, f"paths.output_dir={tmp_path}"], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "teachers").exists()  # not even the teacher was trained


def test_an_unknown_loss_is_refused(tmp_path: Path) -> None:
    """The schema knows every loss term: an unknown one is refused before anything runs, on
    the command line (Hydra, at composition) and when added with `+` (which Hydra lets through)."""
    proc = run_main(["task=distill", "distill.losses.magic=1", f"hydra.run.dir={tmp_path / 'cli'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "penrun: error: distill.losses.magic" in proc.stderr
    assert not (tmp_path / "cli" / "checkpoints").exists()
    with pytest.raises(
        ConfigError,
        match=r"^distill.losses.magic is not a key of penrun's config; valid: ce, kd, synthetic_targets",
    ):
        run_task(
            [*QUICK_DISTILL, "+distill.losses.magic=1", f"paths.output_dir={tmp_path}"], tmp_path / "run"
        )
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "teachers").exists()


def test_teacher_checkpoint_for_other_data_is_refused(
    tmp_path: Path, data_dir: Path, digits_teacher: str
) -> None:
    with pytest.raises(ConfigError, match=r"does not fit the data: image_size 8 \(data mnist: 28\)"):
        run_task(
            [
                *QUICK_DISTILL,
                "pair=mnist_usps",
                digits_teacher,  # digits, 8x8
            ],
            tmp_path / "run",
            data_dir,
        )


def test_a_teacher_without_the_statistics_its_vmf_needs_is_named(tmp_path: Path, digits_teacher: str) -> None:
    """kappa=fitted needs the activation statistics recorded with the teacher: a checkpoint
    without them is refused with its path and the command that records them."""
    ckpt = torch.load(digits_teacher.partition("=")[2], weights_only=True)
    del ckpt["activation_stats"]
    bare = tmp_path / "bare.pt"
    save_torch(bare, ckpt)
    with pytest.raises(
        ConfigError,
        match=rf"^teacher checkpoint '{re.escape(str(bare))}' cannot define p\(a \| y\): .*"
        rf"record them with: penrun task=record_statistics teacher_ckpt='{re.escape(str(bare))}'",
    ):
        run_task(
            [*QUICK_DISTILL, f"teacher_ckpt={bare}", "vmf.kappa=fitted", f"paths.output_dir={tmp_path}"],
            tmp_path / "run",
        )


def test_transfer_labels_outside_the_teachers_classes_are_refused(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "wide.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8),
        y_train=np.arange(30) % 12,
        x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        y_test=np.arange(12),
    )
    with pytest.raises(ConfigError, match=r"transfer set npz has label 11, outside the teacher's 10 classes"):
        run_task(
            [
                *QUICK_DISTILL,
                "data@transfer=npz",
                f"transfer.path={path}",
                "transfer.shift=none",
                f"paths.output_dir={tmp_path}",
            ],
            tmp_path / "run",
        )


def test_every_loss_is_registered() -> None:
    assert set(LOSSES) == {
        "ce",
        "kd",
        "synthetic_targets",
        "synthetic_head",
        "feature",
        "dirichlet",
        "smooth",
    }


# ---------------------------------------------------------------- torchvision-only pairs, offline
def write_svhn(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SVHN's own format: train_32x32.mat / test_32x32.mat, X (32,32,3,N), labels 1..10 (10 = 0)."""
    import hashlib

    import numpy as np
    import torchvision
    from scipy.io import savemat

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    split_list = {}
    for split, n in (("train", 40), ("test", 20)):
        name = f"{split}_32x32.mat"
        savemat(
            root / name,
            {
                "X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                "y": (np.arange(n) % 10 + 1)[:, None],
            },
        )
        md5 = hashlib.md5((root / name).read_bytes()).hexdigest()
        split_list[split] = [torchvision.datasets.SVHN.split_list[split][0], name, md5]
    # torchvision checks the real files' MD5s; these files are ours.
    monkeypatch.setattr(torchvision.datasets.SVHN, "split_list", split_list)


def write_stl10(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """STL-10's binary format: stl10_binary/{train,test}_{X,y}.bin, (N,3,96,96) column-major, labels 1..10."""
    import numpy as np
    import torchvision

    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", 30), ("test", 20)):
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "unlabeled_X.bin").write_bytes(b"")
    stl = torchvision.datasets.STL10
    monkeypatch.setattr(stl, "train_list", [[name, None] for name, _ in stl.train_list])
    monkeypatch.setattr(stl, "test_list", [[name, None] for name, _ in stl.test_list])


def test_mnist_to_svhn_through_torchvision_files(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_svhn(tmp_path / "cache" / "svhn", monkeypatch)
    metrics = run_task(
        [
            *QUICK_DISTILL,
            "distill.val_per_class=1",  # the tiny transfer sets have a few images of some classes
            "data=mnist",
            "data.limit_train=1000",
            "data.limit_test=200",
            "data@transfer=svhn",
            "transfer.shift=none",
            "transfer.download=false",
            "net@teacher=lenet5",
            "net@student=lenet5_half",
            "method=kd",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path}",
        ],
        tmp_path / "run",
        data_dir,
    )
    # One image per class is held out to validate on.
    assert metrics["transfer"] == "svhn" and metrics["transfer_train_size"] == 40 - 10


def test_cifar10_to_stl10_aligns_the_classes(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stl10(tmp_path / "cache" / "stl10", monkeypatch)
    metrics = run_task(
        [
            *QUICK_DISTILL,
            "distill.val_per_class=1",  # the tiny transfer sets have a few images of some classes
            "data=cifar10",
            "data.limit_train=500",
            "data.limit_test=200",
            "data@transfer=stl10",
            "transfer.shift=none",
            "transfer.download=false",
            "net@teacher=resnet8",
            "net@student=resnet8",
            "method=kd",
            "teacher_trainer.max_epochs=1",
            "trainer.max_epochs=1",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path}",
        ],
        tmp_path / "run",
        data_dir,
    )
    # STL-10's monkeys (label 7) have no CIFAR-10 class: 3 of the 30 training images drop out.
    # Without labels, val_per_class (1) x the teacher's 10 classes are held out to validate on.
    assert metrics["transfer"] == "stl10" and metrics["transfer_train_size"] == 27 - 10


def test_align_classes_maps_stl10_into_cifar10() -> None:
    from penrun.data import ImageData, align_classes

    y = torch.arange(10)
    data = ImageData(
        "stl10",
        torch.zeros(10, 3, 4, 4, dtype=torch.uint8),
        y,
        torch.zeros(10, 3, 4, 4, dtype=torch.uint8),
        y,
        10,
        "test",
    )
    aligned = align_classes(data, "cifar10")
    assert aligned.y_train.tolist() == [0, 2, 1, 3, 4, 5, 7, 8, 9]  # car <-> bird swapped, no monkey
    assert align_classes(data, "mnist") is data


def test_synthetic_activations_are_classified_as_their_class():
    """An activation drawn for class y is classified as y by the teacher's cosine head
    (s = 16, ten random unit directions in d = 64) in most draws: about 0.66 of them,
    against 0.1 by chance, so >= 0.5 cannot pass by accident (sampling sd ~0.02). Fails if
    activations are drawn for class (y + 1) % K."""
    g = torch.Generator().manual_seed(0)
    head = CosineHead(64, 10, scale=16.0)
    with torch.no_grad():
        head.weight.copy_(torch.randn(10, 64, generator=g))
    teacher = nn.Module()
    teacher.head = head
    model = PenultimateModel.from_head(head.effective_weight().detach(), None, radius=1.0)
    y = torch.arange(500) % 10
    a, targets = synthetic_soft_targets(model, teacher, y, 4.0, g)
    with torch.no_grad():
        hits = (head(a).argmax(1) == y).float().mean().item()
    assert hits >= 0.5
    assert (targets.argmax(1) == y).float().mean().item() >= 0.5
    np.testing.assert_allclose(targets.sum(1).numpy(), 1.0, rtol=1e-6)


class _Toy(nn.Module):
    """A fixed classifier: features(x) = x @ A, head = a linear layer with given weights."""

    def __init__(self, features: list[list[float]], head_w: list[list[float]], head_b: list[float]):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(features, dtype=torch.float64))
        self.head = nn.Linear(len(head_w[0]), len(head_w), dtype=torch.float64)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(head_w, dtype=torch.float64))
            self.head.bias.copy_(torch.tensor(head_b, dtype=torch.float64))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a


def _toy_batch(y: torch.Tensor | None, tau: float = 2.0, epsilon: float = 0.1) -> DistillBatch:
    teacher = _Toy(
        [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]], [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.0, 0.5, -1.0]
    )
    student = _Toy(
        [[0.5, 1.0], [-1.0, 0.0], [0.0, 2.0]], [[1.0, -1.0], [0.5, 0.5], [0.0, 1.0]], [0.1, 0.0, 0.2]
    )
    weight = teacher.head.weight.detach()
    setup = DistillSetup(
        teacher=teacher,
        model=PenultimateModel.from_head(weight, teacher.head.bias.detach()),
        tau=tau,
        similarity=class_similarity(weight),
        dirichlet_beta=1.0,
        smooth_epsilon=epsilon,
        synthetic_batch=4,
        generator=torch.Generator().manual_seed(0),
    )
    x = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [-1.0, 1.0, 0.5], [0.5, -0.5, 2.0]], dtype=torch.float64
    )
    return DistillBatch(setup, student, x, y)


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _np_outputs(b: DistillBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(teacher features, teacher logits, student features, student logits) in numpy."""
    x = b.x.numpy()
    out = []
    for net in (b.setup.teacher, b.student):
        f = x @ net.a.detach().numpy()
        out += [f, f @ net.head.weight.detach().numpy().T + net.head.bias.detach().numpy()]
    return out[0], out[1], out[2], out[3]


def test_loss_terms_on_a_hand_built_case():
    """kd = tau^2 KL(softmax(t/tau) || softmax(s/tau)), feature = 1 - mean cosine, ce, and
    total_loss = sum of weight * term, all against numpy. Fails if kd drops tau^2, swaps the
    KL's arguments or softens only one side; if feature uses the cosine over the batch axis;
    or if total_loss ignores the weights."""
    tau = 2.0
    y = torch.tensor([0, 2, 1, 1])
    b = _toy_batch(y, tau)
    ft, lt, fs, ls = _np_outputs(b)
    log_pt, log_ps = _np_log_softmax(lt / tau), _np_log_softmax(ls / tau)
    kd = tau**2 * (np.exp(log_pt) * (log_pt - log_ps)).sum(1).mean()
    cos = (ft * fs).sum(1) / np.linalg.norm(ft, axis=1) / np.linalg.norm(fs, axis=1)
    feature = 1 - cos.mean()
    ce = -_np_log_softmax(ls)[np.arange(4), y.numpy()].mean()
    assert LOSSES["kd"](b).item() == pytest.approx(kd, rel=1e-10)
    assert LOSSES["feature"](b).item() == pytest.approx(feature, rel=1e-10)
    assert LOSSES["ce"](b).item() == pytest.approx(ce, rel=1e-10)
    total, logs = total_loss(b, {"kd": 0.5, "feature": 2.0, "ce": 0.25, "smooth": 0.0})
    assert total.item() == pytest.approx(0.5 * kd + 2.0 * feature + 0.25 * ce, rel=1e-10)
    assert set(logs) == {"kd", "feature", "ce"}
    assert logs["kd"].item() == pytest.approx(kd, rel=1e-10)


def test_unlabeled_classes_are_the_teachers_argmax():
    """With y None the classes are the teacher's argmax (computed in numpy), and the smooth
    term is tau^2 KL(smoothed(argmax) || softmax(s/tau)) by hand. Fails if the unlabeled
    classes come from the student's logits or from the teacher's argmin."""
    tau, eps = 2.0, 0.1
    b = _toy_batch(None, tau, eps)
    _, lt, _, ls = _np_outputs(b)
    classes = lt.argmax(1)
    assert len(set(classes)) > 1 and not np.array_equal(classes, ls.argmax(1))
    assert b.classes.tolist() == classes.tolist()
    targets = np.full((4, 3), eps / 2)
    targets[np.arange(4), classes] = 1 - eps
    log_ps = _np_log_softmax(ls / tau)
    smooth = tau**2 * (targets * (np.log(targets) - log_ps)).sum(1).mean()
    assert LOSSES["smooth"](b).item() == pytest.approx(smooth, rel=1e-6)


# ---------------------------------------------------------------- which examples train, which validate
def numbered(labels: list[int]) -> ImageData:
    """Three classes whose training image i carries its index i in two pixels (i // 256, i % 256),
    so that any example drawn can be traced back to its place in the split and its label."""
    y = torch.tensor(labels)
    n = len(y)
    x = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = torch.arange(n) // 256, torch.arange(n) % 256
    return ImageData("numbered", x, y, x[:3].clone(), y[:3].clone(), 3, "test")


def indices(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()


# 30, 25 and 40 examples of classes 0, 1, 2, shuffled.
UNBALANCED = np.random.default_rng(0).permutation([0] * 30 + [1] * 25 + [2] * 40).tolist()


def examples_of(data: ImageData, labels: int | str | None, rule: str, seed: int = 0) -> StudentExamples:
    """A student's examples with 4 held-out images per class of the three (12 seeded ones)."""
    return student_examples(data, labels, held_out_indices(data, rule, 4, 3), seed)


def test_validation_examples_are_never_trained_on_in_either_protocol() -> None:
    """12 held-out examples (4 of each class when balanced); the student trains on the others (all
    of them with labels=all or none, 5 per class with labels=5), never on a held-out one, and
    each example keeps its own label. Without labels no label comes back at all. Fails if the
    held-out examples stay in the pool, if the training set is drawn from the whole split, if
    the seeded set holds out per_class images instead of per_class x classes, or if a label is
    paired with another example."""
    data = numbered(UNBALANCED)
    y = np.array(UNBALANCED)
    cases = [(None, "seeded", 95 - 12), ("all", "balanced", 95 - 12), (5, "balanced", 15), (5, "seeded", 15)]
    for labels, rule, train_size in cases:
        examples = examples_of(data, labels, rule)
        train, val = indices(examples.x_train), indices(examples.x_val)
        assert not set(train) & set(val) and len(set(train)) == train_size == len(train)
        assert len(set(val)) == len(val) == 12
        if rule == "balanced":
            assert np.bincount(y[val], minlength=3).tolist() == [4, 4, 4]
        if labels is None:
            assert examples.y_train is None and examples.y_val is None
            assert sorted(train + val) == list(range(95))
        else:
            assert examples.y_train.tolist() == y[train].tolist()
            assert examples.y_val.tolist() == y[val].tolist()
            assert np.bincount(y[train], minlength=3).tolist() == ([5, 5, 5] if labels == 5 else [26, 21, 36])


def test_the_seeded_held_out_set_reads_no_label() -> None:
    """The unlabeled protocol's held-out images: 4 x 3 of them, the same whatever the labels say
    (garbage, or none at all as in a flat folder of images: the same images a flat folder held
    out before the rule existed, by labelled_subset of label -1), and whatever the run's seed;
    a set larger than the training split is refused naming the option. Fails if the seeded set
    is balanced by the labels, drawn with the run's seed, or of another size."""
    data = numbered(UNBALANCED)
    garbage = dataclasses.replace(
        data, y_train=torch.randint(0, 3, (95,), generator=torch.Generator().manual_seed(5))
    )
    flat = dataclasses.replace(data, y_train=torch.full((95,), -1))
    held = held_out_indices(data, "seeded", 4, 3)
    assert torch.equal(held, held_out_indices(garbage, "seeded", 4, 3))
    assert torch.equal(held, held_out_indices(flat, "seeded", 4, 3))
    assert torch.equal(held, labelled_subset(flat.y_train, 12, 3, seed=0))
    assert (
        held.tolist() == sorted(set(held.tolist())) and len(held) == 12 and 0 <= held.min() <= held.max() < 95
    )
    assert np.bincount(np.array(UNBALANCED)[held], minlength=3).tolist() != [4, 4, 4]  # not balanced
    assert [indices(examples_of(data, None, "seeded", seed).x_val) for seed in (0, 1)] == [held.tolist()] * 2
    assert len(held_out_indices(data, "seeded", 2, 10)) == 20
    with pytest.raises(ConfigError, match=r"^distill.val_per_class=32 holds out 96 images \(32 x 3 classes\), "
                       r"more than the 95 training images of numbered$"):  # fmt: skip
        held_out_indices(data, "seeded", 32, 3)
    assert len(held_out_indices(data, "seeded", 31, 3)) == 93


def test_the_labelled_subset_is_class_balanced_and_drawn_with_the_seed() -> None:
    """labels=5: 5 examples of each class, a different draw for each seed, while the held-out
    examples stay the same for every seed (each run validates on the same set). Fails if the
    seed is ignored, or the validation set is drawn with it."""
    data = numbered(UNBALANCED)
    y = np.array(UNBALANCED)
    draws = [examples_of(data, 5, "balanced", seed) for seed in (0, 1, 2)]
    for examples in draws:
        assert np.bincount(y[indices(examples.x_train)], minlength=3).tolist() == [5, 5, 5]
    assert len({tuple(indices(e.x_train)) for e in draws}) == 3
    assert len({tuple(indices(e.x_val)) for e in draws}) == 1


def test_runs_stored_before_the_held_out_rule_are_another_config_only_without_labels() -> None:
    """A run stored before distill.held_out existed held out a class-balanced set in both
    protocols: a labelled one is still the same config (reused), an unlabeled one is another
    (refused, or rerun with rerun=true), and held_out=balanced without labels is refused. Fails if
    the key's default ignores the protocol, or if stored runs lacking it count as seeded."""
    from penrun.app.config import run_config
    from penrun.app.schema import IDENTITY_DEFAULTS
    from penrun.train.run_folder import config_difference

    for labels, held_out, differs in (
        ("none", "seeded", True),
        (5, "balanced", False),
        ("all", "balanced", False),
    ):
        new = run_config(compose_config(["task=distill", f"distill.labels={labels}"]))
        assert new["distill"]["held_out"] == held_out
        old = json.loads(json.dumps(new))
        del old["distill"]["held_out"]
        expected = ["distill.held_out: 'balanced' -> 'seeded'"] if differs else []
        assert config_difference(old, new, IDENTITY_DEFAULTS) == expected
    with pytest.raises(ConfigError) as refused:
        distill.check_options(compose_config(["task=distill", "distill.held_out=balanced"]))
    assert str(refused.value) == (
        "distill.held_out=balanced reads transfer labels, which the unlabeled protocol "
        "(distill.labels=none) must not; use distill.held_out=seeded"
    )
    distill.check_options(compose_config(["task=distill", "distill.labels=3", "distill.held_out=seeded"]))


# ---------------------------------------------------------------- which epoch is selected, and its score
def outcome(labelled: bool, history: list[dict[str, Any]], selected_score: float = 0.4) -> Outcome:
    images = numbered([0, 1, 2])
    source, transfer = dataclasses.replace(images, name="src"), dataclasses.replace(images, name="dst")
    return Outcome(
        protocol=Protocol(source, transfer, labelled=labelled),
        weights={"ce": 1.0, "kd": 0.5, "feature": 0.0},
        labels=5 if labelled else "none",
        train_size=50,
        val_size=30,
        teacher_path=Path("teacher.pt"),
        teacher_accs={"teacher_source_acc": 0.9, "teacher_transfer_acc": 0.6},
        history=history,
        selected_score=selected_score,
        other_domain_acc=0.42,
    )


def test_the_epoch_is_selected_on_validation_even_where_the_test_set_disagrees() -> None:
    """Crafted histories whose validation score peaks at epoch 2 (tied at 4: the first counts,
    as best.pt keeps it) and whose test accuracy peaks at epoch 3: epoch 2 is selected in both
    protocols, with its test accuracy; the last epoch's is reported apart. Fails if the epoch is
    chosen on the test curve, or the last of equal validation scores is taken."""
    val, test = [0.5, 0.8, 0.6, 0.8], [0.3, 0.4, 0.9, 0.35]
    for labelled, (val_key, test_key, other) in {
        True: ("val_acc", "transfer_acc", "source_acc"),
        False: ("val_agreement", "source_acc", "transfer_acc"),
    }.items():
        history = [
            {"epoch": e + 1, val_key: v, test_key: t} for e, (v, t) in enumerate(zip(val, test, strict=True))
        ]
        run = outcome(labelled, history)
        assert distill.selected_test_score(None, None, history, run.protocol, None) == 0.4
        metrics = final_metrics(run)
        assert metrics["selected_epoch"] == 2
        assert metrics[f"selected_{test_key}"] == 0.4 and metrics[f"best_{val_key}"] == 0.8
        assert metrics[test_key] == 0.35 and metrics[other] == 0.42
        assert metrics["stability"] == {
            test_key.removesuffix("_acc"): pytest.approx({"std_last": np.std(test), "max_drop": 0.55})
        }
        assert metrics["method"] == "ce+kd" and metrics["losses"] == {"ce": 1.0, "kd": 0.5}
        assert (metrics["transfer_train_size"], metrics["val_size"]) == (50, 30)


def test_the_test_split_is_scored_every_test_every_epochs_and_at_the_last() -> None:
    """Epochs 3, 6, 9 and the last (10) of ten with test_every=3; every epoch with 1; only the
    last with a step longer than the run. Fails if the step, the remainder or the last epoch is
    off by one."""
    images = numbered([0, 1, 2])
    scored = {
        every: [
            e for e in range(1, 11) if Protocol(images, images, True, test_every=every).scores_test(e, 10)
        ]
        for every in (1, 3, 10, 11)
    }
    assert scored == {1: list(range(1, 11)), 3: [3, 6, 9, 10], 10: [10], 11: [10]}


def test_the_curve_holds_only_the_scored_epochs() -> None:
    """A history scored at epochs 2 and 4 (test_every=2) whose validation peaks at epoch 3: the
    curve and its stability are those of epochs 2 and 4 alone, the last score is epoch 4's, and
    the selected score is the one given (best.pt's). Fails if a missing score counts as 0, or the
    selected score is read from another row."""
    history = [
        {"epoch": 1, "val_acc": 0.2},
        {"epoch": 2, "val_acc": 0.5, "transfer_acc": 0.7},
        {"epoch": 3, "val_acc": 0.9},
        {"epoch": 4, "val_acc": 0.6, "transfer_acc": 0.4},
    ]
    metrics = final_metrics(outcome(True, history, selected_score=0.65))
    assert (metrics["selected_epoch"], metrics["selected_transfer_acc"], metrics["transfer_acc"]) == (
        3,
        0.65,
        0.4,
    )
    assert metrics["stability"] == {"transfer": pytest.approx({"std_last": 0.15, "max_drop": 0.3})}


# ---------------------------------------------------------------- the options reach the losses
class FirstStep(Exception):
    """Raised at the first loss evaluation: what it was given is all a test needs."""


def first_step(
    overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[DistillBatch, dict[str, float], StudentExamples]:
    """The DistillBatch and weights of a run's first training step, and the run's examples."""
    seen: dict[str, Any] = {}

    def total_loss_stops(batch: DistillBatch, weights: dict[str, float]):
        seen["batch"], seen["weights"] = batch, dict(weights)
        raise FirstStep

    def examples_seen(*args: Any, **kwargs: Any) -> StudentExamples:
        seen["examples"] = student_examples(*args, **kwargs)
        return seen["examples"]

    monkeypatch.setattr(distill, "total_loss", total_loss_stops)
    monkeypatch.setattr(distill, "student_examples", examples_seen)
    with pytest.raises(FirstStep):
        run_task([*QUICK_DISTILL, *overrides, f"paths.output_dir={tmp_path}"], tmp_path / "run")
    return seen["batch"], seen["weights"], seen["examples"]


# Every loss term of the schema on, each with its own weight.
WEIGHTS = {f.name: 0.25 * (i + 2) for i, f in enumerate(dataclasses.fields(schema.LossWeights))}


def test_every_distill_option_reaches_the_losses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_teacher: str
) -> None:
    """A run's first step gets the configured weight of every loss term in the schema, tau,
    dirichlet_beta, the transfer labels of `labels` per class and `val_per_class` held-out
    examples per class; the smoothing matched to the synthetic targets grows with tau (a
    softer softmax has more entropy). Fails if any option is replaced by its default or a
    constant on its way to the loss."""
    options = [
        digits_teacher,
        "student.penultimate_dim=32",  # feature and synthetic_head: the teacher's width
        "distill.labels=5",
        "distill.val_per_class=3",
        "distill.dirichlet_beta=3.5",
        *(f"distill.losses.{name}={w}" for name, w in WEIGHTS.items()),
    ]
    epsilon = {}
    for tau in (2.5, 6.0):
        batch, weights, examples = first_step(
            [*options, f"distill.tau={tau}"], tmp_path / str(tau), monkeypatch
        )
        assert weights == WEIGHTS
        assert batch.setup.tau == tau and batch.setup.dirichlet_beta == 3.5
        assert (len(examples.x_train), len(examples.x_val)) == (50, 30)
        assert batch.y is not None and set(batch.y.tolist()) <= set(examples.y_train.tolist())
        epsilon[tau] = batch.setup.smooth_epsilon
    assert 0 < epsilon[2.5] < epsilon[6.0] < 0.9


def test_the_unlabeled_protocol_reads_no_transfer_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_teacher: str
) -> None:
    """Without labels, a run whose transfer labels are garbage (a random class for every training
    and test image, before anything is held out) gives the same numbers, epoch by epoch; the
    garbage test labels change only the reported transfer accuracies, the evaluation they exist
    for. Fails if the student's steps, the held-out set, the validation agreement or the epoch's
    choice read a transfer label (as the class-balanced held-out set did before distill.held_out)."""
    # Besides the default kd + synthetic_head + feature, the terms that read each example's class.
    classes = [
        "distill.losses.synthetic_targets=1",
        "distill.losses.dirichlet=0.5",
        "distill.losses.smooth=0.5",
    ]
    small = ["transfer.limit_train=300", "transfer.limit_test=200"]
    overrides = [*QUICK_DISTILL, digits_teacher, "distill.labels=none", *classes, *small]
    clean = run_task([*overrides, f"paths.output_dir={tmp_path / 'clean'}"], tmp_path / "clean")
    garbage = torch.Generator().manual_seed(1)

    def scrambled(labels: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, 10, labels.shape, generator=garbage)

    transfer_data = distill.transfer_data

    def garbage_labels(cfg, source: ImageData) -> ImageData:
        transfer = transfer_data(cfg, source)
        return dataclasses.replace(
            transfer, y_train=scrambled(transfer.y_train), y_test=scrambled(transfer.y_test)
        )

    monkeypatch.setattr(distill, "transfer_data", garbage_labels)
    noisy = run_task([*overrides, f"paths.output_dir={tmp_path / 'noisy'}"], tmp_path / "noisy")

    def numbers(metrics: dict[str, Any]) -> dict[str, Any]:
        history = [{k: v for k, v in row.items() if k != "epoch_time"} for row in metrics["history"]]
        left_out = ("history", "transfer_acc", "teacher_transfer_acc")
        return {k: v for k, v in metrics.items() if k not in left_out} | {"history": history}

    assert numbers(noisy) == numbers(clean)
    assert noisy["transfer_acc"] != clean["transfer_acc"]
    assert noisy["teacher_transfer_acc"] != clean["teacher_transfer_acc"]


@pytest.mark.parametrize("labels", ["5", "none"])
def test_validation_scores_the_student_against_labels_or_the_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_teacher: str, labels: str
) -> None:
    """The last epoch's validation score is the last student's accuracy on the held-out images,
    recomputed here from the images: against their true labels with labels, against the teacher's
    argmax without (on rotated digits the teacher is right on about 40 % of them, so the two
    differ). Fails if the labelled protocol validates on the teacher's classes or the unlabeled
    one on anything but the teacher's argmax per image."""
    seen: dict[str, Any] = {}
    train_student = distill.train_student

    def kept(*args: Any) -> Any:
        seen["shared"], seen["examples"] = args[2], args[4]
        seen["student"], history = train_student(*args)
        return seen["student"], history

    monkeypatch.setattr(distill, "train_student", kept)
    overrides = [*QUICK_DISTILL, digits_teacher, f"distill.labels={labels}", "transfer.limit_train=400"]
    metrics = run_task([*overrides, f"paths.output_dir={tmp_path}"], tmp_path / "run")
    x_val = seen["examples"].x_val.float().div(127.5).sub(1)
    with torch.no_grad():
        predicted = seen["student"].eval()(x_val).argmax(1)
        by_teacher = seen["shared"].teacher.eval()(x_val).argmax(1)
    truth = seen["examples"].y_val if labels == "5" else by_teacher
    assert seen["examples"].y_val is None or not torch.equal(by_teacher, seen["examples"].y_val)
    metric = "val_acc" if labels == "5" else "val_agreement"
    assert metrics["history"][-1][metric] == pytest.approx((predicted == truth).float().mean().item())


def test_an_unlabeled_transfer_set_gets_no_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_teacher: str
) -> None:
    """Transfer images without labels (as a flat folder gives: no classes, every label -1): no
    accuracy on them, the teacher's or the student's (0.0 would read as a measurement)."""
    transfer_data = distill.transfer_data

    def unlabeled(cfg, source: ImageData) -> ImageData:
        transfer = transfer_data(cfg, source)
        none = {k: torch.full_like(getattr(transfer, k), -1) for k in ("y_train", "y_test")}
        return dataclasses.replace(transfer, num_classes=0, **none)

    monkeypatch.setattr(distill, "transfer_data", unlabeled)
    overrides = [*QUICK_DISTILL, digits_teacher, "transfer.limit_train=300", f"paths.output_dir={tmp_path}"]
    metrics = run_task(overrides, tmp_path / "run")
    assert "transfer_acc" not in metrics and "teacher_transfer_acc" not in metrics
    assert metrics["source_acc"] == metrics["history"][-1]["source_acc"]


def test_a_test_split_scored_every_few_epochs_gives_the_same_selected_and_last_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_teacher: str
) -> None:
    """Three epochs whose validation score is made to peak at the first (1/epoch), with the
    source test split scored every epoch and every second one: the same training and validation
    numbers, the same last score, and the same selected score, which the second run reads from
    best.pt (epoch 1, never scored in training); its history lacks the score of epoch 1 alone.
    A best.pt of another epoch than the selected one is refused. Fails if the selected score
    comes from the last student or the wrong checkpoint, or if the last epoch is skipped."""
    train_epochs = distill.train_epochs

    def validation_peaks_first(*args: Any, evaluate: Any, monitor: str, **kwargs: Any) -> Any:
        return train_epochs(
            *args, evaluate=lambda e: {**evaluate(e), monitor: 1 / e}, monitor=monitor, **kwargs
        )

    monkeypatch.setattr(distill, "train_epochs", validation_peaks_first)
    runs = {
        every: run_task(
            [
                *QUICK_DISTILL,
                digits_teacher,
                "transfer.limit_train=300",
                "trainer.max_epochs=3",
                f"distill.test_every={every}",
            ],
            tmp_path / str(every),
        )
        for every in (1, 2)
    }
    every_epoch, every_second = runs[1], runs[2]
    scored = [
        [e["epoch"] for e in run["history"] if "source_acc" in e] for run in (every_epoch, every_second)
    ]
    assert scored == [[1, 2, 3], [2, 3]]
    for first, second in zip(every_epoch["history"], every_second["history"], strict=True):
        assert {k: v for k, v in first.items() if k not in ("epoch_time", "source_acc")} == {
            k: v for k, v in second.items() if k not in ("epoch_time", "source_acc")
        }
    assert every_epoch["selected_epoch"] == every_second["selected_epoch"] == 1
    assert every_second["selected_source_acc"] == every_epoch["selected_source_acc"]
    assert every_epoch["selected_source_acc"] == every_epoch["history"][0]["source_acc"]
    assert every_second["source_acc"] == every_epoch["source_acc"] == every_epoch["history"][-1]["source_acc"]
    assert (
        every_second["selected_source_acc"] != every_second["source_acc"]
    )  # best.pt is not the last student
    # A history whose selection (epoch 2, unscored here) is not the epoch best.pt holds (1).
    history = [{"epoch": 1, "val_agreement": 0.5}, {"epoch": 2, "val_agreement": 0.9}]
    folder = RunFolder(tmp_path / "2", {})
    protocol = Protocol(numbered([0]), numbered([0]), labelled=False)
    with pytest.raises(RuntimeError, match=r"best.pt holds epoch 1, not the selected 2$"):
        distill.selected_test_score(folder, None, history, protocol, None)


# ---------------------------------------------------------------- what a run records and prints
def test_a_run_s_metrics_name_its_data_method_and_teacher() -> None:
    """The whole metrics.json of crafted runs, written out by hand, in both protocols; without
    labels the transfer set's own accuracy is absent (None: an unlabeled set)."""
    history = [
        {"epoch": 1, "val_acc": 0.5, "transfer_acc": 0.3},
        {"epoch": 2, "val_acc": 0.4, "transfer_acc": 0.6},
    ]
    run = dataclasses.replace(outcome(True, history), other_domain_acc=0.42)
    source, transfer = run.protocol.source, dataclasses.replace(run.protocol.transfer, source="a folder")
    run = dataclasses.replace(run, protocol=dataclasses.replace(run.protocol, transfer=transfer))
    assert final_metrics(run) == {
        "task": "distill", "source": "src", "transfer": "dst", "source_data": source.source,
        "transfer_data": "a folder", "method": "ce+kd", "labels": 5, "transfer_train_size": 50,
        "losses": {"ce": 1.0, "kd": 0.5}, "transfer_acc": 0.6, "source_acc": 0.42, "selected_epoch": 1,
        "selected_transfer_acc": 0.4, "best_val_acc": 0.5, "val_size": 30,
        "stability": {"transfer": pytest.approx({"std_last": 0.15, "max_drop": 0.0})},
        "teacher_source_acc": 0.9, "teacher_transfer_acc": 0.6, "teacher_ckpt": "teacher.pt", "history": history,
    }  # fmt: skip
    unlabeled = [{"epoch": 1, "val_agreement": 0.7, "source_acc": 0.8}]
    metrics = final_metrics(dataclasses.replace(outcome(False, unlabeled), other_domain_acc=None))
    assert "transfer_acc" not in metrics and metrics["source_acc"] == 0.8 and metrics["labels"] == "none"


def test_a_run_s_summary_gives_teacher_and_student_accuracies() -> None:
    metrics = {
        "source": "mnist", "transfer": "usps", "losses": {"kd": 1.0}, "labels": "none",
        "teacher_source_acc": 0.99, "teacher_transfer_acc": 0.51234, "source_acc": 0.97, "transfer_acc": 0.6,
        "selected_epoch": 3, "selected_source_acc": 0.955, "selected_other": 0.5, "history": [],
    }  # fmt: skip
    assert distill.summary(metrics) == (
        "mnist -> usps, losses {'kd': 1.0}, labels none\n"
        "teacher: source_acc 0.9900  transfer_acc 0.5123\n"
        "student: source_acc 0.9700  transfer_acc 0.6000  "
        "(at the best validation epoch 3: selected_source_acc 0.9550, selected_other 0.5000)"
    )
    del metrics["transfer_acc"], metrics["teacher_transfer_acc"]  # an unlabeled transfer set
    assert "teacher: source_acc 0.9900\nstudent: source_acc 0.9700  (at" in distill.summary(metrics)


def tiny_student(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_classifier("mlp", channels=1, image_size=2, num_classes=3, penultimate_dim=4).eval()


def test_a_skipped_test_score_is_best_pt_s_and_leaves_the_last_student_alone(tmp_path: Path) -> None:
    """With the selected epoch's test split skipped (test_every > 1), the score is best.pt's
    student's on the test set; the last student, which the run scores on the other domain
    next, keeps its own weights. Fails if best.pt's weights are loaded into the last student."""
    data = numbered([0, 1, 2] * 20)
    best, last = tiny_student(1), tiny_student(2)
    before = {k: v.clone() for k, v in last.state_dict().items()}
    folder = RunFolder(tmp_path, {}, {})
    save_torch(
        folder.best_path, {"format": CHECKPOINT_FORMAT, "epoch": 2, "modules": {"model": best.state_dict()}}
    )
    history = [
        {"epoch": 1, "val_acc": 0.1},
        {"epoch": 2, "val_acc": 0.9},
        {"epoch": 3, "val_acc": 0.5, "transfer_acc": 0.2},
    ]
    protocol = Protocol(data, data, labelled=True, test_every=3)
    settings = trainer_settings(compose_config(["trainer.device=cpu"]))
    x = data.x_test.float().div(127.5).sub(1)  # penrun's images in [-1, 1]
    expected = (best(x).argmax(1) == data.y_test).float().mean().item()
    assert distill.selected_test_score(folder, last, history, protocol, settings) == pytest.approx(expected)
    assert all(torch.equal(before[k], v) for k, v in last.state_dict().items())
    history[1]["val_acc"] = 0.95
    history[0]["val_acc"] = 0.99  # now epoch 1 is selected, and best.pt holds epoch 2
    with pytest.raises(RuntimeError, match=r"best\.pt holds epoch 2, not the selected 1$"):
        distill.selected_test_score(folder, last, history, protocol, settings)


def test_matched_smoothing_is_drawn_from_the_run_s_generator(teacher) -> None:
    """The same generator state gives the same smoothing whatever torch's global state; its
    targets' entropy, in closed form, is that of the synthetic soft targets (a larger sample of
    its own, within 3 %)."""
    model = PenultimateModel.from_classifier(teacher)
    values = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        values.append(distill.smoothing_for(model, teacher, 2.0, torch.Generator().manual_seed(7)))
    assert values[0] == values[1]
    k, eps = model.num_classes, values[0]
    top, rest = 1 - eps, eps / (k - 1)  # the class's probability and each other class's
    smoothed = -(top * math.log(top) + (k - 1) * rest * math.log(rest))
    y = torch.arange(k).repeat(2000)
    _, targets = synthetic_soft_targets(model, teacher, y, 2.0, torch.Generator().manual_seed(11))
    assert smoothed == pytest.approx(-(targets * targets.log()).sum(1).mean().item(), rel=0.03)


# ---------------------------------------------------------------- the teacher's outputs, shuffling, seeds
@pytest.mark.parametrize(
    ("kd", "feature", "labelled", "reads"),
    [
        (0.5, 0.0, True, True), (0.0, 1.0, True, True), (0.0, 0.0, False, True),
        (0.0, 0.0, True, False), (2.0, 3.0, True, True),
    ],
)  # fmt: skip
def test_the_teacher_sees_the_transfer_images_only_for_the_terms_that_need_it(
    kd: float, feature: float, labelled: bool, reads: bool
) -> None:
    """kd and feature read the teacher's outputs; without labels every class is its prediction."""
    assert distill.reads_teacher_images({"kd": kd, "feature": feature}, labelled) is reads


def test_the_teacher_s_outputs_are_cached_per_example_and_batches_shuffled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_teacher: str
) -> None:
    """kd's first step reads the teacher's features and logits of exactly its own (shuffled)
    images from the run's cache; a run of ce and smooth alone computes none, and its smoothing is
    matched to the synthetic targets (0 when the smooth term is off)."""
    batch, _, examples = first_step([digits_teacher, "distill.labels=5"], tmp_path / "kd", monkeypatch)
    features, logits = batch.teacher_outputs
    with torch.no_grad():
        torch.testing.assert_close(logits, batch.setup.teacher(batch.x))
        torch.testing.assert_close(features, batch.setup.teacher.features(batch.x))
    first_rows = examples.x_train[: len(batch.x)].float().div(127.5).sub(1)
    assert batch.x.shape == first_rows.shape and not torch.equal(batch.x, first_rows)  # shuffled
    assert batch.setup.smooth_epsilon == 0.0
    ce_only = [f"distill.losses.{name}=0" for name in WEIGHTS if name not in ("ce", "smooth")]
    smooth = [
        digits_teacher,
        "distill.labels=5",
        "distill.losses.ce=1",
        "distill.losses.smooth=0.5",
        *ce_only,
    ]
    batch, weights, _ = first_step(smooth, tmp_path / "smooth", monkeypatch)
    assert weights["smooth"] == 0.5 and batch.teacher_outputs is None
    assert 0.0 < batch.setup.smooth_epsilon < 1.0


def test_a_distill_run_s_checkpoint_resumes_its_optimizer_and_synthetic_draws(
    tmp_path: Path, digits_teacher: str
) -> None:
    run_task(
        [*QUICK_DISTILL, digits_teacher, "trainer.max_epochs=1", f"paths.output_dir={tmp_path}"],
        tmp_path / "run",
    )
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert set(last["optimizers"]) == {"optimizer"} and last["optimizers"]["optimizer"]["state"]
    assert set(last["rng"][0]["generators"]) == {"synthetic"}
    assert last["classifier"]["arch"] == "mlp" and last["classifier"]["num_classes"] == 10


def test_each_rank_draws_its_own_synthetic_activations(teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = trainer_settings(compose_config(["trainer.device=cpu"]))
    options = compose_config(["task=distill"]).distill
    weights = {"smooth": 0.0}
    model = PenultimateModel.from_classifier(teacher)
    rank0 = distill.distill_setup(options, weights, teacher, model, settings, seed=5).generator
    monkeypatch.setattr(distill.distributed, "rank", lambda: 2)
    rank2 = distill.distill_setup(options, weights, teacher, model, settings, seed=5).generator
    assert torch.equal(rank0.get_state(), torch.Generator().manual_seed(5).get_state())
    assert torch.equal(rank2.get_state(), torch.Generator().manual_seed(5 + 2 * 1_000_003).get_state())


def test_too_many_held_out_examples_per_class_name_the_key() -> None:
    with pytest.raises(ConfigError) as refused:
        held_out_indices(numbered(UNBALANCED), "balanced", 26, 3)
    assert str(refused.value) == (
        "distill.val_per_class=26 asks for more examples per class than there are (the rarest class has 25)"
    )


# ---------------------------------------------------------------- the transfer set
def images(name: str, labels: list[int], size: int = 8, channels: int = 1, seed: int = 0) -> ImageData:
    """Random images (the same in both splits) with the given labels."""
    x = torch.randint(
        0, 256, (len(labels), channels, size, size), generator=torch.Generator().manual_seed(seed)
    )
    y = torch.tensor(labels)
    return ImageData(
        name, x.to(torch.uint8), y, x.to(torch.uint8).clone(), y.clone(), max(labels) + 1, "test"
    )


def transfer_of(overrides: list[str], source: ImageData, monkeypatch: pytest.MonkeyPatch, loaded: ImageData):
    """transfer_data of a composed config (unshifted unless `overrides` say) whose transfer node
    loads `loaded`; checks that it was asked for the transfer node at the source's size."""
    asked = {}

    def load(cfg: Any, node: str, like: ImageData | None = None) -> ImageData:
        asked.update(node=node, like=like)
        return loaded

    monkeypatch.setattr(distill, "load_data", load)
    transfer = distill.transfer_data(
        compose_config(["task=distill", "transfer.shift=none", *overrides]), source
    )
    assert asked == {"node": "transfer", "like": source}  # a folder is read at the source's size
    return transfer


def test_a_transfer_set_is_aligned_to_the_source_s_classes_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """STL-10 into CIFAR-10's label space: car and bird swap, the monkey (7) has no class there."""
    cifar10 = images("cifar10", list(range(10)), size=32, channels=3)
    stl10 = images("stl10", list(range(10)), size=32, channels=3)
    transfer = transfer_of(["distill.labels=none"], cifar10, monkeypatch, stl10)
    assert transfer.y_train.tolist() == [0, 2, 1, 3, 4, 5, 7, 8, 9]


def test_a_transfer_set_takes_the_source_s_size_and_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = images("rgb", [0, 1, 2], size=12, channels=3)
    transfer = transfer_of([], images("grey", list(range(10))), monkeypatch, rgb)
    assert transfer.x_train.shape == (3, 1, 8, 8) and transfer.x_test.shape == (3, 1, 8, 8)


def test_an_unlabeled_transfer_set_takes_no_labels_option(monkeypatch: pytest.MonkeyPatch) -> None:
    flat = dataclasses.replace(images("flat", [0, 0, 0]), num_classes=0, y_train=torch.full((3,), -1),
                               y_test=torch.full((3,), -1))  # fmt: skip
    source = images("digits", list(range(10)))
    assert len(transfer_of(["distill.labels=none"], source, monkeypatch, flat).y_train) == 3
    with pytest.raises(ConfigError) as refused:
        transfer_of(["distill.labels=5"], source, monkeypatch, flat)
    assert str(refused.value) == "distill.labels=5: flat is unlabeled; use distill.labels=none"


def test_a_transfer_label_outside_the_teacher_s_classes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    source = images("digits", list(range(10)))
    assert transfer_of([], source, monkeypatch, images("ten", list(range(10)))).num_classes == 10
    with pytest.raises(ConfigError) as refused:
        transfer_of([], source, monkeypatch, images("eleven", list(range(11))))
    assert (
        str(refused.value)
        == "transfer set eleven has label 10, outside the teacher's 10 classes (0..9) of digits"
    )


def test_a_shift_is_drawn_with_the_run_s_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    source, loaded = images("digits", list(range(10))), images("digits", list(range(10)), seed=1)
    noise = ["transfer.shift=noise", "transfer.shift_strength=30"]
    shifted = {seed: transfer_of([*noise, f"seed={seed}"], source, monkeypatch, loaded) for seed in (3, 4)}
    expected = shift_images(loaded, "noise", 30, seed=3)
    assert shifted[3].name == "digits+noise(30)" and torch.equal(shifted[3].x_train, expected.x_train)
    assert not torch.equal(shifted[4].x_train, expected.x_train)
    with pytest.raises(ConfigError, match=r"^transfer\.shift_strength=-1\.0 is invalid for noise"):
        transfer_of(["transfer.shift=noise", "transfer.shift_strength=-1"], source, monkeypatch, loaded)
    with pytest.raises(ConfigError, match=r"^transfer\.shift='swirl' is invalid"):
        transfer_of(["transfer.shift=swirl"], source, monkeypatch, loaded)


def test_a_corruption_is_drawn_with_the_run_s_seed_and_cached_under_the_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("imagecorruptions")
    source, loaded = (
        images("cifar10", list(range(10)), size=32, channels=3),
        images("c", [0, 1], 32, 3, seed=2),
    )
    options = ["transfer.shift=corruption", f"paths.output_dir={tmp_path}", "seed=5"]
    noisy = transfer_of(
        [*options, "transfer.corruption=gaussian_noise", "transfer.severity=2"], source, monkeypatch, loaded
    )
    expected = corrupt_images(loaded, "gaussian_noise", 2, 5, tmp_path / "elsewhere")
    assert noisy.name == "c+gaussian_noise(2)" and torch.equal(noisy.x_train, expected.x_train)
    assert len(list((tmp_path / "corruptions").glob("*.npz"))) == 2  # one file per split
    for values, message in (
        (["transfer.corruption=nope", "transfer.severity=2"], r"^transfer\.corruption='nope' is invalid"),
        (["transfer.corruption=fog", "transfer.severity=6"], r"^transfer\.severity=6 is invalid"),
    ):
        with pytest.raises(ConfigError, match=message):
            transfer_of([*options, *values], source, monkeypatch, loaded)


def test_every_image_can_be_held_out_and_no_more() -> None:
    data = numbered(list(range(3)) * 4)
    assert held_out_indices(data, "seeded", 4, 3).tolist() == list(range(12))
    with pytest.raises(ConfigError, match=r"^distill\.val_per_class=5 holds out 15 images"):
        held_out_indices(data, "seeded", 5, 3)


def test_a_run_records_and_logs_its_teacher_labels_and_vmf(
    tmp_path: Path, digits_teacher: str, caplog: pytest.LogCaptureFixture
) -> None:
    """metrics.json of a labelled run (complete, its labels option, its examples, its teacher and
    the vMF it drew from), the teacher's and the summary's log lines, the same summary when the
    finished run is reused; a run of kd alone records no vMF. The configured teacher width (16)
    is not the checkpoint's (32): only a teacher trained here is checked against it."""
    teacher_path = digits_teacher.partition("=")[2]
    args = [*QUICK_DISTILL, digits_teacher, "distill.labels=5", "teacher.penultimate_dim=16"]
    with caplog.at_level(logging.INFO, logger="penrun.app.tasks.distill"):
        metrics = run_task([*args, f"paths.output_dir={tmp_path}"], tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (
        stored["status"] == "complete" and stored["teacher_ckpt"] == metrics["teacher_ckpt"] == teacher_path
    )
    assert (metrics["labels"], metrics["transfer_train_size"], metrics["val_size"]) == (5, 50, 100)
    assert "best_val_acc" in metrics and "transfer_acc" in metrics  # the labelled protocol's
    assert metrics["vmf"] == "weights/weights x1" and metrics["vmf_mean_kappa"] > 0
    teacher_line = (
        f"teacher {teacher_path}: source_acc {metrics['teacher_source_acc']:.4f}, "
        f"transfer_acc {metrics['teacher_transfer_acc']:.4f}"
    )
    assert teacher_line in caplog.messages and caplog.messages[-1] == distill.summary(metrics)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="penrun.app.tasks.distill"):
        assert (
            run_task([*args, f"paths.output_dir={tmp_path}"], tmp_path / "run")["history"]
            == metrics["history"]
        )
    # other loggers' lines (the reused folder's) reach caplog when an earlier test set the root level
    assert [r.getMessage() for r in caplog.records if r.name == distill.log.name] == [
        distill.summary(metrics)
    ]
    kd = ["distill.losses.synthetic_head=0", "distill.losses.feature=0", f"paths.output_dir={tmp_path}"]
    assert run_task([*args, *kd], tmp_path / "kd")["vmf"] == "none"
