"""A classifier trained elsewhere (a torchvision ResNet-18, trained here for a few steps on the
digits): its penultimate activations through a forward hook, and p(a | y) of its final layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from penrun import PenultimateModel
from penrun.core.statistics import activation_statistics
from penrun.data import load_dataset, normalize
from penrun.models import HookedClassifier

from conftest import run_main


@pytest.fixture(scope="module")
def resnet_on_digits() -> tuple[HookedClassifier, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    data = load_dataset("digits")
    x = F.interpolate(normalize(data.x_train[:512]), size=32).repeat(1, 3, 1, 1)
    y = data.y_train[:512]
    net = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(15):
        idx = torch.arange(step * 32, step * 32 + 32) % len(y)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return HookedClassifier(net.eval(), head="fc"), x[:200], y[:200]


@torch.no_grad()
def test_the_hooked_activations_give_the_models_own_logits_and_posterior(resnet_on_digits) -> None:
    net, x, y = resnet_on_digits
    h = net.features(x)
    assert h.shape == (200, 512) and net.penultimate_dim == 512
    logits = net(x)  # torchvision's own forward
    torch.testing.assert_close(net.head(h), logits)
    model = PenultimateModel.from_classifier(net, activation_statistics(h, y, 10))
    # The Generative-Discriminative pair: the vMF mixture's posterior is the network's softmax.
    torch.testing.assert_close(model.posterior(h), torch.softmax(logits, dim=1), atol=1e-5, rtol=1e-4)
    a, labels = model.sample(50, balanced=True, generator=torch.Generator().manual_seed(0))
    assert a.shape == (50, 512) and labels.bincount().tolist() == [5] * 10


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ("avgpool", "head='avgpool' is a AdaptiveAvgPool2d: the head must be an nn.Linear"),
        ("classifier", "head='classifier' is not a layer of the model; its nn.Linear layers: ['fc']"),
    ],
)
def test_a_head_that_is_not_a_linear_layer_is_refused(head: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        HookedClassifier(torchvision.models.resnet18(num_classes=10), head=head)


def test_task_fit_diagnoses_a_torchvision_classifier_from_its_state_dict(
    resnet_on_digits, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """penrun task=fit teacher_torchvision=resnet18 teacher_ckpt=STATE_DICT: the pair identity
    holds for the hooked ResNet-18 (posterior = softmax), from a file saved by plain torch."""
    net, _, _ = resnet_on_digits
    torch.save(net.module.state_dict(), tmp_path / "resnet18.pt")
    common = ["task=fit", "data.image_size=32", "data.channels=3", "teacher_torchvision=resnet18"]
    done = run_main([*common, f"teacher_ckpt={tmp_path / 'resnet18.pt'}"], tmp_path, capsys)
    assert done.returncode == 0, done.stderr
    (metrics_path,) = (tmp_path / "outputs").rglob("metrics.json")
    metrics = json.loads(metrics_path.read_text())
    assert metrics["dim"] == 512 and metrics["softmax_acc"] == metrics["generative_acc"]
    assert metrics["posterior_max_abs_diff"] < 1e-4
    assert len(metrics["options"]) == 4  # the calibrations, from statistics computed on the spot


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["task=fit", "teacher_torchvision=resnet18"], "teacher_torchvision='resnet18' needs teacher_ckpt=PATH"),
        (["task=fit", "teacher_torchvision=resnet99", "teacher_ckpt=x.pt"], "teacher_torchvision='resnet99' is not a torchvision classifier"),
        (["task=distill", "teacher_torchvision=resnet18"], "teacher_torchvision='resnet18' works with task=fit"),
        (["task=fit", "teacher_torchvision=resnet18", "teacher_head_layer=avgpool", "teacher_ckpt=x.pt"],
         "teacher_head_layer='avgpool' is a AdaptiveAvgPool2d"),
    ],
)  # fmt: skip
def test_bad_torchvision_teachers_are_one_line_errors(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    done = run_main([*args, "data.image_size=32", "data.channels=3"], tmp_path, capsys)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
