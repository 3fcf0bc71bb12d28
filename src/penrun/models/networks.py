"""One registry of network sources for teachers, students and evaluators: penrun's own
architectures (models/classifiers.py), torchvision's classifiers, and timm's (the optional
extra penrun[timm]).

    net = build_classifier("resnet18", source="torchvision", channels=3, image_size=32, num_classes=10)
    h, logits = net.features(x), net.head(net.features(x))   # == net(x)

A network from a library is built by that library and seen through `HookedClassifier`: its
final nn.Linear (`head_layer`, or found: the last nn.Linear whose outputs are the logits) is
the head, the input of that layer the penultimate activations. The spec of a built network
(the arguments of `build_classifier`) is what checkpoints record to rebuild it.
"""

from __future__ import annotations

import difflib
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from penrun.models.classifiers import ARCHITECTURES, Classifier, build_penrun_classifier
from penrun.models.hooked import HookedClassifier

SOURCES = ("penrun", "torchvision", "timm")
TIMM_MISSING = "source='timm' needs the timm package: pip install 'penrun[timm]'"

Normalization = tuple[list[float], list[float]]  # (mean, std) of [0, 1] images, per channel
# The input normalizations a network trained elsewhere may expect, by name (`normalization`):
# imagenet is torchvision's recipe (transforms.Normalize of the ImageNet statistics), which most
# state_dicts trained with torchvision or timm expect. `none` feeds penrun's images in [-1, 1]
# as they are: what weights trained with mean = std = 0.5 (Inception's recipe) expect.
NORMALIZATIONS: dict[str, Normalization] = {
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
# auto: the pretrained weights' own normalization with pretrained=True, else none.
NORMALIZATION_CHOICES = ("auto", "none", *NORMALIZATIONS)


def build_classifier(
    arch: str,
    *,
    source: str = "penrun",
    channels: int,
    image_size: int,
    num_classes: int,
    head_layer: str | None = None,
    pretrained: bool = False,
    normalization: Normalization | None = None,
    penultimate_dim: int | None = None,
    **penrun_options: Any,
) -> Classifier | HookedClassifier:
    """A classifier of any source. penrun's own take `penultimate_dim` and the options of
    `build_penrun_classifier`; a library's take `pretrained` (its own weights, downloaded into
    its cache; a head of another class count is left as built), `head_layer` and
    `normalization` (what its weights expect of penrun's images in [-1, 1]). A library
    network's `penultimate_dim`, when given, is checked: its spec records it."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is invalid; valid: {list(SOURCES)}")
    if source == "penrun":
        library_only = {
            "pretrained": pretrained or None,
            "head_layer": head_layer,
            "normalization": normalization,
        }
        given = [f"{name}={value!r}" for name, value in library_only.items() if value is not None]
        if given:
            raise ValueError(
                f"{given[0]} is for torchvision and timm networks, not source='penrun' (arch={arch!r})"
            )
        dim = 64 if penultimate_dim is None else penultimate_dim
        return build_penrun_classifier(
            arch,
            channels=channels,
            image_size=image_size,
            num_classes=num_classes,
            penultimate_dim=dim,
            **penrun_options,
        )
    check_arch(source, arch)
    if normalization is not None and not len(normalization[0]) == len(normalization[1]) == channels:
        raise ValueError(
            f"normalization={normalization!r} has a mean and std per channel of "
            f"{len(normalization[0])}-channel images; the images have channels={channels}"
        )
    module = _create(source, arch, num_classes)
    named = head_layer is not None
    if head_layer is None:
        head_layer = find_head(module, arch, channels, image_size)
    net = HookedClassifier(module, head_layer, normalization)
    if named:
        check_head(net, head_layer, arch, channels, image_size)
    if pretrained:
        load_pretrained(module, library_weights(source, arch), head_layer)
    if penultimate_dim is not None and penultimate_dim != net.penultimate_dim:
        raise ValueError(
            f"penultimate_dim={penultimate_dim} does not fit {source}'s {arch}: its head "
            f"{head_layer!r} takes {net.penultimate_dim} features"
        )
    return net


def library_spec(net: HookedClassifier) -> dict[str, Any]:
    """What a library network's spec records of the built network: its head and its width."""
    return {"head_layer": net.head_name, "penultimate_dim": net.penultimate_dim}


def architectures(source: str) -> list[str]:
    """The classifier names of a source."""
    if source == "penrun":
        return sorted(ARCHITECTURES)
    if source == "torchvision":
        return _torchvision().list_models(module=_torchvision())
    return _timm().list_models()


def check_arch(source: str, arch: str) -> None:
    """`arch` is a classifier of `source` (timm's may carry a pretrained tag: resnet10t.c3_in1k)."""
    names = architectures(source)
    if (arch.split(".")[0] if source == "timm" else arch) not in names:
        if len(names) <= 10:
            raise ValueError(f"arch={arch!r} is not a {source} classifier; valid: {', '.join(names)}")
        close = difflib.get_close_matches(arch, names, n=6, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else f"e.g. {', '.join(names[:6])}"
        raise ValueError(f"arch={arch!r} is not a {source} classifier; {hint} ({len(names)} in all)")


def _torchvision() -> Any:
    import torchvision.models  # (~1 s: it pulls in torch._dynamo) only for a torchvision network

    return torchvision.models


def _timm() -> Any:
    try:
        import timm  # the optional extra penrun[timm]
    except ImportError as err:
        raise ValueError(TIMM_MISSING) from err
    return timm


def _create(source: str, arch: str, num_classes: int | None) -> nn.Module:
    """The library's network, randomly initialized, with `num_classes` outputs (None: the
    library's default, that of its pretrained weights)."""
    classes = {} if num_classes is None else {"num_classes": num_classes}
    if source == "torchvision":
        return _torchvision().get_model(arch, **classes)
    return _timm().create_model(arch, pretrained=False, **classes)


def pretrained_info(source: str, arch: str) -> tuple[int, Normalization]:
    """The class count and input normalization of a library's pretrained weights, without
    downloading them."""
    if source == "torchvision":
        weights = _torchvision_weights(arch)
        transform = weights.transforms()
        return len(weights.meta["categories"]), (list(transform.mean), list(transform.std))
    config = _timm_pretrained(arch)
    return config.num_classes, (list(config.mean), list(config.std))


def input_normalization(
    choice: str, *, source: str, arch: str, pretrained: bool, channels: int
) -> Normalization | None:
    """The (mean, std) that a network's weights expect of [0, 1] images, by the name `choice`
    (NORMALIZATION_CHOICES): auto is the library's pretrained weights' own when `pretrained`,
    else none (penrun's images in [-1, 1] as they are, as before the option)."""
    if choice not in NORMALIZATION_CHOICES:
        raise ValueError(f"normalization={choice!r} is invalid; valid: {', '.join(NORMALIZATION_CHOICES)}")
    if choice == "auto":
        return pretrained_info(source, arch)[1] if pretrained else None
    if choice == "none":
        return None
    mean, std = NORMALIZATIONS[choice]
    if len(mean) != channels:
        raise ValueError(
            f"normalization={choice} standardizes images of {len(mean)} channels, not of {channels}: "
            "use none, or RGB images"
        )
    return mean, std


def _torchvision_weights(arch: str) -> Any:
    weights = _torchvision().get_model_weights(arch)
    if not list(weights):
        raise ValueError(f"pretrained=True: torchvision has no pretrained weights for arch={arch!r}")
    return weights.DEFAULT


def _timm_pretrained(arch: str) -> Any:
    config = _timm().models.get_pretrained_cfg(arch)
    if config is None:
        raise ValueError(f"pretrained=True: timm has no pretrained weights for arch={arch!r}")
    return config


def library_weights(source: str, arch: str) -> dict[str, torch.Tensor]:
    """The library's pretrained state_dict of `arch`, from its cache (downloaded there first
    if missing). Offline without them: a ValueError naming the file to put into the cache."""
    if source == "torchvision":
        weights = _torchvision_weights(arch)
        try:
            return weights.get_state_dict(progress=False)
        except OSError as err:  # urllib's URLError: no network
            target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise ValueError(
                f"pretrained=True: torchvision's {arch} weights are not in its cache and could not be "
                f"downloaded ({err}); put {weights.url} at {target}"
            ) from err
    import huggingface_hub.constants  # timm depends on it

    return _timm_weights(arch, huggingface_hub.constants)


def _timm_weights(arch: str, constants: Any) -> dict[str, torch.Tensor]:
    """timm's pretrained weights from the Hugging Face cache (`constants`: huggingface_hub's,
    read at each call); downloaded only when they are not there and the hub answers (offline,
    huggingface_hub retries each file for ~25 s first)."""
    config = _timm_pretrained(arch)
    try:
        with _hub_offline(constants):  # the cache alone: no request when the weights are there
            return _timm().create_model(arch, pretrained=True).state_dict()
    except OSError:  # huggingface_hub's LocalEntryNotFoundError: not in the cache
        pass
    if not constants.HF_HUB_OFFLINE and hub_reachable(constants.ENDPOINT):
        return _timm().create_model(arch, pretrained=True).state_dict()
    raise ValueError(
        f"pretrained=True: timm's {arch} weights are not in the Hugging Face cache and {constants.ENDPOINT} "
        f"cannot be reached; fill {constants.HF_HUB_CACHE} with {config.hf_hub_id} (hf "
        f"download {config.hf_hub_id} where there is a network, then copy the cache)"
    )


@contextmanager
def _hub_offline(constants: Any) -> Iterator[None]:
    """huggingface_hub reads its offline switch at each call: on, it answers from the cache alone."""
    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to `endpoint`'s host (or to the https proxy configured to reach
    it) opens within `timeout` seconds."""
    url = urlparse(endpoint)
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError:
        return False
    return True


def load_pretrained(module: nn.Module, weights: dict[str, torch.Tensor], head_layer: str) -> None:
    """The library's weights into `module`; a head built for another class count keeps its
    fresh weights (the network starts from the pretrained body)."""
    own = module.state_dict()
    head_keys = {key for key in own if key.startswith(f"{head_layer}.")}
    if any(weights.get(key, own[key]).shape != own[key].shape for key in head_keys):
        weights = {key: value for key, value in weights.items() if key not in head_keys}
        weights |= {key: own[key] for key in head_keys}
    load_weights(module, weights)


def load_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A state_dict of the bare library network into it, refusing one that does not fit with
    its first mismatching key."""
    mismatch = first_mismatch(module.state_dict(), state)
    if mismatch:
        raise ValueError(f"the state_dict does not fit the network: {mismatch}")
    module.load_state_dict(state)


def first_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    for key, value in own.items():
        if key not in state:
            return f"{key} is missing from it"
        if state[key].shape != value.shape:
            return f"{key} has shape {tuple(state[key].shape)}, the network's {tuple(value.shape)}"
    unexpected = [key for key in state if key not in own]
    return f"{unexpected[0]} is not a parameter or buffer of the network" if unexpected else None


def head_classes(head_layer: str, state: dict[str, torch.Tensor]) -> int | None:
    """The class count a state_dict's head layer gives (None when it lacks the layer)."""
    weight = state.get(f"{head_layer}.weight")
    return None if weight is None or weight.dim() != 2 else weight.shape[0]


def find_head(module: nn.Module, arch: str, channels: int, image_size: int) -> str:
    """The name of the last nn.Linear whose outputs are the network's logits."""
    heads = _logit_layers(module, arch, channels, image_size)
    if not heads:
        linear = [name for name, layer in module.named_modules() if isinstance(layer, nn.Linear)]
        raise ValueError(
            f"no nn.Linear of {arch} gives its logits (its nn.Linear layers: {linear[-4:]}); name the "
            "final layer with head_layer=NAME"
        )
    return heads[-1]


def check_head(net: HookedClassifier, head_layer: str, arch: str, channels: int, image_size: int) -> None:
    """A named head must give the logits: the vMF model is that of the network's own final layer."""
    heads = _logit_layers(net.module, arch, channels, image_size)
    if head_layer not in heads:
        found = f"; the layer that does: {heads[-1]!r}" if heads else ""
        raise ValueError(
            f"head_layer={head_layer!r} is an nn.Linear whose outputs are not the logits of {arch}{found}"
        )


def _logit_layers(module: nn.Module, arch: str, channels: int, image_size: int) -> list[str]:
    """The nn.Linear layers whose outputs are the logits, in the order they run, from one
    forward pass of two random images (which also checks that the network takes them)."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda _layer, _inputs, out, name=name: outputs.__setitem__(name, out))
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear)
    ]
    x = torch.randn(2, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    was_training = module.training
    try:
        with torch.no_grad():
            logits = module.eval()(x)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ValueError(
            f"{arch} cannot take images of channels={channels} and image_size={image_size}: {first}"
        ) from err
    finally:
        module.train(was_training)
        for hook in hooks:
            hook.remove()
    return [
        name
        for name, out in outputs.items()
        if isinstance(out, torch.Tensor) and out.shape == logits.shape and torch.equal(out, logits)
    ]
