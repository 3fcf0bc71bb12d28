"""Image folders (data=folder): layouts, class names, the seeded split, decoding (resize + crop,
grey/RGB), bad input, and the same bytes whether a split is held in memory or streamed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from penrun.data import (
    FolderImages,
    epoch_batches,
    labelled_subset,
    load_dataset,
    load_folder,
    match_classes,
    read_batches,
)
from penrun.data.folder import decode_image, resize_and_crop
from penrun.errors import InputError
from penrun.models import build_classifier
from penrun.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from penrun.train.files import save_torch

from conftest import finish, history_without_times, killer_script, run_main, run_task, start_cli, start_python


def write_images(folder: Path, count: int, size: tuple[int, int] = (8, 8), seed: int = 0) -> list[Path]:
    """`count` random RGB images (height, width), PNG and JPEG alternately."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        path = folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def image_folder(
    root: Path, classes: list[str], per_class: int, splits: tuple[str, ...] = ("train", "test"), seed: int = 0
) -> Path:
    """root/<split>/<class>/ (or root/<class>/ when splits is ()), a grey image among the RGB ones."""
    for s, split in enumerate(splits or ("",)):
        for k, name in enumerate(classes):
            write_images(root / split / name, per_class, seed=seed + 1000 * s + k)
    first = root / (splits[0] if splits else "") / classes[0]
    Image.fromarray(np.full((8, 8), 77, dtype=np.uint8), mode="L").save(first / "grey.png")
    return root


@pytest.fixture
def three(tmp_path: Path) -> Path:
    return image_folder(tmp_path / "three", ["dog", "cat", "bird"], per_class=3)


def test_train_test_layout_names_classes_sorted(three: Path) -> None:
    (three / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored by extension
    (three / "train" / "cat" / "scan.pdf").write_bytes(b"%PDF")
    data = load_folder(three, image_size=8, channels=3)
    assert data.class_names == ("bird", "cat", "dog") and data.num_classes == 3
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]  # dog has the grey image too
    assert data.y_test.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.x_train.shape == (10, 3, 8, 8) and data.x_train.dtype == torch.uint8
    assert "bird, cat, dog" in data.describe()


def test_grey_and_rgb_are_converted(three: Path) -> None:
    grey_index = 6  # dog's files sort as grey.png, img000.jpg, ...
    rgb = load_folder(three, image_size=8, channels=3)
    assert (rgb.x_train[grey_index] == 77).all()  # grey -> RGB: the value in every channel
    grey = load_folder(three, image_size=8, channels=1)
    assert grey.x_train.shape == (10, 1, 8, 8) and (grey.x_train[grey_index] == 77).all()
    # RGB -> grey: ITU-R 601 luma (PIL's integer version), within rounding
    path = three / "train" / "bird" / "img001.png"
    pixels = np.asarray(Image.open(path)).astype(float)
    luma = pixels @ np.array([0.299, 0.587, 0.114])
    assert np.abs(grey.x_train[1, 0].numpy() - luma).max() <= 1  # bird: img000.jpg, img001.png, ...


def test_hundred_classes_split_by_fraction_is_fixed_and_stratified(tmp_path: Path) -> None:
    names = [f"c{k:02d}" for k in range(100)]
    root = tmp_path / "hundred"
    for k, name in enumerate(names):
        write_images(root / name, 5 if k else 4, seed=k)  # c00 gets a grey fifth below
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "c00" / "grey.png")
    data = load_folder(root, image_size=8, channels=3, test_fraction=0.4)
    assert data.class_names == tuple(names) and data.num_classes == 100
    # round(0.4 * 5) = 2 of every class's 5 images are test images
    assert torch.bincount(data.y_test, minlength=100).tolist() == [2] * 100
    assert torch.bincount(data.y_train, minlength=100).tolist() == [3] * 100
    again = load_folder(root, image_size=8, channels=3, test_fraction=0.4)
    assert torch.equal(data.x_test, again.x_test)  # the same split every time (a fixed seed)
    train_rows = {tuple(x.flatten().tolist()) for x in data.x_train}
    test_rows = {tuple(x.flatten().tolist()) for x in data.x_test}
    assert not train_rows & test_rows and len(train_rows | test_rows) == 500


