"""penrun's checkpoints: what they hold, and loading them without running code from the file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from penrun.errors import InputError
from penrun.models import Classifier, build_classifier
from penrun.train import distributed
from penrun.train.seeding import rng_state, set_rng_state

# v2: loads with weights_only=True (v1 held NumPy objects, which need unpickling code).
CHECKPOINT_FORMAT = "penrun-checkpoint-v2"


def read_weights_only(path: str | os.PathLike, remedy: str) -> Any:
    """torch.load(weights_only=True): tensors and plain containers only; a file that needs more
    is refused before anything in it runs (`remedy` says what to do instead)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"checkpoint {str(path)!r} is a folder: pass its checkpoints/last.pt")
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a refusal: the bytes are damaged
            raise InputError(
                f"checkpoint {str(path)!r} is corrupt or unreadable: move it aside to start its run afresh"
            ) from err
        raise InputError(
            f"refusing to load checkpoint {str(path)!r}: it holds objects other than tensors and plain "
            f"containers, and loading them could run code from the file. {remedy}"
        ) from err
    except Exception as err:  # torch raises many types for a damaged file
        raise InputError(f"checkpoint {str(path)!r} is corrupt or unreadable: {err}") from err


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A model's state_dict saved elsewhere (`torch.save(model.state_dict(), path)`), loaded as
    safely as a checkpoint."""
    state = read_weights_only(path, "save the model's state_dict alone: torch.save(model.state_dict(), path)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(
            f"{str(path)!r} is not a state_dict (a dict of tensors, as torch.save(model.state_dict(), path) writes)"
        )
    return state


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a penrun checkpoint, refusing files that are corrupt or not penrun's. Loading never
    runs code from the file (`read_weights_only`)."""
    ckpt = read_weights_only(
        path,
        f"penrun's own checkpoints (format {CHECKPOINT_FORMAT!r}) never do; re-create this one with this version of penrun",
    )
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(
            f"{str(path)!r} is not a penrun checkpoint (expected format {CHECKPOINT_FORMAT!r}); "
            "pass a checkpoints/last.pt or best.pt written by penrun"
        )
    return ckpt


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """A classifier rebuilt from a penrun checkpoint alone, in eval mode, on the CPU."""
    ckpt = load_checkpoint(path)
    if "classifier" not in ckpt:
        raise InputError(
            f"checkpoint {str(path)!r} holds no classifier: pass the last.pt or best.pt of a classifier training run"
        )
    try:
        model = build_classifier(**ckpt["classifier"])
        model.load_state_dict(ckpt["modules"]["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # an edited or foreign file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(
            f"checkpoint {str(path)!r} is damaged: its classifier cannot be rebuilt from it ({reason}); "
            "pass a last.pt or best.pt as penrun wrote it"
        ) from err
    return model.eval(), ckpt


def checkpoint_payload(
    config: dict[str, Any],
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    epoch: int,
    history: list[dict],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    # Random states of every rank (rank order), so that each resumes its own stream.
    states = distributed.gather_objects(
        {"global": rng_state(), "generators": {name: g.get_state() for name, g in generators.items()}}
    )
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "config": config,
        "history": history,
        "modules": {name: m.state_dict() for name, m in modules.items()},
        "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
        "rng": states,
        **(extra or {}),
    }


def restore_random_states(states: list[dict[str, Any]], generators: dict[str, torch.Generator]) -> None:
    """This rank's random states from a checkpoint (rank 0's if it was written by fewer ranks)."""
    state = states[distributed.rank()] if distributed.rank() < len(states) else states[0]
    set_rng_state(state["global"])
    for name, generator in generators.items():
        if name in state["generators"]:
            generator.set_state(state["generators"][name])
