"""Property-based fuzzing of the command line (Hypothesis): random overrides drawn from the
config tree's own keys, with values of every kind, either run a tiny job to a complete, finite
metrics.json or stop with one `penrun: error:` line (exit 2), no traceback and no partial run
folder; valid settings whose training diverges stop with one line (exit 1) and status
`diverged`. The default budget is small; `pytest -m slow tests/test_fuzz.py` tries many more."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import compose_config, run_main

# Work-size keys stay fixed so that every drawn job is tiny; everything else may be drawn.
FIXED = {
    "trainer.progress": "false",
    "teacher_trainer.progress": "false",
    "trainer.max_epochs": "1",
    "teacher_trainer.max_epochs": "1",
    "data.limit_train": "200",
    "data.limit_test": "100",
    "transfer.limit_train": "200",
    "transfer.limit_test": "100",
}
NOT_DRAWN = ("paths.", "task.", "experiment_name", "report.", "sweep_dir", "teacher_ckpt", "data.path")


def drawable_keys(task: str) -> list[str]:
    flat = OmegaConf.to_container(compose_config([f"task={task}"]), resolve=False)
    keys: list[str] = []

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            keys.append(prefix[:-1])

    walk(flat, "")
    return sorted(k for k in keys if k not in FIXED and not k.startswith(NOT_DRAWN))


KEYS = {task: drawable_keys(task) for task in ("train_teacher", "distill")}
VALUES = st.one_of(
    st.sampled_from(["0", "1", "2", "-1", "-5", "0.5", "inf", "-inf", "nan", "1e300", "10000000000000"]),
    st.sampled_from(["abc", "true", "null", "[1,2]", "{a: 1}", "''", "none", "all"]),
    st.integers(-3, 70).map(str),
    st.floats(-2, 40, allow_nan=False).map(lambda v: f"{v:.3g}"),
)


@st.composite
def commands(draw: st.DrawFn) -> list[str]:
    task = draw(st.sampled_from(sorted(KEYS)))
    keys = draw(st.lists(st.sampled_from(KEYS[task]), min_size=1, max_size=3, unique=True))
    drawn = [f"{key}={draw(VALUES)}" for key in keys]
    fixed = [f"{k}={v}" for k, v in FIXED.items() if task == "distill" or not k.startswith("transfer.")]
    return [f"task={task}", *fixed, *drawn]


def finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return True


def check_outcome(args: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        done = run_main(args, Path(tmp))
        code, err = done.returncode, done.stderr
        runs = sorted(Path(tmp, "outputs", "runs").glob("*/*"))
        if code == 0:
            (run,) = runs
            metrics = json.loads((run / "metrics.json").read_text())
            assert metrics["status"] == "complete" and finite(metrics), args
        elif code == 1:  # valid settings whose training diverged: stopped and said so
            assert err.strip() == err.strip().splitlines()[0] and "training loss became NaN" in err, (
                args,
                err,
            )
            (run,) = runs
            assert json.loads((run / "metrics.json").read_text())["status"] == "diverged", args
        else:
            assert code == 2, (args, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("penrun: error: "), (args, err)
            assert not runs, (args, runs)  # no partial run folder


def fuzz(budget: int):
    return settings(
        max_examples=budget,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@fuzz(12)
@given(args=commands())
def test_random_overrides_run_or_fail_in_one_line(args: list[str]) -> None:
    check_outcome(args)


@pytest.mark.slow
@fuzz(300)
@given(args=commands())
def test_random_overrides_run_or_fail_in_one_line_long(args: list[str]) -> None:
    check_outcome(args)
