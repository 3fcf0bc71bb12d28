"""app/teachers.py: which config keys make a cached teacher's identity (its cache folder)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf

import penrun
from penrun.app import schema, teachers
from penrun.app.errors import ConfigError, InputError
from penrun.app.teachers import teacher_identity
from penrun.core.penultimate import EmpiricalRadius
from penrun.data import ImageData
from penrun.models import build_classifier
from penrun.train.files import exclusive_lock, save_json, save_torch
from penrun.train.run_folder import made_by

from conftest import compose_config

# The nodes a cached classifier is trained from: its data, network, trainer and seed. Every other
# key (the student's, the distill options, the run's seed, ...) must leave the cache alone.
SHAPES = {
    "teacher": ("data", "teacher", "teacher_trainer", "teacher_seed"),
    "evaluator": ("data", "evaluator", "evaluator_trainer", "evaluator_seed"),
}
# Network keys of torchvision and timm networks alone, which a penrun network ignores (the
# identity of a penrun network leaves them out, so that the teachers cached before they
# existed stay found).
LIBRARY_ONLY = ("pretrained", "head_layer")


def schema_leaves(node: type, prefix: str = "") -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every leaf key of a schema dataclass and its nested nodes: (its field, its type)."""
    hints = typing.get_type_hints(node)
    leaves: dict[str, tuple[dataclasses.Field, Any]] = {}
    for f in dataclasses.fields(node):
        hint = hints[f.name]
        nested = [k for k in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(k)]
        if nested:
            leaves |= schema_leaves(nested[0], f"{prefix}{f.name}.")
        else:
            leaves[f"{prefix}{f.name}"] = (f, hint)
    return leaves


def another_value(value: Any, f: dataclasses.Field, hint: Any) -> Any:
    """A value of the field's type other than `value` (a choice of its own when it has choices)."""
    if "choices" in f.metadata:
        return next(c for c in f.metadata["choices"] if c != value)
    kinds = {typing.get_origin(k) or k for k in typing.get_args(hint) or (hint,)}
    if value is None:
        value = next(k for k in (int, float, str, list, dict, bool) if k in kinds or hint is Any)()
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    if isinstance(value, dict):
        return {**value, "x": 1}
    raise AssertionError(f"no other value for {value!r} of {hint}")


def changed_keys(cfg: DictConfig, who: str) -> tuple[set[str], set[str]]:
    """(the keys of the config whose change changes `who`'s identity, the keys set at all)."""
    args = (who, f"{who}_trainer", f"{who}_seed")
    before = teacher_identity(cfg, *args)
    changed, tried = set(), set()
    for key, (f, hint) in schema_leaves(schema.PenrunConfig).items():
        parent = key.rpartition(".")[0]
        if parent and OmegaConf.select(cfg, parent) is None:
            continue  # a node of another task
        edited = cfg.copy()
        OmegaConf.update(edited, key, another_value(OmegaConf.select(edited, key), f, hint), merge=False)
        tried.add(key)
        if teacher_identity(edited, *args) != before:
            changed.add(key)
    return changed, tried


@pytest.mark.parametrize(
    ("task", "who", "source"),
    [("distill", "teacher", "penrun"), ("distill", "teacher", "torchvision"), ("vae", "evaluator", "penrun")],
)
def test_every_key_that_shapes_a_cached_classifier_is_in_its_identity(
    task: str, who: str, source: str
) -> None:
    """Each leaf key of the schema, changed on its own: the identity of the cached teacher (or
    evaluator) changes exactly for the keys of its data, network, trainer and seed that are not
    runtime keys (progress, device, threads, CUDA graphs, data loading change no number), and
    for a penrun network not the keys of library networks. The keys come from the schema, so a
    key added to it is tried too. Fails if a node or a key drops out of the identity, if a
    runtime key is kept in it, or if another node (the student's, the run's seed) enters it."""
    cfg = compose_config([f"task={task}"])
    OmegaConf.update(cfg, f"{who}.source", source, merge=False)
    changed, tried = changed_keys(cfg, who)
    ignored = {f"{who}.{key}" for key in LIBRARY_ONLY} if source == "penrun" else set()
    shaping = {
        k
        for k in tried
        if k.split(".")[0] in SHAPES[who] and k not in schema.RUNTIME_KEYS and k not in ignored
    }
    assert {f"{who}.arch", f"{who}.source", "data.name", f"{who}_trainer.lr", f"{who}_seed"} <= shaping
    assert {f"{who}_trainer.progress", f"{who}_trainer.device", "seed", "student.arch"} <= tried - shaping
    assert changed - shaping == set(), "keys that do not shape the classifier change its identity"
    assert shaping - changed == set(), "keys that shape the classifier leave its identity alone"


