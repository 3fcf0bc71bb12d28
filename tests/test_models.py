"""Networks: classifiers of every architecture at the image sizes they take, the heads against
their formulas, the generative networks at any data size, and the argument-named errors (the
config-key-named ones are in test_train_teacher.py)."""

from __future__ import annotations

import pytest
import torch

from penrun.models import ARCHITECTURES, Classifier, CosineHead, LinearHead, build_classifier
from penrun.models.classifiers import HEADS
from penrun.models.generative import ConditionalVAE, Generator, ProjectionDiscriminator

SIZES = (8, 28, 32)
VALID = [
    (arch, size, channels)
    for arch in sorted(ARCHITECTURES)
    for size in SIZES
    for channels in (1, 3)
    if not (arch == "lenet5" and size < 16)
]


@pytest.mark.parametrize(("arch", "size", "channels"), VALID)
def test_every_architecture_gives_features_and_logits(arch: str, size: int, channels: int) -> None:
    torch.manual_seed(0)
    net = build_classifier(arch, channels=channels, image_size=size, num_classes=7, penultimate_dim=12)
    assert isinstance(net, Classifier) and net.penultimate_dim == 12
    x = torch.rand(3, channels, size, size) * 2 - 1
    net.eval()
    h = net.features(x)
    assert h.shape == (3, 12)
    assert net(x).shape == (3, 7)
    torch.testing.assert_close(net(x), net.head(h))


def test_architectures_and_heads_are_registered() -> None:
    assert sorted(ARCHITECTURES) == ["lenet5", "mlp", "resnet20", "resnet8"]
    assert HEADS == ("cosine", "linear")


def test_width_scales_the_body() -> None:
    def params(width: float) -> int:
        net = build_classifier(
            "mlp", channels=1, image_size=8, num_classes=10, penultimate_dim=8, width=width
        )
        return sum(p.numel() for p in net.body.parameters())

    assert params(1.0) == 64 * 256 + 256 + 256 * 256 + 256
    assert params(0.5) == 64 * 128 + 128 + 128 * 128 + 128


def test_feature_relu_puts_activations_in_the_positive_orthant() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    kwargs = dict(channels=1, image_size=8, num_classes=10, penultimate_dim=8)
    assert (build_classifier("mlp", **kwargs, feature_relu=True).features(x) >= 0).all()
    assert (build_classifier("mlp", **kwargs, feature_relu=False).features(x) < 0).any()


# ---------------------------------------------------------------- heads
@pytest.mark.parametrize("bias", [False, True])
def test_cosine_head_is_scale_times_the_cosine(bias: bool) -> None:
    torch.manual_seed(1)
    net = build_classifier(
        "mlp", channels=1, image_size=8, num_classes=5, penultimate_dim=6, scale=7.5, bias=bias
    )
    head = net.head
    assert isinstance(head, CosineHead) and head.kind == "cosine" and head.normalizes_input
    if bias:
        with torch.no_grad():
            head.bias.copy_(torch.arange(5.0))
    h = torch.randn(4, 6, dtype=torch.float64)
    w = head.weight.detach().double()
    cos = torch.tensor(
        [
            [float(h[i] @ w[k]) / (float(h[i].norm()) * float(w[k].norm())) for k in range(5)]
            for i in range(4)
        ],
        dtype=torch.float64,
    )
    expected = 7.5 * cos + (torch.arange(5.0, dtype=torch.float64) if bias else 0)
    torch.testing.assert_close(head.double()(h), expected, rtol=1e-12, atol=1e-12)
    # The weight acting on the normalized activation: s * w_k / |w_k|.
    torch.testing.assert_close(
        head.effective_weight().norm(dim=1), torch.full((5,), 7.5, dtype=torch.float64)
    )
    # Invariant to the scale of h.
    torch.testing.assert_close(head(3 * h), head(h))


def test_linear_head_is_w_h_plus_b() -> None:
    torch.manual_seed(2)
    net = build_classifier(
        "mlp", channels=1, image_size=8, num_classes=4, penultimate_dim=5, head="linear", bias=True
    )
    head = net.head
    assert isinstance(head, LinearHead) and head.kind == "linear" and not head.normalizes_input
    h = torch.randn(3, 5)
    torch.testing.assert_close(head(h), h @ head.weight.T + head.bias)
    assert head.effective_weight() is head.weight
    no_bias = build_classifier(
        "mlp", channels=1, image_size=8, num_classes=4, penultimate_dim=5, head="linear"
    )
    assert no_bias.head.bias is None


