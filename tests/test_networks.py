"""Networks of torchvision and timm (models/networks.py) as teachers, students and evaluators:
the GD identity on real library networks, their weights (a state_dict, the library's pretrained
ones), the statistics recorded once, every task end to end, and every error a user can hit."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from penrun import PenultimateModel
from penrun.app.config import classifier_spec
from penrun.core.statistics import activation_statistics
from penrun.data import ImageData
from penrun.models import HookedClassifier, build_classifier, networks
from penrun.train.checkpoint import load_checkpoint, load_classifier

from conftest import compose_config, run_main

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # torchvision's pretrained normalization
# Digits as a library network takes them: 32x32 RGB, a few hundred images.
SMALL = [
    "data.image_size=32",
    "data.channels=3",
    "data.limit_train=240",
    "data.limit_test=60",
    "data.val_size=40",
]


@pytest.mark.parametrize(
    ("source", "arch", "head", "dim"),
    [
        ("torchvision", "resnet18", "fc", 512),
        ("torchvision", "mobilenet_v3_small", "classifier.3", 1024),
        ("timm", "test_vit", "head", 64),
    ],
)
@torch.no_grad()
def test_the_gd_identity_holds_on_library_networks(source: str, arch: str, head: str, dim: int) -> None:
    """The vMF mixture of the found final layer, with the activations its hook catches: its
    posterior is torch.softmax of the network's own logits (its forward, not penrun's head)."""
    torch.manual_seed(0)
    net = build_classifier(arch, source=source, channels=3, image_size=32, num_classes=10).eval()
    assert isinstance(net, HookedClassifier) and net.head_name == head and net.penultimate_dim == dim
    x = torch.rand(20, 3, 32, 32) * 2 - 1
    # Logits far from uniform, so that the identity is not trivial: batch norm with these images'
    # statistics (fresh running statistics make MobileNetV3's features at 32 px all alike), torch's
    # default init of the linear layers (MobileNetV3's own is near zero), a sharp head.
    for layer in net.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.momentum = 1.0
    net.train()(x)
    net.eval()
    net.head.layer.weight.mul_(30)
    logits = net.module(x)
    h = net.features(x)
    assert h.shape == (20, dim)
    y = torch.arange(20) % 10  # every class present, for the statistics a linear head's radius needs
    model = PenultimateModel.from_classifier(net, activation_statistics(h, y, 10)).to(dtype=torch.float64)
    softmax = torch.softmax(logits.double(), dim=1)
    assert softmax.max() > 0.5 and softmax.argmax(1).unique().numel() > 1  # not uniform, not all alike
    torch.testing.assert_close(model.posterior(h.double()), softmax, atol=1e-6, rtol=1e-5)


def test_a_student_starts_from_pretrained_weights_with_a_fresh_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrained=true for 10 classes: the body is the library's, the 1000-class head is not."""
    library = torchvision.models.resnet18(num_classes=1000).state_dict()
    monkeypatch.setattr(networks, "library_weights", lambda source, arch: library)
    net = build_classifier(
        "resnet18", source="torchvision", channels=3, image_size=32, num_classes=10, pretrained=True
    )
    own = net.module.state_dict()
    assert torch.equal(own["layer4.1.conv2.weight"], library["layer4.1.conv2.weight"])
    assert torch.equal(own["bn1.running_var"], library["bn1.running_var"])
    assert own["fc.weight"].shape == (10, 512)


def test_the_normalization_maps_penrun_images_to_what_the_weights_expect() -> None:
    module = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # penrun's images in [-1, 1]
    mean, std = torch.tensor(IMAGENET[0]).view(1, 3, 1, 1), torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    by_hand = module(((x + 1) / 2 - mean) / std)
    with torch.no_grad():
        torch.testing.assert_close(HookedClassifier(module, "fc", IMAGENET)(x), by_hand)
    assert networks.pretrained_info("torchvision", "resnet18") == (1000, IMAGENET)
    assert networks.pretrained_info("timm", "test_vit") == (1000, ([0.5] * 3, [0.5] * 3))


