"""app/teachers.py: which config keys make a cached teacher's identity (its cache folder)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from penrun.app import schema
from penrun.app.teachers import teacher_identity

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
