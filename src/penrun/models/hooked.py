"""A classifier trained elsewhere, seen as penrun sees its own.

    net = HookedClassifier(torchvision.models.resnet18(num_classes=10), head="fc")
    h, logits = net.features(x), net.head(net.features(x))   # == net(x)
    model = PenultimateModel.from_classifier(net, activation_statistics(h, y, 10))

`features(x)` is the input of the named final nn.Linear layer, caught by a forward hook while
the module runs as it always does; `head` is that layer, as a linear head. `normalization`
(mean, std per channel) maps penrun's images in [-1, 1] to what the module's weights expect:
[0, 1] images standardized, as a library's pretrained weights were trained.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearView(nn.Module):
    """An nn.Linear of another module as penrun's linear head (kind, effective_weight)."""

    kind = "linear"
    normalizes_input = False

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.layer = layer

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def effective_weight(self) -> torch.Tensor:
        return self.layer.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer(h)


class HookedClassifier(nn.Module):
    """Any module whose logits come from one final nn.Linear (its name in `head`, e.g. "fc"
    for a torchvision ResNet, "classifier.3" for a MobileNetV3)."""

    def __init__(
        self, module: nn.Module, head: str, normalization: tuple[list[float], list[float]] | None = None
    ):
        super().__init__()
        try:
            layer = module.get_submodule(head)
        except AttributeError as err:
            names = [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]
            raise ValueError(
                f"head={head!r} is not a layer of the model; its nn.Linear layers: {names}"
            ) from err
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"head={head!r} is a {type(layer).__name__}: the head must be an nn.Linear")
        self.module = module
        self.head = LinearView(layer)
        self.head_name = head
        self.penultimate_dim = layer.in_features
        self.normalization = normalization
        if normalization is not None:  # not in the state_dict: that stays the module's own
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalization)
            self.register_buffer("mean", mean, persistent=False)
            self.register_buffer("std", std, persistent=False)

    def module_input(self, x: torch.Tensor) -> torch.Tensor:
        """penrun's images in [-1, 1] as the module takes them."""
        if self.normalization is None:
            return x
        return ((x + 1) / 2 - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations: what the head layer receives, flattened per example."""
        caught: list[torch.Tensor] = []
        hook = self.head.layer.register_forward_hook(lambda _layer, inputs, _out: caught.append(inputs[0]))
        try:
            self.module(self.module_input(x))
        finally:
            hook.remove()
        return caught[-1].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.module_input(x))