@pytest.mark.parametrize(
    ("overrides", "folder_digest"),
    [([], "f2088d6b31"), (["pair=mnist_usps"], "31efe461dd"), (["task=vae"], "f2088d6b31")],
)
def test_teachers_cached_by_penrun_0_2_stay_found(overrides: list[str], folder_digest: str) -> None:
    """The digests of the cache folders that penrun 0.2.0 trained these teachers into (the MNIST
    LeNet-5 of the tables: outputs/teachers/mnist-lenet5-seed0-31efe461dd): keys that joined the
    schema since (network sources, image folders, precision) leave them alone at their defaults.
    Fails if a new key with its default enters the identity, which would retrain every teacher."""
    identity = teacher_identity(compose_config(overrides))
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    assert digest == folder_digest


# ---------------------------------------------------------------- cached, given and library teachers
def tiny_digits(n_train: int = 40, classes: int = 10, size: int = 8, channels: int = 1) -> ImageData:
    """Random images shaped like digits (8x8, one channel), every class present."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train, channels, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n_train) % classes
    return ImageData("digits", x, y, x[:20].clone(), y[:20].clone(), classes, "test")


def tiny_teacher_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    return compose_config(
        [
            "task=distill",
            f"paths.output_dir={tmp_path}",
            "teacher_trainer.max_epochs=1",
            "teacher_trainer.progress=false",
            "data.val_size=10",
            *overrides,
        ]
    )


def said_by_teachers(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What app/teachers.py logged (other loggers may be on too, as an earlier run left them)."""
    return [record.getMessage() for record in caplog.records if record.name == teachers.log.name]


def sha1_10(identity: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def test_a_teacher_is_trained_once_into_the_folder_of_its_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no teacher_ckpt the teacher is trained into teachers/<data>-<arch>-seed<N>-<the first
    10 hex digits of the SHA-1 of its identity's sorted JSON>, on the training split less
    data.val_size (30 of 40 images), and found there the second time without training; another
    teacher_seed is another folder. Fails if the folder's name or key changes, if the validation
    images are trained on, or if a cached teacher is trained again."""
    cfg, data = tiny_teacher_cfg(tmp_path), tiny_digits()
    model, ckpt, path = teachers.obtain_classifier(cfg, data)
    folder = tmp_path / "teachers" / f"digits-mlp-seed0-{sha1_10(teacher_identity(cfg))}"
    assert path == folder / "checkpoints" / "last.pt" and path.is_file()
    assert ckpt["epoch"] == 1 and ckpt["classifier"]["num_classes"] == 10
    assert ckpt["activation_stats"]["count"].sum() == 30  # the statistics of the 30 trained on
    assert model.head.weight.shape[0] == 10 and not model.training
    stored = json.loads((folder / "metrics.json").read_text())
    assert stored["status"] == "complete" and stored["config"] == teacher_identity(cfg)

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached teacher was trained again")

    monkeypatch.setattr(teachers, "train_and_record", no_training)
    again = teachers.obtain_classifier(cfg, data)
    assert again[2] == path and torch.equal(again[0].head.weight, model.head.weight)
    # pretrained means nothing to a penrun network: the same cached teacher
    assert teachers.obtain_classifier(tiny_teacher_cfg(tmp_path, "teacher.pretrained=true"), data)[2] == path
    other = tiny_teacher_cfg(tmp_path, "teacher_seed=3")
    with pytest.raises(AssertionError, match="trained again"):
        teachers.obtain_classifier(other, data)


def test_a_given_checkpoint_or_run_folder_is_loaded_and_must_fit_the_data(tmp_path: Path) -> None:
    """teacher_ckpt names a penrun checkpoint, or a run folder standing for its last.pt; a folder
    without one, and a checkpoint of other images or classes, are refused naming what differs.
    Fails if the folder's last.pt is not the one read, or if a mismatch passes."""
    torch.manual_seed(0)
    spec = {"arch": "mlp", "channels": 1, "image_size": 8, "num_classes": 10, "penultimate_dim": 16}
    net = build_classifier(**spec)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_torch(run / "checkpoints" / "last.pt", teachers.classifier_checkpoint(spec, net, {}, {"made": 1}))
    for given in (run, run / "checkpoints" / "last.pt"):
        model, ckpt, path = teachers.obtain_classifier(
            tiny_teacher_cfg(tmp_path, f"teacher_ckpt={given}"), tiny_digits()
        )
        assert path == run / "checkpoints" / "last.pt" and ckpt["made_from"] == '{"made": 1}'
        assert torch.equal(model.head.weight, net.head.weight)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ConfigError,
        match=r"^teacher_ckpt='.*empty' is a folder without checkpoints/last.pt: pass a "
        r"checkpoint file or a run folder$",
    ):
        teachers.obtain_classifier(tiny_teacher_cfg(tmp_path, f"teacher_ckpt={empty}"), tiny_digits())
    wide = tiny_digits(classes=4, size=6, channels=3)
    with pytest.raises(
        ConfigError,
        match=r"^teacher checkpoint '.*last.pt' does not fit the data: num_classes 10 \(data digits: 4\), "
        r"channels 1 \(data digits: 3\), image_size 8 \(data digits: 6\)\. Use a teacher trained on this data",
    ):
        teachers.obtain_classifier(tiny_teacher_cfg(tmp_path, f"teacher_ckpt={run}"), wide)