def square(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(resize_and_crop(Image.fromarray(pixels), size))


def test_resize_shorter_side_and_centre_crop_by_hand() -> None:
    # No resize needed (the shorter side is the size): the centre crop by hand.
    ramp = np.arange(10, dtype=np.uint8) * 20
    assert square(np.tile(ramp, (4, 1)), 4)[0].tolist() == [60, 80, 100, 120]  # columns 3..6 of 10
    assert square(np.tile(ramp[:, None], (1, 4)), 4)[:, 0].tolist() == [60, 80, 100, 120]
    # Halving an 8x8 image whose top half is 0 and bottom half 200: the outer rows stay pure,
    # the two middle ones mix symmetrically.
    halves = np.zeros((8, 8), dtype=np.uint8)
    halves[4:] = 200
    out = square(halves, 4).astype(int)
    assert out[0].tolist() == [0] * 4 and out[3].tolist() == [200] * 4
    assert (out == out[:, :1]).all() and 0 < out[1, 0] < out[2, 0] < 200
    assert abs(out[1, 0] + out[2, 0] - 200) <= 1


def test_resize_matches_torch_antialiased_bilinear(tmp_path: Path) -> None:
    """An independent oracle: torch's antialiased bilinear resize of the shorter side, then the
    centre crop, agree within rounding."""
    pixels = np.random.default_rng(1).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    path = tmp_path / "odd.png"
    Image.fromarray(pixels).save(path)
    # 23 -> 8, 37 -> int(37 * 8 / 23) = 12; the crop starts at (12 - 8) // 2 = 2
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    scaled = F.interpolate(x, size=(8, 12), mode="bilinear", antialias=True, align_corners=False)
    expected = scaled[0, :, :, 2:10].round().clamp(0, 255)
    decoded = decode_image(str(path), 8, 3).float()
    assert decoded.shape == (3, 8, 8) and (decoded - expected).abs().max() <= 1


def test_corrupt_image_is_named_or_skipped_with_a_count(
    three: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = three / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = three / "test" / "dog" / "cut.png"
    truncated.write_bytes((three / "test" / "dog" / "img001.png").read_bytes()[:60])
    with pytest.raises(InputError, match=r"1 image\(s\) of the train split .* first .*cat/broken\.jpg"):
        load_folder(three, image_size=8, channels=3)
    with caplog.at_level(logging.WARNING):
        data = load_folder(three, image_size=8, channels=3, skip_corrupt=True)
    assert len(data.y_train) == 10 and len(data.y_test) == 9
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and "broken.jpg" in skipped[0] and "cut.png" in skipped[1]


def test_empty_class_folder_and_other_bad_layouts(tmp_path: Path, three: Path) -> None:
    (three / "train" / "emu").mkdir()
    with pytest.raises(InputError, match=r"class folder .*train/emu holds no images"):
        load_folder(three, image_size=8, channels=3)
    (three / "train" / "emu").rmdir()
    write_images(three / "test" / "emu", 1)
    with pytest.raises(InputError, match=r"class folders that .*train lacks: \['emu'\]"):
        load_folder(three, image_size=8, channels=3)
    with pytest.raises(InputError, match="does not exist"):
        load_folder(tmp_path / "nowhere", image_size=8, channels=3)
    mixed = tmp_path / "mixed"
    write_images(mixed / "cls", 2)
    write_images(mixed, 1)
    with pytest.raises(InputError, match=r"both image files .* and folders"):
        load_folder(mixed, image_size=8, channels=3)


def test_flat_folder_is_unlabeled(tmp_path: Path) -> None:
    write_images(tmp_path / "flat", 10)
    (tmp_path / "flat" / "README").write_text("ignored")
    data = load_folder(tmp_path / "flat", image_size=8, channels=3, test_fraction=0.2)
    assert not data.labelled and data.num_classes == 0 and data.class_names == ()
    assert len(data.y_train) == 8 and len(data.y_test) == 2
    assert data.y_train.tolist() == [-1] * 8 and data.y_test.tolist() == [-1] * 2
    assert "unlabeled" in data.describe()


def test_transfer_classes_are_matched_by_name(tmp_path: Path, three: Path) -> None:
    source = load_folder(three, image_size=8, channels=3)  # bird, cat, dog
    image_folder(tmp_path / "two", ["dog", "bird"], per_class=2)
    transfer = match_classes(
        load_folder(tmp_path / "two", image_size=8, channels=3), source.class_names, "src"
    )
    # bird, dog -> the source's labels 0 and 2
    assert transfer.y_train.tolist() == [0, 0, 2, 2, 2] and transfer.num_classes == 3
    assert transfer.class_names == source.class_names
    image_folder(tmp_path / "odd", ["dog", "zebra"], per_class=2)
    other = load_folder(tmp_path / "odd", image_size=8, channels=3)
    with pytest.raises(
        InputError, match=r"classes \['zebra'\] that src lacks.*src has \['bird', 'cat', 'dog'\]"
    ):
        match_classes(other, source.class_names, "src")


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_in_memory_batches(three: Path, workers: int) -> None:
    held = load_folder(three, image_size=6, channels=3, in_memory=True)
    streamed = load_folder(three, image_size=6, channels=3, in_memory=False, workers=workers)
    assert isinstance(streamed.x_train, FolderImages) and isinstance(held.x_train, torch.Tensor)
    assert streamed.x_train.shape == held.x_train.shape
    for epoch in (1, 2):
        order = list(epoch_batches(10, 4, shuffle=True, seed=5, epoch=epoch))
        pairs = zip(read_batches(held.x_train, order), read_batches(streamed.x_train, order), strict=True)
        for (idx_held, x_held), (idx_streamed, x_streamed) in pairs:
            assert torch.equal(idx_held, idx_streamed) and torch.equal(x_held, x_streamed)
    # indexing a streamed split selects files; loading it decodes them
    mask = held.y_train == 1
    assert torch.equal(streamed.x_train[mask].load(), held.x_train[mask])
    assert torch.equal(streamed.x_test.load(), held.x_test)


def test_auto_keeps_a_split_in_memory_under_memory_mb(three: Path) -> None:
    small = load_folder(three, image_size=8, channels=3, memory_mb=1)
    assert isinstance(small.x_train, torch.Tensor)
    # 10 images of 3x8x8 bytes are 1920 bytes: over a limit of 1000 bytes they stream
    large = load_folder(three, image_size=8, channels=3, memory_mb=1000 / 2**20)
    assert isinstance(large.x_train, FolderImages) and large.x_train.nbytes == 1920


def test_cli_refuses_a_corrupt_image_in_one_line(tmp_path: Path, three: Path) -> None:
    (three / "test" / "bird" / "bad.png").write_bytes(b"garbage")
    args = ["task=train_teacher", "data=folder", f"data.root={three}", "data.image_size=8"]
    result = run_main([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bird/bad.png" in lines[0] and "data.skip_corrupt=true" in lines[0]


def test_unlabeled_examples_are_one_more_class_of_labelled_subset() -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 1] + [-1] * 6)
    picks = labelled_subset(y, 2, 2, seed=0)
    assert torch.bincount(y[picks] + 1).tolist() == [2, 2, 2]  # two unlabeled, two of each class


def test_distill_refuses_labels_on_unlabeled_and_unmatched_classes(tmp_path: Path, three: Path) -> None:
    write_images(tmp_path / "flat", 6)
    image_folder(tmp_path / "zoo", ["cat", "zebra"], per_class=2)
    base = ["task=distill", "data=folder", f"data.root={three}", "data.image_size=8", "data@transfer=folder"]
    errors = {}
    for name, extra in {
        "unlabeled": [f"transfer.root={tmp_path / 'flat'}", "distill.labels=all"],
        "mismatch": [f"transfer.root={tmp_path / 'zoo'}"],
    }.items():
        result = run_main([*base, *extra, f"hydra.run.dir={tmp_path / name}"], tmp_path)
        assert result.returncode == 2, result.stderr
        errors[name] = result.stderr.strip().splitlines()
    assert len(errors["unlabeled"]) == 1 and "distill.labels='all'" in errors["unlabeled"][0]
    assert "flat is unlabeled; use distill.labels=none" in errors["unlabeled"][0]
    assert len(errors["mismatch"]) == 1
    assert (
        "['zebra'] that three lacks" in errors["mismatch"][0]
        and "['bird', 'cat', 'dog']" in errors["mismatch"][0]
    )


# ---------------------------------------------------------------- tasks: streamed == in memory
STREAMED = ["data.in_memory=false", "data.workers=2"]


def teacher_args(root: Path) -> list[str]:
    """A tiny train_teacher run on the image folder `root`."""
    return [
        "task=train_teacher",
        "data=folder",
        f"data.root={root}",
        "data.image_size=8",
        "trainer.batch_size=8",
    ]


def teacher_run(root: Path, run_dir: Path, extra: list[str]) -> dict:
    return run_task([*teacher_args(root), "trainer.max_epochs=2", *extra], run_dir)


def test_tasks_give_the_same_numbers_streamed_as_in_memory(tmp_path: Path) -> None:
    source = image_folder(tmp_path / "source", ["a", "b", "c"], per_class=12)
    transfer = image_folder(tmp_path / "transfer", ["c", "a"], per_class=12, seed=7)
    held = teacher_run(source, tmp_path / "teacher_held", ["data.in_memory=true"])
    streamed = teacher_run(source, tmp_path / "teacher_streamed", STREAMED)
    assert history_without_times(tmp_path / "teacher_streamed") == history_without_times(
        tmp_path / "teacher_held"
    )
    assert streamed["test_acc"] == held["test_acc"] and "a, b, c" in streamed["data"]
    distill = [
        "task=distill",
        "data=folder",
        f"data.root={source}",
        "data.image_size=8",
        "data@transfer=folder",
        f"transfer.root={transfer}",
        "transfer.shift=none",
        f"teacher_ckpt={held['checkpoint']}",
        "distill.val_per_class=2",
        "trainer.max_epochs=2",
        "trainer.batch_size=8",
    ]
    metrics = {}
    for name, extra in {
        "held": [],
        "streamed": [*STREAMED, "transfer.in_memory=false", "transfer.workers=1"],
    }.items():
        metrics[name] = run_task([*distill, *extra], tmp_path / f"distill_{name}")
        metrics[name]["history"] = history_without_times(tmp_path / f"distill_{name}")
    assert metrics["streamed"] == metrics["held"]
    # 2 classes of 12 and the grey image, less the unlabeled protocol's seeded hold-out:
    # val_per_class x the teacher's 3 classes, drawn without reading a label
    assert metrics["held"]["transfer_train_size"] == 2 * 12 + 1 - 2 * 3


def test_a_killed_streamed_run_resumes_to_the_in_memory_numbers(tmp_path: Path) -> None:
    """Killed in epoch 3 while streaming, resumed streaming: the history and weights of the
    uninterrupted run that held its images in memory."""
    root = image_folder(tmp_path / "source", ["a", "b", "c"], per_class=12)
    args = [*teacher_args(root), "trainer.max_epochs=4", "trainer.num_threads=1"]
    # 37 images less a tenth held out for validation: 34, in 4 batches of 8 (the last takes the odd one)
    killed = tmp_path / "killed"
    killer = finish(
        start_python(
            ["-c", killer_script([*args, *STREAMED, f"hydra.run.dir={killed}"], kill_at=4 * 2 + 2)], tmp_path
        ),
        check=False,
    )
    assert killer.returncode == -9, killer.stderr
    finish(start_cli([*args, *STREAMED, f"hydra.run.dir={killed}"], tmp_path))
    run_task([*args, "data.in_memory=true"], tmp_path / "reference")
    assert history_without_times(killed) == history_without_times(tmp_path / "reference")
    assert "resuming" in (killed / "penrun.log").read_text()


def test_a_folder_matches_a_catalogue_dataset_by_its_class_names(tmp_path: Path) -> None:
    digits = load_dataset("digits")
    assert digits.class_names == tuple("0123456789")
    folder = load_folder(image_folder(tmp_path / "digits", ["7", "3"], per_class=2), image_size=8, channels=1)
    matched = match_classes(folder, digits.class_names, digits.name)
    assert matched.y_test.tolist() == [3, 3, 7, 7] and matched.num_classes == 10


def test_distill_onto_a_flat_folder_scores_no_transfer_accuracy(tmp_path: Path) -> None:
    """A flat folder has no labels: the run reports no accuracy on it (neither the teacher's nor
    the student's; 0.0 would read as a measurement) and holds out as many validation images as a
    labelled set of the teacher's 3 classes would (2 per class: 6 of the 30)."""
    source = image_folder(tmp_path / "source", ["a", "b", "c"], per_class=12)
    write_images(tmp_path / "flat", 30, seed=5)
    held = teacher_run(source, tmp_path / "teacher", [])
    distill = [
        "task=distill",
        "data=folder",
        f"data.root={source}",
        "data.image_size=8",
        "data@transfer=folder",
        f"transfer.root={tmp_path / 'flat'}",
        "transfer.shift=none",
        f"teacher_ckpt={held['checkpoint']}",
        "distill.val_per_class=2",
        "trainer.max_epochs=1",
        "trainer.batch_size=8",
    ]
    metrics = run_task(distill, tmp_path / "distill")
    assert "transfer_acc" not in metrics and "teacher_transfer_acc" not in metrics
    assert metrics["source_acc"] == metrics["history"][-1]["source_acc"] and "teacher_source_acc" in metrics
    train_split = 30 - round(0.2 * 30)  # the flat folder's fixed split by data.test_fraction
    assert (metrics["val_size"], metrics["transfer_train_size"]) == (6, train_split - 6)


def penrun_checkpoint(path: Path, classes: int, image_size: int) -> Path:
    """An untrained penrun MLP checkpoint (linear head) for RGB images, without statistics."""
    spec = dict(arch="mlp", channels=3, image_size=image_size, num_classes=classes, penultimate_dim=8,
                head="linear", scale=16.0, bias=False, feature_relu=False, width=0.1)  # fmt: skip
    torch.manual_seed(0)
    model = build_classifier(**spec)
    save_torch(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": 1,
            "classifier": spec,
            "modules": {"model": model.state_dict()},
        },
    )
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_statistics_are_the_same_streamed_as_in_memory(tmp_path: Path, workers: int) -> None:
    """record_statistics of a torchvision state_dict (the statistics every task computes of a
    bare state_dict) and of a penrun checkpoint without them: a split streamed from disk by 0 or
    1 DataLoader workers gives the statistics of the split held in memory, bit for bit, over the
    same images (37 training images, the grey one among them, less 3 held out for validation).
    Fails if a streamed split were read in another order, or lost or repeated images."""
    root = image_folder(tmp_path / "images", ["a", "b", "c"], per_class=12)
    sd = tmp_path / "resnet18.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), sd)
    data = [
        "task=record_statistics",
        "data=folder",
        f"data.root={root}",
        "data.image_size=16",
        "data.val_size=3",
    ]
    ways = {"held": ["data.in_memory=true"], "streamed": ["data.in_memory=false", f"data.workers={workers}"]}
    stats = {}
    for way, extra in ways.items():
        library = ["net@teacher=torchvision", "teacher.arch=resnet18", f"teacher_ckpt={sd}"]
        run_task([*data, *library, *extra, f"paths.output_dir={tmp_path / way}"], tmp_path / way / "library")
        (path,) = (tmp_path / way / "statistics").glob("*.pt")
        penrun_ckpt = penrun_checkpoint(tmp_path / way / "penrun.pt", classes=3, image_size=16)
        run_task([*data, f"teacher_ckpt={penrun_ckpt}", *extra], tmp_path / way / "penrun")
        stats[way] = [load_checkpoint(p)["activation_stats"] for p in (path, penrun_ckpt)]
    for held, streamed in zip(stats["held"], stats["streamed"], strict=True):
        assert held.keys() == streamed.keys() and held["count"].sum() == 34
        for key, value in held.items():
            assert torch.equal(value, streamed[key]), key