def test_a_state_dict_that_does_not_fit_names_its_first_mismatching_key() -> None:
    resnet18 = torchvision.models.resnet18(num_classes=10)
    cases = [
        (torchvision.models.resnet34(num_classes=10).state_dict(), "layer1.2.conv1.weight is not a parameter"),
        (torchvision.models.resnet18(num_classes=5).state_dict(), r"fc.weight has shape \(5, 512\), the network's \(10, 512\)"),
        ({k: v for k, v in resnet18.state_dict().items() if k != "layer2.0.bn1.bias"}, "layer2.0.bn1.bias is missing"),
    ]  # fmt: skip
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            networks.load_weights(resnet18, state)


class TwoHeads(torch.nn.Module):
    """Logits from `fc`, then (when `identity`) from an identity nn.Linear after it; `probe`, a
    linear layer registered last, does not give them."""

    def __init__(self, identity: bool, scale: float = 1.0):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
        self.fc = torch.nn.Linear(8, 3)
        self.identity = torch.nn.Linear(3, 3) if identity else None
        if identity:
            with torch.no_grad():
                self.identity.weight.copy_(torch.eye(3))
                self.identity.bias.zero_()
        self.probe = torch.nn.Linear(8, 3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        self.probe(h)
        logits = self.fc(h)
        return (self.identity(logits) if self.identity is not None else logits) * self.scale


def test_the_head_found_is_the_last_linear_layer_whose_outputs_are_the_logits() -> None:
    assert networks.find_head(TwoHeads(identity=False), "net", 3, 2) == "fc"  # not `probe`, the last
    assert networks.find_head(TwoHeads(identity=True), "net", 3, 2) == "identity"
    with pytest.raises(
        ValueError, match=r"no nn.Linear of net gives its logits .*name the final layer with head_layer"
    ):
        networks.find_head(TwoHeads(identity=False, scale=2.0), "net", 3, 2)


def test_a_named_head_must_give_the_logits() -> None:
    with pytest.raises(ValueError, match=r"head_layer='blocks.5.mlp.fc2' is an nn.Linear whose outputs are not the logits of test_vit; the layer that does: 'head'"):  # fmt: skip
        build_classifier(
            "test_vit",
            source="timm",
            channels=3,
            image_size=32,
            num_classes=10,
            head_layer="blocks.5.mlp.fc2",
        )


def test_offline_pretrained_weights_name_the_cache_file_to_fill(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    expected = f"put https://download.pytorch.org/models/resnet18-f37072fd.pth at {tmp_path}/hub/checkpoints/resnet18-f37072fd.pth"
    with pytest.raises(ValueError, match=expected):
        networks.library_weights("torchvision", "resnet18")
    huggingface_hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(huggingface_hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=f"fill {tmp_path}/hf with timm/test_vit.r160_in1k"):
        networks.library_weights("timm", "test_vit")


def hf_cache_with(cache: Path, repo: str, weights: dict[str, torch.Tensor]) -> None:
    """A Hugging Face hub cache holding `weights` as the repo's model.safetensors (its layout:
    models--ORG--NAME/refs/main names the snapshot)."""
    from safetensors.torch import save_file

    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, folder / "snapshots" / commit / "model.safetensors"
    )


def test_timm_weights_come_from_the_cache_first_and_fail_fast_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With the hub unreachable (every connection refused) and huggingface_hub's offline switch
    off: weights in the cache load without a request, and missing ones are refused at once (not
    after huggingface_hub's ~50 s of retries) naming the cache to fill. Fails if the cache is
    not tried first (cached weights refused), or if the hub is asked without checking that it
    answers (the retries: over the time bound)."""
    import time

    constants = pytest.importorskip("huggingface_hub.constants")

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("offline")

    monkeypatch.setattr(networks.socket, "create_connection", refused)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(
        ValueError, match=f"cannot be reached; fill {tmp_path}/hub with timm/test_vit.r160_in1k"
    ):
        networks.library_weights("timm", "test_vit")
    assert time.perf_counter() - start < 5 and constants.HF_HUB_OFFLINE is False  # the switch restored
    torch.manual_seed(3)
    weights = networks._create("timm", "test_vit", None).state_dict()
    hf_cache_with(tmp_path / "hub", "timm/test_vit.r160_in1k", weights)
    loaded = networks.library_weights("timm", "test_vit")
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_the_hub_is_reachable_when_it_or_its_proxy_accepts_a_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A local listening socket stands for the hub, then for an https proxy in front of an
    unresolvable host. Fails if the proxy is ignored or the port is not the endpoint's."""
    import socket

    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert networks.hub_reachable(f"http://127.0.0.1:{port}")
        assert not networks.hub_reachable("https://hub.invalid", timeout=1)
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        assert networks.hub_reachable("https://hub.invalid", timeout=1)
    assert not networks.hub_reachable(f"http://127.0.0.1:{port}", timeout=1)  # closed now


# ---------------------------------------------------------------- through the command line
@pytest.fixture(scope="module")
def resnet_state_dicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A torchvision ResNet-18 as plain PyTorch saves it (randomly initialized: the identity and
    the statistics hold for any weights), and state_dicts that do not fit it."""
    root = tmp_path_factory.mktemp("state_dicts")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    paths = {"resnet18": root / "resnet18.pt", "five": root / "five.pt", "resnet34": root / "resnet34.pt"}
    torch.save(net.state_dict(), paths["resnet18"])
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), paths["five"])
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), paths["resnet34"])
    return paths


def run_ok(args: list[str], cwd: Path) -> str:
    done = run_main([*args, f"paths.output_dir={cwd / 'outputs'}"], cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def metrics_of(cwd: Path, task: str) -> dict:
    (path,) = (cwd / "outputs" / "runs" / task).rglob("metrics.json")
    return json.loads(path.read_text())


TORCHVISION_TEACHER = ["net@teacher=torchvision", "teacher.arch=resnet18"]


def test_record_statistics_then_fit_and_the_cache_of_a_bare_state_dict(
    resnet_state_dicts: dict[str, Path], tmp_path: Path
) -> None:
    """record_statistics writes a penrun checkpoint of the state_dict and prints its override;
    task=fit given that checkpoint (with penrun's default net@teacher) or the bare state_dict
    (which finds the same cached checkpoint) diagnoses it with posterior = softmax."""
    sd = resnet_state_dicts["resnet18"]
    out = run_ok(["task=record_statistics", *TORCHVISION_TEACHER, f"teacher_ckpt={sd}", *SMALL], tmp_path)
    (line,) = [line for line in out.splitlines() if line.startswith("teacher_ckpt=")]
    path = Path(line.removeprefix("teacher_ckpt="))
    ckpt = load_checkpoint(path)
    assert ckpt["classifier"]["source"] == "torchvision" and ckpt["classifier"]["head_layer"] == "fc"
    # Its statistics are those of the module's own fc input (a hook of plain torch) on the 200
    # training images left after 40 are held out for validation.
    assert ckpt["activation_stats"]["count"].sum() == 200
    module = torchvision.models.resnet18(num_classes=10).eval()
    module.load_state_dict(torch.load(sd, weights_only=True))
    torch.testing.assert_close(ckpt["modules"]["model"]["module.fc.weight"], module.fc.weight.detach())
    mtime = path.stat().st_mtime_ns

    run_ok(["task=fit", f"teacher_ckpt={path}", *SMALL, "fit.samples_per_class=50"], tmp_path)
    given = metrics_of(tmp_path, "fit")
    assert given["dim"] == 512 and given["posterior_max_abs_diff"] < 1e-4
    assert given["generative_acc"] == given["softmax_acc"]
    assert len(given["options"]) == 4  # the calibrations read the recorded statistics

    args = [
        "task=fit",
        *TORCHVISION_TEACHER,
        f"teacher_ckpt={sd}",
        *SMALL,
        "fit.samples_per_class=50",
        "seed=1",
    ]
    run_ok(args, tmp_path)
    bare = [m for m in map(json.loads, map(Path.read_text, (tmp_path / "outputs/runs/fit").rglob("metrics.json"))) if m != given]  # fmt: skip
    assert bare[0]["teacher_ckpt"] == str(path) and path.stat().st_mtime_ns == mtime  # the cached one
    assert bare[0]["softmax_acc"] == given["softmax_acc"]


def test_distill_and_vae_with_torchvision_networks(
    resnet_state_dicts: dict[str, Path], tmp_path: Path
) -> None:
    """distill: a torchvision teacher (a bare state_dict) and a torchvision student built for
    the data's classes; vae: the same teacher and a torchvision evaluator."""
    sd = resnet_state_dicts["resnet18"]
    student = ["net@student=torchvision", "student.arch=mobilenet_v3_small"]
    run_ok(
        ["task=distill", *TORCHVISION_TEACHER, f"teacher_ckpt={sd}", *student, "method=kd", *SMALL,
         "transfer.limit_train=120", "transfer.limit_test=60", "distill.val_per_class=2", "trainer.max_epochs=1",
         "trainer.batch_size=32"],
        tmp_path,
    )  # fmt: skip
    metrics = metrics_of(tmp_path, "distill")
    assert metrics["teacher_ckpt"].startswith(str(tmp_path / "outputs" / "statistics"))
    (last,) = (tmp_path / "outputs" / "runs" / "distill").rglob("last.pt")
    (student_state,) = load_checkpoint(last)["modules"].values()
    assert student_state["module.classifier.3.weight"].shape == (10, 1024)  # for digits' ten classes

    evaluator = ["net@evaluator=torchvision", "evaluator.arch=resnet18", f"evaluator_ckpt={sd}"]
    run_ok(
        ["task=vae", *TORCHVISION_TEACHER, f"teacher_ckpt={sd}", *evaluator, *SMALL, "trainer.max_epochs=1",
         "gen.eval_per_class=4", "gen.grid_per_class=2"],
        tmp_path,
    )  # fmt: skip
    metrics = metrics_of(tmp_path, "vae")
    assert metrics["teacher_ckpt"] == metrics["evaluator_ckpt"]  # one state_dict, one cached checkpoint


def image_folder(root: Path, classes: int, per_class: int) -> Path:
    """root/{train,test}/<class>/: RGB images whose colour tells the class."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 80, (40, 36, 3)) + np.array([170 * (k == c) for c in range(3)])
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_record_statistics_and_fit_on_an_image_folder(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images", classes=3, per_class=12)
    torch.manual_seed(0)
    sd = tmp_path / "mobilenet.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), sd)
    data = ["data=folder", f"data.root={root}", "data.image_size=32", "data.val_size=6", "data.workers=0"]
    teacher = ["net@teacher=torchvision", "teacher.arch=mobilenet_v3_small", f"teacher_ckpt={sd}"]
    out = run_ok(["task=record_statistics", *teacher, *data], tmp_path)
    (line,) = [line for line in out.splitlines() if line.startswith("teacher_ckpt=")]
    counts = load_checkpoint(line.removeprefix("teacher_ckpt="))["activation_stats"]["count"]
    assert counts.shape == (3,) and counts.sum() == 30  # 36 training images less 6 for validation
    run_ok(["task=fit", *teacher, *data, "fit.samples_per_class=20"], tmp_path)
    metrics = metrics_of(tmp_path, "fit")
    assert metrics["dim"] == 1024 and len(metrics["per_class"]) == 3
    assert metrics["posterior_max_abs_diff"] < 1e-4


FEW = ["data.limit_train=50", "data.val_size=10"]  # 40 images: the statistics of every class


@torch.no_grad()
def test_imagenet_normalization_of_a_state_dict_trained_elsewhere(
    resnet_state_dicts: dict[str, Path], tmp_path: Path
) -> None:
    """teacher.normalization=imagenet, no pretrained weights: the penrun checkpoint that
    record_statistics makes of a bare state_dict gives the plain torchvision module's logits on
    images normalized by hand as torchvision's recipe does (ToTensor's [0, 1], then Normalize of
    the ImageNet statistics). At its default (auto: none without pretrained) the images go in as
    they are and the spec is the one without the key (cached statistics stay found). Fails if
    the option is ignored, normalizes [-1, 1] images without mapping them to [0, 1] first, or
    enters the spec at its default."""
    sd = resnet_state_dicts["resnet18"]
    module = torchvision.models.resnet18(num_classes=10).eval()
    module.load_state_dict(torch.load(sd, weights_only=True))
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    by_hand = module(((x + 1) / 2 - mean) / std)
    args = ["task=record_statistics", *TORCHVISION_TEACHER, f"teacher_ckpt={sd}", *SMALL, *FEW]
    out = run_ok([*args, "teacher.normalization=imagenet"], tmp_path)
    (line,) = [line for line in out.splitlines() if line.startswith("teacher_ckpt=")]
    net, ckpt = load_classifier(line.removeprefix("teacher_ckpt="))
    torch.testing.assert_close(net.eval()(x), by_hand)
    assert ckpt["classifier"]["normalization"] == IMAGENET

    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    data = ImageData("rgb", images, torch.zeros(2, dtype=torch.int64), images, torch.zeros(2), 10, "test")
    spec = classifier_spec(compose_config(["task=fit", *TORCHVISION_TEACHER]), "teacher", data)
    assert "normalization" not in spec
    net = build_classifier(**spec)
    networks.load_weights(net.module, torch.load(sd, weights_only=True))
    torch.testing.assert_close(net.eval()(x), module(x))
    assert not torch.allclose(module(x), by_hand)  # the two cases differ


def test_named_normalizations_resolve_by_the_weights() -> None:
    """auto is the pretrained weights' own (timm's test_vit: mean = std = 0.5), none even with
    pretrained weights, imagenet whatever the weights; grey images cannot take imagenet's."""
    resolve = networks.input_normalization
    inception = ([0.5] * 3, [0.5] * 3)
    assert resolve("auto", source="timm", arch="test_vit", pretrained=True, channels=3) == inception
    assert resolve("auto", source="timm", arch="test_vit", pretrained=False, channels=3) is None
    assert resolve("none", source="torchvision", arch="resnet18", pretrained=True, channels=3) is None
    assert resolve("imagenet", source="timm", arch="test_vit", pretrained=True, channels=3) == IMAGENET
    with pytest.raises(
        ValueError, match="normalization=imagenet standardizes images of 3 channels, not of 1"
    ):
        resolve("imagenet", source="torchvision", arch="resnet18", pretrained=False, channels=1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["teacher.arch=resnet19"], "teacher.arch='resnet19' is not a torchvision classifier; close names: resnet18"),
        (["teacher.head_layer=avgpool", "teacher_ckpt=SD"], "teacher.head_layer='avgpool' is a AdaptiveAvgPool2d: the head must be an nn.Linear"),
        (["teacher_ckpt=resnet34"], "does not fit teacher.arch=resnet18: the state_dict does not fit the network: layer1.2.conv1.weight is not a parameter or buffer of the network"),
        (["teacher_ckpt=five"], "(head fc) has 5 classes, the data digits 10: use the data the network was trained on"),
        (["teacher.pretrained=true"], "teacher.pretrained=true (torchvision's resnet18) has 1000 classes, the data digits 10"),
        (["teacher_ckpt=SD", "data.channels=1"], "resnet18 cannot take images of data.channels=1 and data.image_size=32"),
        (["net@teacher=mlp", "teacher.pretrained=true"],
         "teacher.pretrained=true is for torchvision and timm networks: choose one with net@teacher=torchvision|timm"),
        (["net@teacher=mlp", "teacher.normalization=imagenet"],
         "teacher.normalization=imagenet is for torchvision and timm networks"),
        (["teacher_ckpt=SD", "teacher.normalization=cifar"], "teacher.normalization='cifar' is invalid; valid: auto, none, imagenet"),
        (["teacher_ckpt=SD", "teacher.normalization=imagenet", "data.channels=1"],
         "teacher.normalization=imagenet standardizes images of 3 channels, not of 1"),
        (["task=vae", "net@teacher=mlp", "net@evaluator=torchvision", "evaluator.arch=resnet19"],
         "evaluator.arch='resnet19' is not a torchvision classifier"),  # before the teacher is trained
        (["net@student=torchvision", "student.pretrained=true", "teacher_ckpt=SD", "task=distill"],
         "student.pretrained=True: torchvision's resnet18 weights are not in its cache and could not be downloaded"),
    ],
)  # fmt: skip
def test_bad_library_networks_are_one_line_errors_before_training(
    args: list[str],
    message: str,
    resnet_state_dicts: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: (_ for _ in ()).throw(URLError("offline")))
    paths = {"SD": resnet_state_dicts["resnet18"], **resnet_state_dicts}
    args = [
        f"teacher_ckpt={paths[a.partition('=')[2]]}" if a.startswith("teacher_ckpt=") else a for a in args
    ]
    task = [] if any(a.startswith("task=") for a in args) else ["task=fit"]
    teacher = [] if any(a.startswith("net@teacher=") for a in args) else TORCHVISION_TEACHER
    done = run_main([*task, *teacher, "data.image_size=32", "data.channels=3", *args,
                     f"paths.output_dir={tmp_path / 'outputs'}"], tmp_path)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("last.pt"))  # refused before any training


def test_timm_without_the_extra_is_refused_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    done = run_main(["task=fit", "net@teacher=timm", "teacher.arch=test_vit"], tmp_path)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "penrun: error: teacher.source='timm' needs the timm package: pip install 'penrun[timm]'"
    )