def test_penultimate_model_takes_the_vmf_options_and_names_the_fix_for_missing_statistics() -> None:
    """A cosine head of scale 16: kappa_k = 16 x kappa_scale; direction, kappa and radius reach
    the model. A linear head without recorded statistics is a ConfigError naming the checkpoint
    and the record_statistics command. Fails if an option is dropped or the hint is lost."""
    torch.manual_seed(0)
    cosine = build_classifier("mlp", channels=1, image_size=8, num_classes=10, penultimate_dim=16)
    vmf = OmegaConf.create(
        {"radius": "fixed", "kappa": "weights", "kappa_scale": 2.5, "direction": "weights"}
    )
    model = teachers.penultimate_model(cosine, {}, "t.pt", vmf)
    assert torch.allclose(model.kappa, torch.full((10,), 40.0))
    assert teachers.vmf_record(vmf, model) == {
        "vmf": "weights/weights x2.5",
        "vmf_mean_kappa": pytest.approx(40.0),
    }
    assert teachers.vmf_record(vmf, None) == {"vmf": "none"}
    for key, bad in (("kappa", "fitted"), ("direction", "class_mean")):
        with pytest.raises(ConfigError, match=r"^teacher checkpoint 't.pt' cannot define p\(a \| y\): "):
            teachers.penultimate_model(cosine, {}, "t.pt", OmegaConf.merge(vmf, {key: bad}))
    linear = build_classifier(
        "mlp", channels=1, image_size=8, num_classes=10, penultimate_dim=16, head="linear"
    )
    with pytest.raises(
        ConfigError,
        match=r"^teacher checkpoint 'dir/t.pt' cannot define p\(a \| y\): .*activation_stats.*; record them with: "
        r"penrun task=record_statistics teacher_ckpt='dir/t.pt' data=<its training data>$",
    ):
        teachers.penultimate_model(linear, {}, Path("dir/t.pt"), vmf)


def test_checkpoint_files_their_hash_and_their_kind(tmp_path: Path) -> None:
    """file_sha256 is hashlib's over a file of several 1 MiB blocks; a penrun checkpoint is told
    from a bare state_dict; classifier_checkpoint holds the spec (without pretrained), the
    weights, the statistics and the identity as sorted JSON; check_classes names both counts.
    Fails if a block is skipped, the format is not checked, or a field is dropped."""
    blob = tmp_path / "blob"
    data = bytes(range(256)) * (3 * 4096 + 7)
    blob.write_bytes(data)
    assert teachers.file_sha256(blob) == hashlib.sha256(data).hexdigest()
    net = build_classifier("mlp", channels=1, image_size=8, num_classes=10, penultimate_dim=16)
    spec = {"arch": "mlp", "pretrained": True}
    stats = {"count": torch.ones(10)}
    ckpt = teachers.classifier_checkpoint(spec, net, stats, {"b": 1, "a": [2]})
    assert ckpt["format"] == "penrun-checkpoint-v2" and ckpt["epoch"] == 0
    assert ckpt["classifier"] == {"arch": "mlp", "pretrained": False} and spec["pretrained"] is True
    assert ckpt["modules"]["model"].keys() == net.state_dict().keys() and ckpt["activation_stats"] is stats
    assert ckpt["made_from"] == '{"a": [2], "b": 1}'
    save_torch(tmp_path / "penrun.pt", ckpt)
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    torch.save({**ckpt, "format": "other"}, tmp_path / "other.pt")
    assert teachers.is_penrun_checkpoint(tmp_path / "penrun.pt")
    assert not teachers.is_penrun_checkpoint(tmp_path / "bare.pt")
    assert not teachers.is_penrun_checkpoint(tmp_path / "other.pt")
    teachers.check_classes(10, tiny_digits(), "x")
    with pytest.raises(
        ConfigError, match=r"^net has 7 classes, the data digits 10: use the data the network was trained on$"
    ):
        teachers.check_classes(7, tiny_digits(), "net")


