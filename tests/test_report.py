"""task=report: a tiny real sweep with an interrupted run, and hand-made run folders whose
expected tables come from numpy and scipy (penrun.app.results on its own: tests/test_results.py)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import stats

from penrun.app.errors import ConfigError

from conftest import run_main, run_task


def write_run(folder: Path, seed: int, config: dict[str, Any] | None = None, **metrics: Any) -> None:
    """A complete run's metrics.json with the fields report reads."""
    folder.mkdir(parents=True)
    record = {"status": "complete", **metrics, "config": {"seed": seed, **(config or {})}}
    (folder / "metrics.json").write_text(json.dumps(record))


def report(sweep: Path, *layout: str) -> str:
    """task=report of the sweep (in this process); its report.md."""
    run_task(["task=report", f"sweep_dir={sweep}", *layout], sweep.parent / f"job-{sweep.name}")
    return (sweep / "report.md").read_text()


def read_csv(path: Path) -> list[list[str]]:
    with open(path) as f:
        return list(csv.reader(f))


def paired_cell(mine: list[float], base: list[float]) -> str:
    """The expected text of a paired difference: numpy's mean and scipy's paired-t interval."""
    ci = stats.ttest_rel(mine, base).confidence_interval(0.95)
    return f"{np.mean(np.subtract(mine, base)):+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] (n={len(mine)})"


