"""Classifiers split into a feature extractor (-> penultimate activations h) and a head.

Every network is `body -> embed -> head`: `body` is an architecture's trunk, `embed` a linear
layer with batch norm to `penultimate_dim` (no ReLU unless `feature_relu`: post-ReLU activations
sit in the positive orthant, where a vMF model fits poorly), and `head` a cosine or linear layer.
`models.networks.build_classifier` builds these and the networks of other libraries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class CosineHead(nn.Module):
    """z_k = s * <w_k / |w_k|, h / |h|> + b_k: every class's vMF concentration is s."""

    kind = "cosine"
    normalizes_input = True

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0, bias: bool = False):
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def effective_weight(self) -> torch.Tensor:
        """The weight acting on the normalized activation: s * W / |W| row-wise."""
        return self.scale * F.normalize(self.weight, dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(h, dim=1), self.effective_weight(), self.bias)


class LinearHead(nn.Linear):
    """z = W h + b on the raw activation: kappa_k = |h| |w_k| depends on the input's norm."""

    kind = "linear"
    normalizes_input = False

    def __init__(self, dim: int, num_classes: int, bias: bool = True):
        super().__init__(dim, num_classes, bias=bias)

    def effective_weight(self) -> torch.Tensor:
        return self.weight


class Classifier(nn.Module):
    def __init__(
        self,
        body: nn.Module,
        body_dim: int,
        penultimate_dim: int,
        head: nn.Module,
        feature_relu: bool,
    ):
        super().__init__()
        self.body = body
        layers: list[nn.Module] = [
            nn.Linear(body_dim, penultimate_dim),
            nn.BatchNorm1d(penultimate_dim),
        ]
        if feature_relu:
            layers.append(nn.ReLU())
        self.embed = nn.Sequential(*layers)
        self.head = head

    @property
    def penultimate_dim(self) -> int:
        return self.embed[0].out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations h (before any normalization of the head)."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------- bodies
def mlp_body(channels: int, image_size: int, width: float) -> tuple[nn.Module, int]:
    hidden = int(256 * width)
    body = nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * image_size**2, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
    )
    return body, hidden


def lenet5_body(channels: int, image_size: int, width: float) -> tuple[nn.Module, int]:
    if image_size < 16:
        raise ValueError(
            f"arch='lenet5' needs images of at least 16x16, got image_size={image_size}; "
            "resize the images (e.g. to 28) or use arch='mlp'"
        )
    c1, c2, f1, f2 = (max(1, int(n * width)) for n in (6, 16, 120, 84))
    conv = nn.Sequential(
        nn.Conv2d(channels, c1, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    side = (image_size // 2 - 4) // 2
    body = nn.Sequential(conv, nn.Linear(c2 * side * side, f1), nn.ReLU(), nn.Linear(f1, f2), nn.ReLU())
    return body, f2


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_body(blocks_per_stage: int) -> Callable[[int, int, float], tuple[nn.Module, int]]:
    """CIFAR-style ResNet (He et al. 2016): 3 stages of 16/32/64 channels; depth 6n+2."""

    def build(channels: int, image_size: int, width: float) -> tuple[nn.Module, int]:
        widths = [max(4, int(c * width)) for c in (16, 32, 64)]
        layers: list[nn.Module] = [
            nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers), widths[-1]

    return build


ARCHITECTURES: dict[str, Callable[[int, int, float], tuple[nn.Module, int]]] = {
    "mlp": mlp_body,
    "lenet5": lenet5_body,
    "resnet8": resnet_body(1),
    "resnet20": resnet_body(3),
}
HEADS = ("cosine", "linear")


def build_penrun_classifier(
    arch: str,
    *,
    channels: int,
    image_size: int,
    num_classes: int,
    penultimate_dim: int,
    head: str = "cosine",
    scale: float = 16.0,
    bias: bool = False,
    feature_relu: bool = False,
    width: float = 1.0,
) -> Classifier:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is invalid; valid: {sorted(ARCHITECTURES)}")
    if head not in HEADS:
        raise ValueError(f"head={head!r} is invalid; valid: {list(HEADS)}")
    if penultimate_dim < 2:
        raise ValueError(f"penultimate_dim={penultimate_dim} is invalid: it must be >= 2")
    if width <= 0:
        raise ValueError(f"width={width} is invalid: it must be > 0")
    if head == "cosine" and scale <= 0:
        raise ValueError(f"scale={scale} is invalid: a cosine head needs a scale > 0")
    body, body_dim = ARCHITECTURES[arch](channels, image_size, width)
    if head == "cosine":
        head_module: nn.Module = CosineHead(penultimate_dim, num_classes, scale, bias)
    else:
        head_module = LinearHead(penultimate_dim, num_classes, bias)
    return Classifier(body, body_dim, penultimate_dim, head_module, feature_relu)