def test_a_library_state_dict_becomes_a_cached_checkpoint_with_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A torchvision ResNet-18's bare state_dict: its weights in a penrun checkpoint under
    statistics/<data>-<arch>-<SHA-1 of its identity>.pt, with the statistics of the 30 training
    images left after data.val_size=10; the identity holds the file's SHA-256, the spec and the
    data node less how it is read (data.in_memory, memory_mb, workers). Found there the second time
    and when read otherwise; a head of other classes, weights of another network
    and the library's own 1000-class weights are refused in one line, and so is a normalization
    other than the one the checkpoint was recorded under. Fails if the identity or
    the cache key loses a part, the weights are not loaded, or a wrong file passes."""
    torch.manual_seed(0)
    paths = {name: tmp_path / f"{name}.pt" for name in ("resnet18", "seven", "resnet34")}
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), paths["resnet18"])
    # Hand-made state_dicts: a head of 7 classes, and weights of another network with 10.
    torch.save({"fc.weight": torch.zeros(7, 512), "fc.bias": torch.zeros(7)}, paths["seven"])
    torch.save({"fc.weight": torch.zeros(10, 512), "stem.weight": torch.zeros(3)}, paths["resnet34"])
    library = ["net@teacher=torchvision", "teacher.arch=resnet18"]
    data = tiny_digits(channels=3, size=32)
    # an interpolated key counts by its value (teacher_trainer plays no part here)
    linked = ["teacher_trainer.max_epochs=10", "data.val_size=${teacher_trainer.max_epochs}"]
    cfg = tiny_teacher_cfg(tmp_path, *library, f"teacher_ckpt={paths['resnet18']}", *linked)
    with caplog.at_level(logging.INFO, logger="penrun.app.teachers"):
        model, ckpt, path = teachers.obtain_classifier(cfg, data)
    identity = json.loads(ckpt["made_from"])
    assert said_by_teachers(caplog) == ["teacher resnet18: activation statistics of 30 training images"]
    assert path == tmp_path / "statistics" / f"digits-resnet18-{sha1_10(identity)}.pt"
    assert identity["weights"] == f"sha256:{hashlib.sha256(paths['resnet18'].read_bytes()).hexdigest()}"
    data_node = OmegaConf.to_container(cfg.data, resolve=True)
    assert identity["data"] == {
        k: v for k, v in data_node.items() if k not in ("in_memory", "memory_mb", "workers")
    }
    assert identity["spec"]["arch"] == "resnet18" and identity["spec"]["num_classes"] == 10
    assert ckpt["activation_stats"]["count"].sum() == 30
    state = torch.load(paths["resnet18"])
    loaded = {k.removeprefix("module."): v for k, v in model.state_dict().items()}
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    def no_statistics(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the statistics were computed again")

    monkeypatch.setattr(teachers, "statistics_of", no_statistics)
    with caplog.at_level(logging.INFO, logger="penrun.app.teachers"):
        assert teachers.obtain_classifier(cfg, data)[2] == path
    cached = f"using cached statistics {path} of teacher resnet18 ({identity['weights']})"
    assert said_by_teachers(caplog)[-1] == cached
    # how the data are read leaves the identity alone
    streamed = tiny_teacher_cfg(
        tmp_path, *library, f"teacher_ckpt={paths['resnet18']}", "data.in_memory=false", "data.workers=2"
    )
    assert teachers.obtain_classifier(streamed, data)[2] == path
    refusals = {
        f"teacher_ckpt={paths['seven']}": r"^teacher_ckpt='.*seven.pt' \(head fc\) has 7 classes, the data digits 10",
        f"teacher_ckpt={paths['resnet34']}": r"^teacher_ckpt='.*resnet34.pt' does not fit teacher.arch=resnet18: ",
        "teacher.pretrained=true": r"^teacher.pretrained=true \(torchvision's resnet18\) has 1000 classes, the data "
        r"digits 10: use the data the network was trained on$",
    }
    for override, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            teachers.obtain_classifier(tiny_teacher_cfg(tmp_path, *library, override), data)
    # the cached penrun checkpoint keeps the normalization it was recorded under (none here)
    as_recorded = tiny_teacher_cfg(tmp_path, *library, f"teacher_ckpt={path}", "teacher.normalization=none")
    assert teachers.obtain_classifier(as_recorded, data)[2] == path
    with pytest.raises(
        ConfigError,
        match=r"^teacher.normalization=imagenet: '.*\.pt' was recorded with none, which it uses; drop the option",
    ):
        teachers.obtain_classifier(
            tiny_teacher_cfg(tmp_path, *library, f"teacher_ckpt={path}", "teacher.normalization=imagenet"),
            data,
        )
    # recorded under imagenet's, it is used with it when normalization is left to auto
    monkeypatch.undo()
    imagenet = ["teacher.normalization=imagenet", f"teacher_ckpt={paths['resnet18']}"]
    recorded = teachers.obtain_classifier(tiny_teacher_cfg(tmp_path, *library, *imagenet), data)[2]
    assert recorded != path
    auto = tiny_teacher_cfg(tmp_path, *library, f"teacher_ckpt={recorded}")
    assert teachers.obtain_classifier(auto, data)[1]["classifier"]["normalization"][0] == pytest.approx(
        torchvision.models.ResNet18_Weights.DEFAULT.transforms().mean
    )
    with pytest.raises(
        ConfigError,
        match=r"^teacher.normalization=none: '.*\.pt' was recorded with mean/std \[\[0\.485, 0\.456, 0\.406\], "
        r"\[0\.229, 0\.224, 0\.225\]\], which it uses",
    ):
        teachers.obtain_classifier(
            tiny_teacher_cfg(tmp_path, *library, f"teacher_ckpt={recorded}", "teacher.normalization=none"),
            data,
        )


def stored_score(output_dir: Path, teacher_bytes: bytes, data: ImageData) -> tuple[Path, str]:
    """Where a teacher's test accuracy is kept (the first 16 hex digits of its file's SHA-256)
    and the key of a test split in it (those of the SHA-256 of its images' and labels' bytes)."""
    path = (
        output_dir / "teachers" / "test_accuracy" / f"{hashlib.sha256(teacher_bytes).hexdigest()[:16]}.json"
    )
    split = hashlib.sha256(data.x_test.numpy().tobytes() + data.y_test.numpy().tobytes())
    return path, split.hexdigest()[:16]


def test_a_teachers_test_accuracy_is_computed_once_per_checkpoint_and_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accuracy on a test split is stored in teachers/test_accuracy/<the first 16 hex digits of
    the checkpoint file's SHA-256>.json, keyed by the split's images and labels: read back the
    second time, computed again for other labels or another checkpoint file, and never stored
    for a split streamed from disk. Fails if the key ignores the labels, the images or the file,
    or if a stored score is not the one read back."""
    data = tiny_digits()
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"teacher one")
    calls: list[str] = []
    teacher, settings = object(), object()  # handed on to the scorer as they are

    def scored(given: Any, split: ImageData, given_settings: Any) -> float:
        assert given is teacher and given_settings is settings
        calls.append(split.name)
        return len(calls) / 10

    monkeypatch.setattr(teachers, "test_accuracy", scored)
    out = tmp_path / "out"
    first = teachers.cached_test_accuracy(teacher, ckpt, data, settings, out)
    assert first == 0.1 and teachers.cached_test_accuracy(teacher, ckpt, data, settings, out) == 0.1
    stored, split = stored_score(out, b"teacher one", data)
    assert json.loads(stored.read_text()) == {split: 0.1}
    relabelled = dataclasses.replace(data, y_test=(data.y_test + 1) % 10)
    redrawn = dataclasses.replace(data, x_test=255 - data.x_test)
    assert teachers.cached_test_accuracy(teacher, ckpt, relabelled, settings, out) == 0.2
    assert teachers.cached_test_accuracy(teacher, ckpt, redrawn, settings, out) == 0.3
    assert teachers.cached_test_accuracy(teacher, ckpt, data, settings, out) == 0.1
    assert len(json.loads(stored.read_text())) == 3
    ckpt.write_bytes(b"teacher two")
    assert teachers.cached_test_accuracy(teacher, ckpt, data, settings, out) == 0.4
    streamed = dataclasses.replace(data, x_test=list(data.x_test))
    assert [teachers.cached_test_accuracy(teacher, ckpt, streamed, settings, out) for _ in range(2)] == [
        0.5,
        0.6,
    ]
    assert len(list(stored.parent.glob("*.json"))) == 2


