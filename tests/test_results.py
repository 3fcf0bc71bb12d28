"""penrun.app.results on its own: runs read from hand-made folders, grouped and summed up; the
expected orders, fields and statistics written out by hand or computed by numpy and scipy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from penrun.app.results import (
    RunRecord,
    by_seed,
    collect,
    constant_fields,
    group_runs,
    mean_std,
    named_rows,
    natural_key,
    numeric_fields,
    paired_difference,
    paired_differences,
    seeds,
    values_of,
    varying_keys,
)


def record(name: str, seed: Any = 0, config: dict[str, Any] | None = None, **metrics: Any) -> RunRecord:
    """A run as collect reads it, without a folder on disk."""
    return RunRecord(Path("sweep") / name, {**metrics, "config": {"seed": seed, **(config or {})}})


def write_metrics(folder: Path, **metrics: Any) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_natural_order_reads_numbers_as_numbers() -> None:
    """Written out by hand: numbers (signed, decimal, with an exponent) by value before any word;
    digits inside words by value."""
    numbers = ["-2", "-0.5", "1e-3", "0.01", "4", "4.5", "16", "1e2", "1E3"]
    words = ["None", "seed=9", "seed=10", "w x4", "w x4.5", "w x16", "x"]
    for shuffled in (numbers[::-1] + words[::-1], words + numbers):
        assert sorted(shuffled, key=natural_key) == numbers + words
    assert natural_key("1.5e+2") == natural_key("150") and natural_key("x1.50") == natural_key("x1.5")


def test_groups_come_in_natural_order_of_their_keys() -> None:
    runs = [record(f"{i}", config={"tau": tau, "m": m}) for i, (tau, m) in enumerate(
        [(16, "b"), (4, "b"), (16, "a"), (4, "a"), (4, "a")])]  # fmt: skip
    groups = group_runs(runs, ["tau", "m"])
    assert list(groups) == [("4", "a"), ("4", "b"), ("16", "a"), ("16", "b")]
    assert [r.folder.name for r in groups[("4", "a")]] == ["3", "4"]  # the runs' own order within
    assert seeds([record("a", 10), record("b", 9), record("c", 10), record("d", "x")]) == ["9", "10", "x"]


def test_a_run_reads_its_fields_first_then_its_config() -> None:
    run = RunRecord(
        Path("r"),
        {
            "method": "kd",
            "ood": {"auroc": 0.75},
            "tau": 2,
            "history": [{"epoch": 1, "acc": 0.5}, {"epoch": 2}, {"epoch": 3, "acc": 0.75}],
            "config": {"seed": 3, "tau": 8, "distill": {"tau": 4}},
        },
    )
    assert run.value("method") == "kd" and run.value("ood.auroc") == 0.75
    assert run.value("tau") == 2  # the field, not the config's 8
    assert run.value("distill.tau") == 4 and run.value("seed") == 3 and run.value("nothing") is None
    assert set(run.fields) == {"method", "ood.auroc", "tau"}  # neither config nor history
    assert run.history("acc") == [0.5, 0.75] and run.history("nothing") == []
    assert RunRecord(Path("r"), {}).config == {} and RunRecord(Path("r"), {}).history("acc") == []


def test_collect_reads_complete_runs_and_lists_the_others_in_natural_order(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for name in ("10", "9", "x/2"):
        write_metrics(sweep / name, status="complete", acc=int(name.split("/")[-1]))
    for helper in ("9/teachers/mlp", "evaluators/r8", "3.old-20260101", "x/4.old-1/5"):
        write_metrics(sweep / helper, status="complete", acc=-1)
    write_metrics(sweep / "11", status="running", history=[{"epoch": 1}, {"epoch": 2}])
    (sweep / "8" / ".hydra").mkdir(parents=True)
    (sweep / "8" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (sweep / "7").mkdir()
    (sweep / "7" / "failed.json").write_text(json.dumps({"error": "boom", "attempts": 3}))
    done, missing = collect(sweep)
    assert [(r.folder, r.metrics["acc"]) for r in done] == [
        (sweep / "9", 9),
        (sweep / "10", 10),
        (sweep / "x/2", 2),
    ]
    assert missing == [
        (sweep / "7", "failed: boom (attempt 3)"),
        (sweep / "8", "no metrics.json (not started, or killed before its first epoch)"),
        (sweep / "11", "interrupted after 2 epoch(s)"),
    ]
    assert collect(tmp_path / "empty") == ([], [])


def test_keys_that_vary_are_the_config_keys_with_more_than_one_value() -> None:
    runs = [
        record("a", 0, {"tau": 1, "lr": 0.1, "net": {"width": 8}, "only_here": 1}),
        record("b", 1, {"tau": 4, "lr": 0.1, "net": {"width": 8}}),
        record("c", 2, {"tau": 4.0, "lr": 0.1, "net": {"width": 16}}),
    ]
    assert varying_keys(runs) == ["net.width", "only_here", "tau"]  # sorted; never the seed
    assert varying_keys(runs[1:2]) == [] and varying_keys([]) == []


def test_named_rows_are_the_named_fields_that_vary() -> None:
    runs = [
        record("a", method="kd", vmf="none", task="distill"),
        record("b", method="ce", vmf="none", task="distill"),
    ]
    assert named_rows(runs) == ["method"]
    runs.append(record("c", method="kd", vmf="w x1", task="distill", cond=True))
    assert named_rows(runs) == ["method", "vmf", "cond"]  # in NAMED_FIELDS' order, not the runs'
    assert named_rows(runs[:1]) == []


def test_numeric_fields_in_the_order_first_seen_without_bools_or_text() -> None:
    runs = [
        record("a", acc=0.5, ok=True, method="kd", ood={"auroc": 0.9}, n=3),
        record("b", loss=1, acc=0.25, n=None),
        record("c", ok=1, extra=[1, 2]),
    ]
    assert numeric_fields(runs) == ["acc", "ood.auroc", "n", "loss", "ok"]
    assert numeric_fields([]) == []


def test_constant_fields_are_the_numbers_every_run_shares() -> None:
    runs = [
        record("a", size=1437, acc=0.5, classes=10, only_first=7, flag=True),
        record("b", size=1437, acc=0.75, classes=10.0, flag=True),
        record("c", size=1437, acc=0.75, classes=10, later=3),
    ]
    assert constant_fields(runs) == {"size": 1437, "classes": 10}  # 10.0 == 10; bools are no metric
    assert constant_fields(runs[:1]) == {}  # one run shares nothing with another
    assert constant_fields([record("x", later=1), record("y", later=1, size=2)]) == {"later": 1}
    assert constant_fields([record("x", size=2), record("y", later=1, size=2)]) == {"size": 2}


def test_values_of_keeps_zero_and_skips_runs_without_the_metric() -> None:
    runs = [record("a", acc=0.0), record("b"), record("c", acc=1), record("d", config={"acc": 0.5})]
    values = values_of(runs, "acc")
    assert values == [0.0, 1.0, 0.5] and all(type(v) is float for v in values)


def test_mean_std_is_the_mean_and_the_sample_std() -> None:
    values = [0.4, 0.6, 0.65, 0.2]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert mean_std([0.5]) == (0.5, None) and mean_std([]) == (None, None)
    assert mean_std([0.0, 0.0]) == (0.0, 0.0)


def test_by_seed_refuses_two_runs_of_one_seed_with_both_folders() -> None:
    runs = [record("a", 1, acc=0.5), record("b", 2, acc=0.25), record("c", 3), record("d", 3, acc=0.0)]
    assert by_seed(runs, "acc") == {"1": 0.5, "2": 0.25, "3": 0.0}  # c has no acc: no clash with d
    with pytest.raises(ValueError, match=r"^two runs with seed 2: sweep/b and sweep/e$"):
        by_seed([*runs, record("e", 2, acc=0.75)], "acc")


def test_paired_differences_match_seeds_and_keep_the_runs_order() -> None:
    mine = [record("a", 12, acc=0.5), record("b", 3, acc=0.75), record("c", 7, acc=0.0), record("d", 5)]
    base = [
        record("e", 3, acc=0.25),
        record("f", 5, acc=0.5),
        record("g", 12, acc=0.125),
        record("h", 9, acc=1),
    ]
    assert paired_differences(mine, base, "acc") == [0.375, 0.5]  # seeds 12, 3 (7: no base; 5: no acc)
    assert paired_differences(mine, [], "acc") == [] and paired_differences([], base, "acc") == []


@pytest.mark.parametrize("diffs", [[0.25, -0.125, 0.5], [0.01, 0.03], [0.1, 0.2, 0.15, 0.05, 0.4, 0.3]])
def test_a_paired_difference_is_the_mean_with_scipys_paired_t_interval(diffs: list[float]) -> None:
    zeros = np.zeros(len(diffs))
    ci = stats.ttest_rel(diffs, zeros).confidence_interval(0.95)
    expected = f"{np.mean(diffs):+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] (n={len(diffs)})"
    assert paired_difference(diffs) == expected


def test_a_paired_difference_of_one_pair_or_none() -> None:
    assert paired_difference([-0.03125]) == "-0.0312 (n=1)"
    assert paired_difference([0.5]) == "+0.5000 (n=1)"
    assert paired_difference([]) == "-"
    assert paired_difference([0.25, 0.25]) == "+0.2500 [+0.2500, +0.2500] (n=2)"
