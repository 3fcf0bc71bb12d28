"""penrun.train.checkpoint: what a checkpoint holds, the refusals of files that are not penrun's
(each message whole), state_dicts and classifiers loaded from files written here, and each rank's
random states. tests/test_train.py checks the refusal of a file that would run code."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

from penrun.errors import InputError
from penrun.models import build_classifier
from penrun.train import checkpoint as checkpoint_module
from penrun.train.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_payload,
    load_checkpoint,
    load_classifier,
    load_state_dict,
    read_weights_only,
    restore_random_states,
)
from penrun.train.seeding import rng_state, seed_everything

SPEC = {"arch": "mlp", "channels": 1, "image_size": 6, "num_classes": 3, "penultimate_dim": 4}


class Opaque:
    """Any object other than tensors and plain containers: weights_only refuses it."""


def saved(path: Path, value: object) -> Path:
    torch.save(value, path)
    return path


def refusal(load: Callable[[Path], object], path: Path) -> str:
    """The one-line message with which `load` refuses the file."""
    with pytest.raises(InputError) as caught:
        load(path)
    return str(caught.value)


def test_a_path_with_a_tilde_is_read_from_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    saved(tmp_path / "w.pt", {"a": torch.ones(2)})
    assert torch.equal(read_weights_only("~/w.pt", "")["a"], torch.ones(2))


def test_a_file_torch_cannot_unpickle_is_corrupt_with_what_to_do(tmp_path: Path) -> None:
    """Bytes pickle rejects ("invalid load key") are damage, not a refusal: move the file aside."""
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as caught:
        read_weights_only(path, "REMEDY")
    assert str(caught.value) == (
        f"checkpoint {str(path)!r} is corrupt or unreadable: move it aside to start its run afresh"
    )
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)


def test_a_truncated_file_is_corrupt_naming_torchs_reason(tmp_path: Path) -> None:
    """Half of a saved file: torch's reader fails (not pickle), and its reason is kept."""
    path = saved(tmp_path / "half.pt", {"w": torch.ones(100)})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError) as caught:
        read_weights_only(path, "REMEDY")
    reason = str(caught.value.__cause__)
    assert not isinstance(caught.value.__cause__, pickle.UnpicklingError)
    assert reason and str(caught.value) == f"checkpoint {str(path)!r} is corrupt or unreadable: {reason}"


def test_a_file_with_other_objects_is_refused_with_the_remedy_given(tmp_path: Path) -> None:
    path = saved(tmp_path / "obj.pt", {"x": Opaque()})
    assert refusal(partial(read_weights_only, remedy="Do this instead."), path) == (
        f"refusing to load checkpoint {str(path)!r}: it holds objects other than tensors and plain "
        "containers, and loading them could run code from the file. Do this instead."
    )


def test_torchs_variable_for_unsafe_loading_does_not_reach_penrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes torch.load's default unpickle anything; penrun asks
    for weights_only explicitly, so a file with other objects is still refused."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = saved(tmp_path / "obj.pt", {"x": Opaque()})
    with pytest.raises(InputError, match="could run code from the file"):
        read_weights_only(path, "")


def test_a_folder_and_a_missing_file_are_named_whole(tmp_path: Path) -> None:
    read = partial(read_weights_only, remedy="")
    assert (
        refusal(read, tmp_path) == f"checkpoint {str(tmp_path)!r} is a folder: pass its checkpoints/last.pt"
    )
    missing = tmp_path / "missing.pt"
    assert refusal(read, missing) == f"checkpoint {str(missing)!r} does not exist"


def test_files_load_onto_the_cpu(tmp_path: Path) -> None:
    value = read_weights_only(saved(tmp_path / "w.pt", {"w": torch.arange(3.0)}), "")
    assert value["w"].device.type == "cpu" and value["w"].tolist() == [0.0, 1.0, 2.0]


def test_a_state_dict_loads_and_anything_else_is_refused(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    state = load_state_dict(saved(tmp_path / "net.pt", net.state_dict()))
    assert sorted(state) == ["bias", "weight"] and torch.equal(state["weight"], net.weight)
    for name, value in [("list", [torch.ones(1)]), ("mixed", {"w": torch.ones(1), "step": 3})]:
        path = saved(tmp_path / f"{name}.pt", value)
        assert refusal(load_state_dict, path) == (
            f"{str(path)!r} is not a state_dict (a dict of tensors, as torch.save(model.state_dict(), "
            "path) writes)"
        )
    whole_model = saved(tmp_path / "model.pt", {"w": Opaque()})
    with pytest.raises(
        InputError, match=r"could run code from the file\. save the model's state_dict alone: "
    ):
        load_state_dict(whole_model)


def test_a_tensor_or_a_dict_without_the_format_is_not_a_penrun_checkpoint(tmp_path: Path) -> None:
    for name, value in [("tensor", torch.ones(2)), ("unmarked", {"epoch": 1}), ("v3", {"format": "v3"})]:
        path = saved(tmp_path / f"{name}.pt", value)
        assert refusal(load_checkpoint, path) == (
            f"{str(path)!r} is not a penrun checkpoint (expected format 'penrun-checkpoint-v2'); "
            "pass a checkpoints/last.pt or best.pt written by penrun"
        )


def test_a_checkpoint_with_other_objects_names_penruns_format(tmp_path: Path) -> None:
    path = saved(tmp_path / "old.pt", {"format": CHECKPOINT_FORMAT, "x": Opaque()})
    with pytest.raises(InputError) as caught:
        load_checkpoint(path)
    assert str(caught.value).endswith(
        "penrun's own checkpoints (format 'penrun-checkpoint-v2') never do; "
        "re-create this one with this version of penrun"
    )


def classifier_checkpoint(path: Path, **changes: object) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_classifier(**SPEC)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "classifier": dict(SPEC),
        "modules": {"model": model.state_dict()},
        **changes,
    }
    return saved(path, payload), model