def test_a_cached_teacher_says_where_it_came_from_and_trains_on_less_validation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first run logs where the teacher is trained, the second where it was found and which
    penrun made it; the teacher's epochs are scored on the 10 held-out images (val_acc in every
    epoch of its history). Fails if the validation split is not passed to training or a log line
    loses its folder."""
    cfg, data = tiny_teacher_cfg(tmp_path), tiny_digits()
    with caplog.at_level(logging.INFO, logger="penrun.app.teachers"):
        path = teachers.obtain_classifier(cfg, data)[2]
        teachers.obtain_classifier(cfg, data)
    folder = path.parent.parent
    stored = json.loads((folder / "metrics.json").read_text())
    assert stored["penrun"]["version"] == penrun.__version__  # the stamp of the run that trained it
    assert said_by_teachers(caplog) == [
        f"training teacher mlp on digits into {folder} (cached for later runs)",
        f"using cached teacher {folder} ({made_by(stored)})",
    ]
    assert stored["val_size"] == 10 and all("val_acc" in epoch for epoch in stored["history"])


def test_an_identity_holds_resolved_values(tmp_path: Path) -> None:
    """An interpolation in the data, network or trainer node counts by its value: a config that
    says max_epochs=${trainer.max_epochs} is the teacher of one that says the number. Fails if an
    identity keeps the unresolved text (two configs of one teacher would train it twice)."""
    plain = compose_config(
        [
            "trainer.max_epochs=7",
            "teacher_trainer.max_epochs=7",
            "teacher.penultimate_dim=7",
            "data.val_size=7",
        ]
    )
    linked = compose_config(
        [
            "trainer.max_epochs=7",
            "teacher_trainer.max_epochs=${trainer.max_epochs}",
            "teacher.penultimate_dim=${trainer.max_epochs}",
            "data.val_size=${trainer.max_epochs}",
        ]
    )
    assert teacher_identity(linked) == teacher_identity(plain)


def test_a_test_accuracy_being_computed_elsewhere_is_waited_for(tmp_path: Path) -> None:
    """Two jobs of a sweep scoring one teacher: while another holds the score file's lock
    (<file>.lock beside it), the call waits, then reads the score the other stored. Fails if the
    call does not wait for the lock, or takes another one."""
    data, ckpt = tiny_digits(), tmp_path / "t.pt"
    ckpt.write_bytes(b"teacher")
    stored, split = stored_score(tmp_path, b"teacher", data)
    got: list[Any] = []

    def score() -> None:
        try:
            got.append(teachers.cached_test_accuracy(None, ckpt, data, None, tmp_path))
        except Exception as err:  # reported below, in the test's thread
            got.append(err)

    with exclusive_lock(stored.with_suffix(".lock"), wait=True):
        waiting = threading.Thread(target=score)
        waiting.start()
        time.sleep(0.5)
        assert waiting.is_alive() and got == [], f"the call did not wait for the lock: {got}"
        save_json(stored, {split: 0.75})  # what the other job computed
    waiting.join(timeout=30)
    assert got == [0.75]


def test_a_linear_heads_vmf_takes_its_radius_from_the_checkpoints_statistics() -> None:
    """A linear head has no radius of its own: radius=fixed reads the recorded per-class norm_mean
    (kappa_k = r_k |w_k| with the paper's kappa), radius=empirical the recorded quantiles. An
    error that is not about missing statistics carries no record_statistics hint. Fails if the
    checkpoint's statistics or the radius option do not reach the model."""
    torch.manual_seed(0)
    linear = build_classifier(
        "mlp", channels=1, image_size=8, num_classes=10, penultimate_dim=16, head="linear"
    )
    radii = torch.linspace(1.0, 2.0, 10)
    ckpt = {"activation_stats": {"norm_mean": radii, "norm_quantiles": torch.rand(10, 5).sort(dim=1).values}}
    vmf = OmegaConf.create(
        {"radius": "fixed", "kappa": "weights", "kappa_scale": 1.0, "direction": "weights"}
    )
    model = teachers.penultimate_model(linear, ckpt, "t.pt", vmf)
    row_norms = torch.linalg.vector_norm(linear.head.weight.detach(), dim=1)
    assert torch.allclose(model.kappa, radii * row_norms)
    only_quantiles = {"activation_stats": {"norm_quantiles": ckpt["activation_stats"]["norm_quantiles"]}}
    empirical = teachers.penultimate_model(
        linear, only_quantiles, "t.pt", OmegaConf.merge(vmf, {"radius": "empirical"})
    )
    assert isinstance(empirical.radius, EmpiricalRadius)
    with pytest.raises(
        ConfigError,
        match=r"^teacher checkpoint 't.pt' cannot define p\(a \| y\): radius must be one of 'fixed', "
        r"'empirical', got 'round'$",
    ):
        teachers.penultimate_model(linear, ckpt, "t.pt", OmegaConf.merge(vmf, {"radius": "round"}))


def test_a_checkpoint_that_needs_unpickling_is_refused_with_the_remedy(tmp_path: Path) -> None:
    """A file holding objects other than tensors (here a whole module) is refused before anything
    in it runs, and the refusal says how to save a state_dict instead."""
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(
        InputError,
        match=r"could run code from the file\. save the model's state_dict alone: "
        r"torch\.save\(model\.state_dict\(\), path\)$",
    ):
        teachers.is_penrun_checkpoint(tmp_path / "module.pt")


def test_a_checkpoint_is_read_in_the_words_of_its_network_node(tmp_path: Path) -> None:
    """A checkpoint whose network cannot be built is refused naming the node's key (here the
    evaluator's); a penrun network ignores the library-only normalization key. Fails if the
    error speaks of another node, or if a penrun network's checkpoint is checked against it."""
    spec = {"arch": "mlp", "channels": 1, "image_size": 8, "num_classes": 10, "penultimate_dim": 16}
    net = build_classifier(**spec)
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    save_torch(good, teachers.classifier_checkpoint(spec, net, {}, {}))
    save_torch(bad, teachers.classifier_checkpoint(spec | {"arch": "nope"}, net, {}, {}))
    evaluator = {"ckpt_key": "evaluator_ckpt", "net_key": "evaluator"}
    cfg = compose_config(["task=vae", f"evaluator_ckpt={bad}"])
    with pytest.raises(
        ConfigError, match=r"^checkpoint '.*bad.pt' is damaged: .*\(evaluator\.arch='nope' is invalid; "
    ):
        teachers.obtain_classifier(cfg, tiny_digits(), **evaluator)
    unused = tiny_teacher_cfg(tmp_path, f"teacher_ckpt={good}", "teacher.normalization=imagenet")
    assert teachers.obtain_classifier(unused, tiny_digits())[2] == good


def test_an_evaluator_is_cached_by_its_own_seed(tmp_path: Path) -> None:
    """The evaluator of task=vae is trained with evaluator_seed and cached under evaluators/ by
    an identity holding that seed (not teacher_seed). Fails if the seed key is not passed on."""
    cfg = compose_config(
        ["task=vae", f"paths.output_dir={tmp_path}", "evaluator_trainer.max_epochs=1",
         "evaluator_trainer.progress=false", "data.val_size=10", "evaluator_seed=5", "teacher_seed=0"]
    )  # fmt: skip
    keys = ("evaluator", "evaluator_trainer", "evaluator_seed")
    path = teachers.obtain_classifier(
        cfg, tiny_digits(), ckpt_key="evaluator_ckpt", net_key=keys[0], trainer_key=keys[1],
        seed_key=keys[2], cache="evaluators",
    )[2]  # fmt: skip
    identity = teacher_identity(cfg, *keys)
    assert identity["seed"] == 5
    folder = tmp_path / "evaluators" / f"digits-{cfg.evaluator.arch}-seed5-{sha1_10(identity)}"
    assert path == folder / "checkpoints" / "last.pt"
    assert json.loads((folder / "metrics.json").read_text())["config"] == identity
