"""A classifier trained elsewhere (a torchvision ResNet-18, trained here for a few steps on the
digits): its penultimate activations through a forward hook, and p(a | y) of its final layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from penrun import PenultimateModel
from penrun.core.statistics import activation_statistics
from penrun.data import load_dataset, normalize
from penrun.models import HookedClassifier


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


# The command line's library networks (net@teacher=torchvision|timm): tests/test_networks.py.