# ---------------------------------------------------------------- errors (argument names)
KW = dict(channels=1, image_size=8, num_classes=10, penultimate_dim=8)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": "vgg"}, r"^arch='vgg' is invalid; valid: \['lenet5', 'mlp', 'resnet20', 'resnet8'\]$"),
        ({"head": "arcface"}, r"^head='arcface' is invalid; valid: \['cosine', 'linear'\]$"),
        ({"penultimate_dim": 1}, r"^penultimate_dim=1 is invalid: it must be >= 2$"),
        ({"width": 0.0}, r"^width=0.0 is invalid: it must be > 0$"),
        ({"scale": -1.0}, r"^scale=-1.0 is invalid: a cosine head needs a scale > 0$"),
        (
            {"arch": "lenet5"},
            r"^arch='lenet5' needs images of at least 16x16, got image_size=8; resize the images "
            r"\(e.g. to 28\) or use arch='mlp'$",
        ),
    ],
)
def test_bad_classifier_arguments_are_named(changes: dict, message: str) -> None:
    spec = {"arch": "mlp", **KW, **changes}
    with pytest.raises(ValueError, match=message):
        build_classifier(**spec)


def test_a_linear_head_needs_no_scale() -> None:
    net = build_classifier("mlp", **KW, head="linear", scale=0.0)
    assert net.head.kind == "linear"


# ---------------------------------------------------------------- generative networks
@pytest.mark.parametrize("size", [8, 16, 28, 30])
def test_networks_take_and_give_images_of_the_data_size(size: int) -> None:
    x, c = torch.rand(3, 1, size, size) * 2 - 1, torch.rand(3, 5)
    vae = ConditionalVAE(1, size, cond_dim=5, z_dim=4, width=4)
    loss, logs = vae.loss(x, c)
    assert loss.isfinite() and logs["kl"].isfinite()  # shapes; values: test_the_vae_loss_is_the_negative_elbo
    assert vae.eval()(torch.randn(3, 4), c).shape == (3, 1, size, size)
    gen = Generator(1, size, cond_dim=5, z_dim=4, width=4).eval()
    fake = gen(torch.randn(3, 4), c)
    assert fake.shape == (3, 1, size, size) and fake.abs().max() <= 1
    assert ProjectionDiscriminator(1, size, cond_dim=5, width=4)(fake, c).shape == (3,)


def test_the_vae_loss_is_the_negative_elbo() -> None:
    torch.manual_seed(3)
    vae = ConditionalVAE(1, 8, cond_dim=2, z_dim=3, width=4)
    x, c = torch.rand(5, 1, 8, 8) * 2 - 1, torch.rand(5, 2)
    torch.manual_seed(4)
    loss, logs = vae.loss(x, c, kl_weight=0.25)
    torch.testing.assert_close(loss, logs["recon"] + 0.25 * logs["kl"])
    mean, log_var = vae.encode(x, c)
    kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum() / 5
    torch.testing.assert_close(logs["kl"], kl.detach())
    assert logs["recon"] > 0  # a sum of Bernoulli cross-entropies


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, 3, 5), r"^image_size=3 is invalid: use an integer >= 4$"),
        ((0, 8, 5), r"^channels=0 is invalid: use an integer >= 1$"),
        ((1, 8, 0), r"^cond_dim=0 is invalid: use an integer >= 1$"),
    ],
)
def test_bad_generative_sizes_are_named(args: tuple, message: str) -> None:
    for build in (ConditionalVAE, Generator, ProjectionDiscriminator):
        with pytest.raises(ValueError, match=message):
            build(*args)
    with pytest.raises(ValueError, match=r"^z_dim=0 is invalid: use an integer >= 1$"):
        ConditionalVAE(1, 8, 5, z_dim=0)
    with pytest.raises(ValueError, match=r"^width=2.5 is invalid: use an integer >= 1$"):
        Generator(1, 8, 5, width=2.5)