def test_a_classifier_is_rebuilt_in_eval_mode_with_its_weights(tmp_path: Path) -> None:
    path, model = classifier_checkpoint(tmp_path / "last.pt")
    rebuilt, ckpt = load_classifier(path)
    assert not rebuilt.training and ckpt["classifier"] == SPEC
    x = torch.rand(5, 1, 6, 6)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_a_checkpoint_without_a_classifier_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path / "gan.pt", {"format": CHECKPOINT_FORMAT, "modules": {}})
    assert refusal(load_classifier, path) == (
        f"checkpoint {str(path)!r} holds no classifier: pass the last.pt or best.pt of a classifier "
        "training run"
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"modules": {}}, "'model'"),
        ({"classifier": SPEC | {"arch": "nonesuch"}}, None),
        ({"classifier": SPEC | {"num_classes": 4}}, "Error(s) in loading state_dict for"),
        ({"classifier": {"arch": "mlp"}}, None),
    ],
    ids=["no-weights", "unknown-arch", "other-shape", "missing-keys"],
)
def test_a_damaged_classifier_checkpoint_is_one_line_with_the_first_line_of_the_reason(
    tmp_path: Path, changes: dict, reason: str | None
) -> None:
    path, _ = classifier_checkpoint(tmp_path / "last.pt", **changes)
    with pytest.raises(InputError) as caught:
        load_classifier(path)
    message = str(caught.value)
    cause = caught.value.__cause__
    first_line = str(cause).splitlines()[0]
    assert message == (
        f"checkpoint {str(path)!r} is damaged: its classifier cannot be rebuilt from it ({first_line}); "
        "pass a last.pt or best.pt as penrun wrote it"
    )
    assert "\n" not in message
    if reason is not None:
        assert first_line.startswith(reason)


def test_a_reason_without_text_is_named_by_its_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = classifier_checkpoint(tmp_path / "last.pt")

    def refuse(**_: object) -> None:
        raise ValueError

    monkeypatch.setattr(checkpoint_module, "build_classifier", refuse)
    with pytest.raises(InputError, match=r"cannot be rebuilt from it \(ValueError\); pass"):
        load_classifier(path)


def test_the_payload_holds_each_part_under_its_name() -> None:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(9)
    seed_everything(4)
    state = rng_state()
    payload = checkpoint_payload(
        {"lr": 0.5}, {"net": net}, {"sgd": opt}, {"labels": generator}, 3, [{"epoch": 1}], extra={"data": 7}
    )
    assert set(payload) == {"format", "epoch", "config", "history", "modules", "optimizers", "rng", "data"}
    assert (payload["format"], payload["epoch"], payload["data"]) == (CHECKPOINT_FORMAT, 3, 7)
    assert payload["config"] == {"lr": 0.5} and payload["history"] == [{"epoch": 1}]
    assert payload["optimizers"]["sgd"]["param_groups"][0]["lr"] == 0.5
    assert torch.equal(payload["modules"]["net"]["bias"], net.bias)
    (rank0,) = payload["rng"]
    assert torch.equal(rank0["global"]["torch"], state["torch"])
    assert torch.equal(rank0["generators"]["labels"], torch.Generator().manual_seed(9).get_state())
    assert "data" not in checkpoint_payload({}, {}, {}, {}, 0, [])


def test_each_rank_takes_its_own_states_and_extra_ranks_rank_0s(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks' states; rank 1 resumes the second stream, rank 2 (a run resumed on more
    processes) the first. A generator the checkpoint does not hold keeps its state."""
    states = []
    for seed in (21, 22):
        seed_everything(seed)
        states.append(
            {"global": rng_state(), "generators": {"g": torch.Generator().manual_seed(seed).get_state()}}
        )
    for rank, seed in [(1, 22), (2, 21)]:
        monkeypatch.setattr(checkpoint_module.distributed, "rank", lambda rank=rank: rank)
        g, untouched = torch.Generator().manual_seed(0), torch.Generator().manual_seed(5)
        restore_random_states(states, {"g": g, "other": untouched})
        assert torch.equal(torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(seed)))
        assert torch.equal(g.get_state(), torch.Generator().manual_seed(seed).get_state())
        assert torch.equal(untouched.get_state(), torch.Generator().manual_seed(5).get_state())