def cell(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def test_report_of_a_sweep_with_a_missing_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    # The sweep by the command line's entry point, in this process.
    proc = run_main(
        [
            "-m",
            "task=distill",
            "method=kd,synthetic_head",
            "seed=0,1",
            "trainer.max_epochs=2",
            "teacher_trainer.max_epochs=2",
            "teacher_trainer.progress=false",
            f"paths.output_dir={tmp_path}",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 4
    # Make one run look interrupted after its first epoch.
    broken = runs[0] / "metrics.json"
    metrics = json.loads(broken.read_text())
    broken.write_text(json.dumps({**metrics, "status": "running", "history": metrics["history"][:1]}))

    # The report task in this process. Its log: caplog's handler on penrun's logger (the sweep's
    # Hydra set the root logger's handlers anew).
    penrun_log = logging.getLogger("penrun")
    with caplog.at_level(logging.INFO, logger="penrun"):
        penrun_log.addHandler(caplog.handler)
        run_task(
            [
                "task=report",
                f"sweep_dir={sweep}",
                "report.rows=[method]",
                "report.values=[source_acc,selected_source_acc]",
                "report.curve=source_acc",
            ],
            tmp_path / "r",
        )
        penrun_log.removeHandler(caplog.handler)
    report_md = (sweep / "report.md").read_text()
    assert "3 complete runs" in report_md and "Missing or incomplete runs (1)" in report_md
    assert f"`{runs[0].relative_to(sweep)}`: interrupted after 1 epoch(s)" in report_md
    table = read_csv(sweep / "report.csv")
    assert table[0] == ["method", "runs", "source_acc mean", "source_acc std", "selected_source_acc mean",
                        "selected_source_acc std"]  # fmt: skip
    # Raw numbers: the mean and std of the complete runs' metrics.json values, per method.
    complete = [json.loads((r / "metrics.json").read_text()) for r in runs[1:]]
    expected = []
    for method in sorted({m["method"] for m in complete}):
        mine = [m for m in complete if m["method"] == method]
        line: list[Any] = [method, str(len(mine))]
        for metric in ("source_acc", "selected_source_acc"):
            values = [m[metric] for m in mine]
            line += [np.mean(values), np.std(values, ddof=1) if len(values) > 1 else ""]
        expected.append(line)
    got = [[r[0], r[1], *(float(x) if x else "" for x in r[2:])] for r in table[1:]]
    assert got == [[*e[:2], *(pytest.approx(x) if x != "" else "" for x in e[2:])] for e in expected]
    assert f"wrote {sweep / 'report.md'}, report.csv, runs.csv, curves.png" in caplog.messages


def test_report_needs_a_folder_with_runs(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"^task=report needs sweep_dir=DIR \(a folder of runs, e.g. outputs/multirun/distill/...\)$",
    ):
        run_task(["task=report"], tmp_path / "r")
    with pytest.raises(ConfigError, match=r"sweep_dir='.*nowhere' is not a folder"):
        run_task(["task=report", f"sweep_dir={tmp_path / 'nowhere'}"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no complete run under .*empty \(0 incomplete\)"):
        run_task(["task=report", f"sweep_dir={tmp_path / 'empty'}"], tmp_path / "r")


def test_paired_differences_to_a_baseline_match_scipys_paired_t(tmp_path: Path) -> None:
    accs = {"ce": [0.70, 0.74, 0.69, 0.72], "kd": [0.73, 0.75, 0.74, 0.71], "smooth": [0.60, 0.66]}
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            write_run(tmp_path / "s" / f"{method}-{seed}", seed, {"method": method}, transfer_acc=acc)
    text = report(
        tmp_path / "s", "report.rows=[method]", "report.values=[transfer_acc]", "report.baseline=ce"
    )
    assert f"| kd | {paired_cell(accs['kd'], accs['ce'])} |" in text
    # smooth ran seeds 0 and 1 only: paired with ce's seeds 0 and 1.
    assert f"| smooth | {paired_cell(accs['smooth'], accs['ce'][:2])} |" in text
    # One line per run, raw numbers, for pandas.
    with open(tmp_path / "s" / "runs.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 10 and {"folder", "method", "seed", "transfer_acc"} == set(lines[0])
    assert {(r["method"], int(r["seed"]), float(r["transfer_acc"])) for r in lines} == {
        (m, s, a) for m, values in accs.items() for s, a in enumerate(values)
    }


def test_pairs_are_matched_by_seed_whatever_the_seeds_and_folders(tmp_path: Path) -> None:
    """Seeds that do not start at 0, that each row ran only some of (or without the metric), in
    folders whose order is not the seeds' order: each difference is between the two runs of one
    seed."""
    ce = {10: 0.70, 3: 0.61, 12: 0.66, 11: 0.75}
    kd = {12: 0.71, 20: 0.99, 3: 0.69, 11: 0.74}  # no seed 10; seed 20 has no ce partner
    for i, (method, accs) in enumerate((("kd", kd), ("ce", ce))):
        for j, (seed, acc) in enumerate(accs.items()):
            write_run(tmp_path / "s" / f"{i * 4 + j + 1}", seed, {"method": method}, transfer_acc=acc)
    write_run(tmp_path / "s" / "0", 10, {"method": "kd"}, val_acc=0.5)  # a kd run of seed 10 without it
    write_run(tmp_path / "s" / "9", 20, {"method": "st"}, transfer_acc=0.5)  # no seed in common with ce
    text = report(
        tmp_path / "s", "report.rows=[method]", "report.values=[transfer_acc]", "report.baseline=ce"
    )
    shared = [3, 11, 12]
    assert f"| kd | {paired_cell([kd[s] for s in shared], [ce[s] for s in shared])} |" in text
    assert "| st | - |" in text
    assert "seeds 3, 10, 11, 12, 20;" in text


def test_a_row_with_two_runs_of_one_seed_cannot_be_paired(tmp_path: Path) -> None:
    for tau in (1, 4):
        write_run(tmp_path / "s" / f"kd-{tau}", 0, {"method": "kd", "tau": tau}, transfer_acc=0.7 + tau / 100)
    write_run(tmp_path / "s" / "ce", 0, {"method": "ce"}, transfer_acc=0.6)
    refusal = (r"^report.baseline='ce': two runs with seed 0: \S*kd-1 and \S*kd-4; the key that tells them "
               r"apart belongs in report.rows or report.columns$")  # fmt: skip
    with pytest.raises(ConfigError, match=refusal):
        report(tmp_path / "s", "report.rows=[method]", "report.values=[transfer_acc]", "report.baseline=ce")


def test_column_groups_are_never_mixed(tmp_path: Path) -> None:
    """Each cell, and each paired difference, uses only the runs of its own column group."""
    accs = {
        ("ce", "usps"): [0.50, 0.55, 0.53],
        ("kd", "usps"): [0.58, 0.56, 0.60],
        ("ce", "mnist"): [0.90, 0.93, 0.92],
        ("kd", "mnist"): [0.91, 0.97, 0.92],
    }
    for (method, transfer), values in accs.items():
        for seed, acc in enumerate(values):
            folder = tmp_path / "s" / f"{method}-{transfer}-{seed}"
            write_run(folder, seed, {"method": method}, transfer=transfer, transfer_acc=acc)
    text = report(
        tmp_path / "s", "report.rows=[method]", "report.columns=[transfer]", "report.values=[transfer_acc]",
        "report.baseline=ce",
    )  # fmt: skip
    assert "| method | runs | mnist transfer_acc | usps transfer_acc |" in text
    for method in ("ce", "kd"):
        cells = [cell(accs[(method, t)]) for t in ("mnist", "usps")]
        assert f"| {method} | 6 | {cells[0]} | {cells[1]} |" in text
    assert "| method | mnist transfer_acc - ce | usps transfer_acc - ce |" in text
    pairs = [paired_cell(accs[("kd", t)], accs[("ce", t)]) for t in ("mnist", "usps")]
    assert f"| kd | {pairs[0]} | {pairs[1]} |" in text
    numbers = read_csv(tmp_path / "s" / "report.csv")
    assert numbers[0][2:] == ["mnist transfer_acc mean", "mnist transfer_acc std", "usps transfer_acc mean",
                              "usps transfer_acc std"]  # fmt: skip
    kd_row = [float(x) for x in numbers[2][2:]]
    assert kd_row == pytest.approx(
        [f(accs[("kd", t)]) for t in ("mnist", "usps") for f in (np.mean, lambda v: np.std(v, ddof=1))]
    )


def search_run(folder: Path, method: str, tau: float, seed: int, val: float, test: float) -> None:
    """A run of a search whose experiment stored its report layout (as search_labelled does)."""
    layout = {"rows": ["method", "distill.tau"], "values": ["best_val_acc", "transfer_acc"],
              "choose": ["distill.tau"]}  # fmt: skip
    config = {"method": method, "distill": {"tau": tau}, "report": layout}
    write_run(folder, seed, config, method=method, best_val_acc=val, transfer_acc=test)


def test_a_search_chooses_on_validation_and_breaks_ties_numerically(tmp_path: Path) -> None:
    """With the stored layout of a search: per method, the tau with the best mean validation
    accuracy, though the test accuracy prefers another; of two taus with the same mean, the
    smaller number (4 before 16, which text order would put first)."""
    runs = {  # (method, tau): [(val, test)] per seed
        ("kd", 1.0): [(0.500, 0.90), (0.500, 0.90)],
        ("kd", 4.0): [(0.625, 0.60), (0.875, 0.60)],  # the best validation mean, 0.75
        ("kd", 16.0): [(0.750, 0.95), (0.625, 0.95)],  # the best test accuracy
        ("st", 1.0): [(0.250, 0.50), (0.250, 0.50)],
        ("st", 4.0): [(0.500, 0.50), (0.750, 0.50)],  # tie with 16 on 0.625: 4 comes first
        ("st", 16.0): [(0.625, 0.70), (0.625, 0.70)],
    }
    for (method, tau), scores in runs.items():
        for seed, (val, test) in enumerate(scores):
            search_run(tmp_path / "s" / f"{method}-{tau}-{seed}", method, tau, seed, val, test)
    text = report(tmp_path / "s")
    chosen = read_csv(tmp_path / "s" / "chosen.csv")
    assert chosen == [
        ["method", "distill.tau", "mean best_val_acc", "runs"],
        ["kd", "4.0", "0.7500", "2"],
        ["st", "4.0", "0.6250", "2"],
    ]
    assert "the setting of `distill.tau` with the highest mean `best_val_acc`." in text
    assert "| kd | 4.0 | 0.7500 | 2 |" in text
    # Rows in numeric order of tau.
    taus = [line[1] for line in read_csv(tmp_path / "s" / "report.csv")[1:]]
    assert taus == ["1.0", "4.0", "16.0"] * 2


def test_a_search_chooses_the_best_mean_not_the_best_seed(tmp_path: Path) -> None:
    scores = {1.0: [0.70, 0.72], 4.0: [0.50, 0.875], 16.0: [0.74, 0.74]}  # means 0.71, 0.6875, 0.74
    for tau, values in scores.items():
        for seed, val in enumerate(values):
            search_run(tmp_path / "s" / f"{tau}-{seed}", "kd", tau, seed, val, 0.5)
    report(tmp_path / "s")
    assert read_csv(tmp_path / "s" / "chosen.csv")[1] == ["kd", "16.0", "0.7400", "2"]


def test_means_equal_but_for_float32_rounding_are_ties(tmp_path: Path) -> None:
    """metrics.json holds float32 accuracies: 0.21 + 0.22 and 0.20 + 0.23 read back as means
    that differ in the 9th digit (0.215 against 0.21500000357627869). A tie: the first tau in
    numeric order wins. A real difference of 1e-4 still decides."""
    f32 = lambda *values: [float(np.float32(v)) for v in values]  # noqa: E731
    scores = {
        ("kd", 4.0): f32(0.21, 0.22),
        ("kd", 16.0): f32(0.20, 0.23),  # the larger float mean, by rounding only
        ("st", 4.0): f32(0.2150, 0.2150),
        ("st", 16.0): f32(0.2151, 0.2151),  # better by 1e-4
    }
    assert np.mean(scores[("kd", 16.0)]) > np.mean(scores[("kd", 4.0)])
    for (method, tau), values in scores.items():
        for seed, val in enumerate(values):
            search_run(tmp_path / "s" / f"{method}-{tau}-{seed}", method, tau, seed, val, 0.5)
    report(tmp_path / "s")
    chosen = read_csv(tmp_path / "s" / "chosen.csv")[1:]
    assert [row[:2] for row in chosen] == [["kd", "4.0"], ["st", "16.0"]]


def test_a_stored_layout_is_honoured_and_the_command_line_wins(tmp_path: Path) -> None:
    """The layout distill_labelled stores (rows, columns, values, baseline 'ce none') shapes the
    report without a report.* option; an option given on the command line replaces its key."""
    layout = {"rows": ["method", "vmf"], "columns": ["labels"], "values": ["transfer_acc"],
              "baseline": "ce none"}  # fmt: skip
    accs = {("ce", "none"): [0.50, 0.60], ("kd", "none"): [0.55, 0.70], ("ce+st", "w/w x1"): [0.65, 0.62]}
    for (method, vmf), values in accs.items():
        for seed, acc in enumerate(values):
            folder = tmp_path / "s" / f"{method}-{seed}"
            write_run(folder, seed, {"report": layout}, method=method, vmf=vmf, labels=10, transfer_acc=acc,
                      selected_transfer_acc=1 - acc)  # fmt: skip
    text = report(tmp_path / "s")
    assert "| method | vmf | runs | 10 transfer_acc |" in text
    assert f"| ce+st | w/w x1 | 2 | {cell(accs[('ce+st', 'w/w x1')])} |" in text
    assert "| method | vmf | 10 transfer_acc - ce none |" in text
    assert f"| kd | none | {paired_cell(accs[('kd', 'none')], accs[('ce', 'none')])} |" in text
    text = report(tmp_path / "s", "report.values=[selected_transfer_acc]")
    assert "| method | vmf | runs | 10 selected_transfer_acc |" in text
    expected = paired_cell([1 - a for a in accs[("kd", "none")]], [1 - a for a in accs[("ce", "none")]])
    assert f"| kd | none | {expected} |" in text


def named_rows_sweep(sweep: Path) -> None:
    rows = {("ce", "none"): 0.5, ("ce+kd", "none"): 0.55, ("kd", "none"): 0.6, ("st", "w/w x1"): 0.7,
            ("st", "w/m x1"): 0.75}  # fmt: skip
    for (method, vmf), acc in rows.items():
        for seed in (0, 1):
            write_run(sweep / f"{method}-{vmf.replace('/', '')}-{seed}", seed, method=method, vmf=vmf,
                      transfer_acc=acc + seed / 8)  # fmt: skip


def test_a_baseline_row_is_named_as_a_user_names_it(tmp_path: Path) -> None:
    """'kd' names the row 'kd none' (the only row with the word kd), as do 'kd none' and 'none kd',
    and 'ce' the row 'ce none' (not 'ce+kd none'); 'st' names two rows and is refused with them; a name no
    row has is refused with the rows."""
    named_rows_sweep(tmp_path / "s")
    layout = ["report.rows=[method,vmf]", "report.values=[transfer_acc]"]
    by_name = report(tmp_path / "s", *layout, "report.baseline=kd")
    assert "| ce | none | -0.1000 [-0.1000, -0.1000] (n=2) |" in by_name
    assert "| st | w/m x1 | +0.1500 [+0.1500, +0.1500] (n=2) |" in by_name
    by_label = report(tmp_path / "s", *layout, "report.baseline=kd none")
    assert by_label.replace("kd none", "kd") == by_name
    by_all_words = report(tmp_path / "s", *layout, "report.baseline=none kd")  # every word, another order
    assert by_all_words.replace("none kd", "kd") == by_name
    by_word = report(tmp_path / "s", *layout, "report.baseline=ce")  # a word: not the 'ce' in 'ce+kd'
    assert "| kd | none | +0.1000 [+0.1000, +0.1000] (n=2) |" in by_word
    by_value = report(tmp_path / "s", *layout, "report.baseline=w/w")  # the row 'st w/w x1'
    assert "| st | w/m x1 | +0.0500 [+0.0500, +0.0500] (n=2) |" in by_value
    with pytest.raises(
        ConfigError,
        match=r"^report.baseline='st' names 2 rows: \['st w/m x1', 'st w/w x1'\]; name one of them$",
    ):
        report(tmp_path / "s", *layout, "report.baseline=st")
    with pytest.raises(
        ConfigError,
        match=r"^report.baseline='CE' is not a row of the table; rows: \['ce none', 'ce\+kd none', 'kd none', "
        r"'st w/m x1', 'st w/w x1'\]$",
    ):
        report(tmp_path / "s", *layout, "report.baseline=CE")


def test_rows_seeds_and_runs_come_in_numeric_order(tmp_path: Path) -> None:
    """Rows by the one config key that varies (tau; not the method every run shares), in numeric
    order, as are the seeds and the run folders; digits inside words count as numbers, and
    numbers come before words."""
    taus = (16, 4, 64, 1)
    for i, (tau, seed) in enumerate((t, s) for t in taus for s in (10, 9, 2)):
        config = {"distill": {"tau": tau}, "method": "kd"}
        write_run(tmp_path / "s" / f"{i}", seed, config, transfer_acc=tau / 100 + seed / 1000)
    text = report(tmp_path / "s", "report.values=[transfer_acc]")
    assert "12 complete runs, seeds 2, 9, 10;" in text
    numbers = read_csv(tmp_path / "s" / "report.csv")
    assert [line[0] for line in numbers] == ["distill.tau", "1", "4", "16", "64"]
    assert [float(line[2]) for line in numbers[1:]] == pytest.approx(
        [t / 100 + 0.007 for t in (1, 4, 16, 64)]
    )
    folders = [line[0] for line in read_csv(tmp_path / "s" / "runs.csv")[1:]]
    assert folders == [str(i) for i in range(12)]
    for i, (vmf, labels) in enumerate((("w x16", None), ("w x4", 50), ("w x16", 10), ("v x4", 10))):
        write_run(tmp_path / "t" / f"{i}", 0, vmf=vmf, labels=labels, transfer_acc=0.5)
    report(tmp_path / "t", "report.rows=[vmf]", "report.columns=[labels]", "report.values=[transfer_acc]")
    numbers = read_csv(tmp_path / "t" / "report.csv")
    assert [line[0] for line in numbers[1:]] == ["v x4", "w x4", "w x16"]
    assert numbers[0][2::2] == ["10 transfer_acc mean", "50 transfer_acc mean", "None transfer_acc mean"]


def test_a_report_of_one_run(tmp_path: Path) -> None:
    write_run(tmp_path / "s" / "only", 5, {"method": "kd"}, transfer_acc=0.625, labels=10)
    text = report(
        tmp_path / "s", "report.rows=[method]", "report.values=[transfer_acc]", "report.baseline=kd"
    )
    assert "1 complete runs, seeds 5;" in text and "The same in every run" not in text
    assert "| method | runs | transfer_acc |\n|---|---|---|\n| kd | 1 | 0.6250 |\n" in text
    assert text.endswith("| method | transfer_acc - kd |\n|---|---|\n")  # no other row to pair
    assert read_csv(tmp_path / "s" / "report.csv") == [
        ["method", "runs", "transfer_acc mean", "transfer_acc std"],
        ["kd", "1", "0.625", ""],
    ]


def test_a_header_line_holds_what_every_run_shares(tmp_path: Path) -> None:
    """Two runs sharing a size: a header line; fields that only some runs have are not in it."""
    write_run(tmp_path / "s" / "0", 0, transfer_acc=0.5, size=1437, only_first=1)
    write_run(tmp_path / "s" / "1", 1, transfer_acc=0.75, size=1437, only_second=2)
    assert "The same in every run: size 1437.\n" in report(tmp_path / "s", "report.values=[transfer_acc]")


def test_helper_classifiers_and_moved_runs_are_left_out_and_unfinished_ones_listed(tmp_path: Path) -> None:
    """The cached teachers and evaluators under a sweep and the runs rerun=true moved aside are no
    runs of it; a job that never started or failed is listed with why."""
    sweep = tmp_path / "s"
    for folder in ("a/teachers/mlp", "b/evaluators/resnet8", "c.old-20260101", "d", "e"):
        write_run(sweep / folder, 0, transfer_acc=0.25)
    write_run(sweep / "f", 1, transfer_acc=0.75)
    (sweep / "g" / ".hydra").mkdir(parents=True)
    (sweep / "g" / ".hydra" / "config.yaml").write_text("seed: 2\n")
    (sweep / "h").mkdir()
    (sweep / "h" / "failed.json").write_text(json.dumps({"error": "ValueError: boom", "attempts": 2}))
    text = report(sweep, "report.values=[transfer_acc]")
    assert "3 complete runs, seeds 0, 1;" in text
    assert [line[0] for line in read_csv(sweep / "runs.csv")[1:]] == ["d", "e", "f"]
    assert text.endswith(
        "## Missing or incomplete runs (2)\n\n"
        "- `g`: no metrics.json (not started, or killed before its first epoch)\n"
        "- `h`: failed: ValueError: boom (attempt 2)\n"
    )


@pytest.mark.parametrize(
    ("option", "refusal"),
    [
        ("report.values=[transfer_acc,best_source_acc]",
         r"^report.values names 'best_source_acc', which no run has; metrics: transfer_acc, labels$"),
        ("report.values=[method]",
         r"^report.values names 'method', which is not a number in every run that has it; metrics: transfer_acc, "
         r"labels$"),
        ("report.rows=[metod]",
         r"^report.rows names 'metod', which no run has; named fields and keys that vary: method, distill.tau$"),
        ("report.columns=[labelz]",
         r"^report.columns names 'labelz', which no run has; named fields and keys that vary: method, distill.tau$"),
        ("report.choose=[taus]",
         r"^report.choose names 'taus', which no run has; named fields and keys that vary: method, distill.tau$"),
        ("report.curve=val_acc",
         r"^report.curve='val_acc' is in no run's history; metrics per epoch: transfer_acc$"),
    ],
)  # fmt: skip
def test_a_layout_naming_what_no_run_has_is_refused(tmp_path: Path, option: str, refusal: str) -> None:
    for tau in (1, 4):
        history = [{"epoch": 1, "transfer_acc": 0.5}]
        write_run(tmp_path / "s" / f"{tau}", 0, {"distill": {"tau": tau}}, method="kd", transfer_acc=0.5,
                  labels=10, history=history)  # fmt: skip
    with pytest.raises(ConfigError, match=refusal):
        report(tmp_path / "s", option)


def test_report_defaults_rows_by_method_constants_in_a_header_and_curves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No layout given: rows by the method (not by the loss weights that differ with it), the
    size every run shares in a header line, curves.png of the first metric with a history (the
    mean over seeds per epoch, a band of one std); a later report of runs without histories
    removes the stale picture."""
    curves = {}
    for method, weight in (("kd", 0.0), ("kd+synthetic_head", 1.0)):
        for seed in (0, 1):
            folder = tmp_path / "s" / f"{method}-{seed}"
            curves[(method, seed)] = [0.5 + 0.1 * e + 0.01 * seed * (1 + weight) for e in (1, 2)]
            history = [{"epoch": e, "source_acc": acc} for e, acc in enumerate(curves[(method, seed)], 1)]
            write_run(folder, seed, {"distill": {"losses": {"synthetic_head": weight}}}, method=method,
                      source_acc=0.7 + 0.01 * seed, transfer_train_size=1437, history=history)  # fmt: skip
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its lines
    text = report(tmp_path / "s")
    assert "The same in every run: transfer_train_size 1437." in text
    table = read_csv(tmp_path / "s" / "report.csv")
    assert table[0] == ["method", "runs", "source_acc mean", "source_acc std"]
    assert [row[0] for row in table[1:]] == ["kd", "kd+synthetic_head"]
    runs_csv = list(csv.DictReader((tmp_path / "s" / "runs.csv").open()))  # and every config key that varies
    assert {(r["method"], r["distill.losses.synthetic_head"], r["seed"]) for r in runs_csv} == {
        ("kd", "0.0", "0"), ("kd", "0.0", "1"), ("kd+synthetic_head", "1.0", "0"), ("kd+synthetic_head", "1.0", "1")
    }  # fmt: skip
    assert plt.imread(tmp_path / "s" / "curves.png").shape[:2] == (450, 700)  # 7 x 4.5 inches at 100 dpi
    (ax,) = figures[0].axes
    assert [line.get_label() for line in ax.lines] == ["kd", "kd+synthetic_head"]
    for line, method in zip(ax.lines, ("kd", "kd+synthetic_head"), strict=True):
        assert list(line.get_ydata()) == pytest.approx(np.mean([curves[(method, s)] for s in (0, 1)], axis=0))
    bands = [band.get_paths()[0].vertices[:, 1] for band in ax.collections]
    spread = np.std([curves[("kd+synthetic_head", s)] for s in (0, 1)], axis=0, ddof=1)
    mean = np.mean([curves[("kd+synthetic_head", s)] for s in (0, 1)], axis=0)
    assert set(np.round(bands[1], 9)) == set(np.round([*(mean - spread), *(mean + spread)], 9))
    for path in (tmp_path / "s").glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        path.write_text(json.dumps({**metrics, "history": []}))
    report(tmp_path / "s")
    assert not (tmp_path / "s" / "curves.png").exists()


def test_curves_per_row_with_a_band_where_seeds_spread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metric report.curve names (not the first with a history), a line per row over epochs
    1..n with a point per epoch, labelled by the row's values, on axes named by epoch and metric;
    a see-through band (of the line's colour, though an earlier row had none) only where a row
    has more than one seed."""
    runs = {
        ("kd", "none", 0): [0.25, 0.5, 0.75],
        ("kd", "none", 1): [0.5, 0.5, 0.5],
        ("ce", "w x1", 0): [0.125] * 3,
    }
    for (method, vmf, seed), curve in runs.items():
        history = [{"epoch": e, "acc": acc, "loss": 1 - acc} for e, acc in enumerate(curve, 1)]
        write_run(
            tmp_path / "s" / f"{method}-{seed}", seed, method=method, vmf=vmf, acc=curve[-1], history=history
        )
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report(tmp_path / "s", "report.rows=[method,vmf]", "report.curve=loss")
    (ax,) = figures[0].axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "loss")
    assert [line.get_label() for line in ax.lines] == ["ce / w x1", "kd / none"]
    assert [line.get_marker() for line in ax.lines] == [".", "."]
    assert [list(line.get_xdata()) for line in ax.lines] == [[1, 2, 3], [1, 2, 3]]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.875] * 3)
    assert list(ax.lines[1].get_ydata()) == pytest.approx([0.625, 0.5, 0.375])
    (band,) = ax.collections
    assert 0 < band.get_alpha() <= 0.25  # the lines stay visible through it
    assert tuple(band.get_facecolor()[0][:3]) == pytest.approx(
        matplotlib.colors.to_rgb(ax.lines[1].get_color())
    )


def test_a_column_group_a_row_lacks_is_a_blank_cell_and_no_pair(tmp_path: Path) -> None:
    """ce (the baseline) ran on mnist only, st on usps only, kd on both: a cell of no runs is '-',
    and a pair needs both rows in the column group; the paired table sits under its caption."""
    accs = {
        ("ce", "mnist"): [0.90, 0.93],
        ("kd", "mnist"): [0.91, 0.97],
        ("kd", "usps"): [0.58, 0.56],
        ("st", "usps"): [0.50, 0.55],
    }
    for (method, transfer), values in accs.items():
        for seed, acc in enumerate(values):
            write_run(tmp_path / "s" / f"{method}-{transfer}-{seed}", seed, {"method": method},
                      transfer=transfer, transfer_acc=acc)  # fmt: skip
    text = report(
        tmp_path / "s", "report.rows=[method]", "report.columns=[transfer]", "report.values=[transfer_acc]",
        "report.baseline=ce",
    )  # fmt: skip
    kd = paired_cell(accs[("kd", "mnist")], accs[("ce", "mnist")])
    assert text.endswith(
        f"| ce | 2 | {cell(accs[('ce', 'mnist')])} | - |\n"
        f"| kd | 4 | {cell(accs[('kd', 'mnist')])} | {cell(accs[('kd', 'usps')])} |\n"
        f"| st | 2 | - | {cell(accs[('st', 'usps')])} |\n"
        "\n"
        "Paired differences to `ce` over shared seeds: mean [95 % CI, paired t] (n pairs).\n"
        "\n"
        "| method | mnist transfer_acc - ce | usps transfer_acc - ce |\n"
        "|---|---|---|\n"
        f"| kd | {kd} | - |\n"
        "| st | - | - |\n"
    )


def test_a_search_over_two_keys_chooses_the_best_pair_of_values(tmp_path: Path) -> None:
    """The best setting of (tau, lr) together, neither the first in natural order nor made of the
    best tau on average (1: 0.6875 against 0.5625): tau 4 with lr 0.01."""
    means = {(1.0, 0.01): 0.625, (1.0, 0.1): 0.75, (4.0, 0.01): 0.875, (4.0, 0.1): 0.25}
    for (tau, lr), val in means.items():
        for seed, spread in enumerate((-0.0625, 0.0625)):
            config = {"method": "kd", "distill": {"tau": tau}, "lr": lr}
            write_run(
                tmp_path / "s" / f"{tau}-{lr}-{seed}", seed, config, method="kd", best_val_acc=val + spread
            )
    text = report(
        tmp_path / "s", "report.rows=[method,distill.tau,lr]", "report.values=[best_val_acc]",
        "report.choose=[distill.tau,lr]",
    )  # fmt: skip
    assert read_csv(tmp_path / "s" / "chosen.csv") == [
        ["method", "distill.tau", "lr", "mean best_val_acc", "runs"],
        ["kd", "4.0", "0.01", "0.8750", "2"],
    ]
    assert "the setting of `distill.tau`, `lr` with the highest mean `best_val_acc`." in text


def test_default_values_leave_out_teachers_and_shared_numbers_and_stop_at_eight(tmp_path: Path) -> None:
    """Runs that differ only in their seed: one row, named by the task; the columns are the first
    eight numbers the runs write, without the teacher's metrics and the size they share."""
    for seed in (0, 1):
        metrics = {f"m{i}": i + seed / 4 for i in range(1, 10)}
        write_run(tmp_path / "s" / f"{seed}", seed, {"task": {"name": "distill"}}, teacher_acc=0.5 + seed / 4,
                  size=1437, **metrics)  # fmt: skip
    report(tmp_path / "s")
    header, *lines = read_csv(tmp_path / "s" / "report.csv")
    assert header[:2] == ["task.name", "runs"]
    assert header[2::2] == [f"m{i} mean" for i in range(1, 9)]
    assert [line[:2] for line in lines] == [["distill", "2"]]


def history_run(folder: Path, seed: int, accs: list[float], **metrics: Any) -> None:
    history = [{"epoch": e + 1, "transfer_acc": a, "loss": 1 - a} for e, a in enumerate(accs)]
    write_run(folder, seed, {"method": "kd"}, method="kd", transfer_acc=accs[-1], history=history, **metrics)


def logged_report(caplog: pytest.LogCaptureFixture, run_dir: Path, *overrides: str) -> dict:
    """task=report in this process with penrun's log captured (caplog's handler on penrun's
    logger: a sweep run earlier in the session may have replaced the root logger's handlers)."""
    penrun_log = logging.getLogger("penrun")
    with caplog.at_level(logging.INFO, logger="penrun"):
        penrun_log.addHandler(caplog.handler)
        try:
            return run_task(["task=report", *overrides], run_dir)
        finally:
            penrun_log.removeHandler(caplog.handler)


def test_the_task_logs_its_report_names_what_it_wrote_and_returns_its_sweep(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """task=report's log holds report.md as written and one line naming every file written
    (chosen.csv for a search, curves.png for runs with a history); it returns its sweep."""
    sweep = tmp_path / "s"
    for seed in (0, 1):
        history_run(sweep / f"kd-{seed}", seed, [0.5, 0.75], best_val_acc=0.5 + seed / 4)
    result = logged_report(
        caplog,
        tmp_path / "job",
        f"sweep_dir={sweep}",
        "report.values=[best_val_acc]",
        "report.choose=[method]",
        "report.curve=transfer_acc",
    )
    assert result == {"task": "report", "sweep_dir": str(sweep)}
    assert (sweep / "report.md").read_text() in caplog.messages
    assert f"wrote {sweep / 'report.md'}, report.csv, runs.csv, chosen.csv, curves.png" in caplog.messages
    # best_val_acc has no history: no curves.png (the earlier one goes), and the line says so
    logged_report(caplog, tmp_path / "job", f"sweep_dir={sweep}", "report.values=[best_val_acc]")
    assert caplog.messages[-1] == f"wrote {sweep / 'report.md'}, report.csv, runs.csv"
    assert not (sweep / "curves.png").exists()


def test_a_sweep_folder_that_cannot_be_written_gets_its_report_in_the_jobs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs read from a read-only folder (another user's sweep): the same report, written into
    the report job's own folder instead. (Root ignores file modes, so writing into the sweep
    is refused by a stand-in for the file system's PermissionError.)"""
    from penrun.app.tasks import report as report_module

    sweep = tmp_path / "s"
    for seed in (0, 1):
        history_run(sweep / f"kd-{seed}", seed, [0.5, 0.75 - seed / 4])
    (sweep / "kd-2").mkdir()
    (sweep / "kd-2" / "metrics.json").write_text(json.dumps({"status": "running", "history": [{"epoch": 1}]}))
    expected = report(sweep, "report.values=[transfer_acc]")
    assert "## Missing or incomplete runs (1)" in expected
    for name in ("report.md", "report.csv", "runs.csv", "curves.png"):
        (sweep / name).unlink()
    write = report_module.atomic_write

    def refuse_the_sweep(path: Path, writer: Any) -> None:
        if path.parent == sweep:
            raise PermissionError(13, "Permission denied", str(path))
        write(path, writer)

    monkeypatch.setattr(report_module, "atomic_write", refuse_the_sweep)
    job = tmp_path / "job"
    logged_report(caplog, job, f"sweep_dir={sweep}", "report.values=[transfer_acc]")
    assert (job / "report.md").read_text() == expected
    assert sorted(p.name for p in job.iterdir() if p.is_file()) == [
        "curves.png",
        "report.csv",
        "report.md",
        "runs.csv",
    ]
    assert not any((sweep / name).exists() for name in ("report.md", "report.csv"))
    assert f"wrote {job / 'report.md'}, report.csv, runs.csv, curves.png" in caplog.messages


def test_report_md_as_a_reader_sees_it(tmp_path: Path) -> None:
    """The whole report.md of two runs sharing two numbers, with one interrupted run, to the
    character (written out by hand)."""
    sweep = tmp_path / "s"
    for seed, acc in ((0, 0.5), (1, 0.75)):
        write_run(
            sweep / f"r{seed}", seed, {"method": "kd"}, method="kd", transfer_acc=acc, size=10, val_size=5
        )
    (sweep / "r2").mkdir()
    (sweep / "r2" / "metrics.json").write_text(json.dumps({"status": "running", "history": [{"epoch": 1}]}))
    text = report(sweep, "report.rows=[method]", "report.values=[transfer_acc]")
    assert text == (
        f"# Report of {sweep}\n"
        "\n"
        "2 complete runs, seeds 0, 1; cells are mean ± std over seeds.\n"
        "\n"
        "The same in every run: size 10, val_size 5.\n"
        "\n"
        "| method | runs | transfer_acc |\n"
        "|---|---|---|\n"
        "| kd | 2 | 0.6250 ± 0.1768 |\n"
        "\n"
        "## Missing or incomplete runs (1)\n"
        "\n"
        "- `r2`: interrupted after 1 epoch(s)\n"
    )


def test_a_report_with_a_baseline_and_a_choice_joins_its_tables_with_a_blank_line(tmp_path: Path) -> None:
    for tau, seed, val in ((1.0, 0, 0.5), (1.0, 1, 0.75), (4.0, 0, 0.25), (4.0, 1, 0.5)):
        search_run(tmp_path / "s" / f"{tau}-{seed}", "kd", tau, seed, val, 0.5)
    text = report(tmp_path / "s", "report.values=[best_val_acc]", "report.baseline=kd 1.0")
    tables = ["| method | distill.tau | runs | best_val_acc |", "|\n\nPaired differences to `kd 1.0`",
              "|\n\nChosen per row: the setting of `distill.tau`"]  # fmt: skip
    assert all(table in text for table in tables)
    assert text.index(tables[0]) < text.index(tables[1]) < text.index(tables[2])


def test_a_curve_no_run_records_is_refused_naming_the_per_epoch_metrics(tmp_path: Path) -> None:
    """Runs with and without a history: the metrics any history has, in their order."""
    history_run(tmp_path / "s" / "a", 0, [0.5, 0.75])
    write_run(tmp_path / "s" / "b", 1, {"method": "kd"}, method="kd", transfer_acc=0.5)
    with pytest.raises(
        ConfigError,
        match=r"^report.curve='nope' is in no run's history; metrics per epoch: transfer_acc, loss$",
    ):
        report(tmp_path / "s", "report.curve=nope")
    write_run(tmp_path / "t" / "b", 1, {"method": "kd"}, method="kd", transfer_acc=0.5)
    with pytest.raises(
        ConfigError, match=r"^report.curve='nope' is in no run's history; metrics per epoch: none$"
    ):
        report(tmp_path / "t", "report.curve=nope")


def test_runs_stored_without_a_config_are_reported(tmp_path: Path) -> None:
    """metrics.json written before runs stored their config: no stored layout, the same report."""
    for seed, acc in ((0, 0.5), (1, 0.75)):
        (tmp_path / "s" / f"{seed}").mkdir(parents=True)
        record = {"status": "complete", "method": "kd", "seed": seed, "transfer_acc": acc}
        (tmp_path / "s" / f"{seed}" / "metrics.json").write_text(json.dumps(record))
    text = report(tmp_path / "s", "report.rows=[method]", "report.values=[transfer_acc]")
    assert "| kd | 2 | 0.6250 ± 0.1768 |" in text


def test_a_search_score_beats_the_best_only_by_more_than_a_millionth_of_its_size() -> None:
    """The tie margin: 1e-6, relative above 1 (float32 rounding of accuracies and of scores
    such as a Frechet distance)."""
    from penrun.app.tasks.report import beats

    assert not beats(1e-6, 0.0)  # exactly at the margin: a tie
    assert beats(2e-6, 0.0)
    assert beats(1.5 + 1.7e-6, 1.5)  # the margin is 1.5e-6 here, not 1e-6 or 2e-6
    assert not beats(1.5 + 1.4e-6, 1.5)
    assert not beats(100 + 5e-5, 100.0)  # the margin is 1e-4
    assert beats(100 + 2e-4, 100.0)
