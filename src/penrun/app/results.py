"""The results of a sweep: its runs read from their metrics.json files, grouped, and the
statistics over seeds that reports and study scripts print (mean and std, paired differences
with a 95 % paired-t interval).

Groups and seeds come in natural order: values that are numbers compare as numbers (seed 10
after seed 9, tau 16 after 4), and digits inside text too (`weights/weights x16` after `x4`).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from scipy.stats import t

from penrun.app.sweeps import FAILED_FILE, job_state
from penrun.train.run_folder import OLD_SUFFIX, flatten

SEED_KEY = "seed"

# metrics.json fields that name what a run is (the method, the vMF option, ...): the rows a
# report groups by when none are given, where they vary.
NAMED_FIELDS = ("task", "method", "vmf", "cond")


@dataclass
class RunRecord:
    folder: Path
    metrics: dict[str, Any]

    @cached_property
    def config(self) -> dict[str, Any]:
        return flatten(self.metrics.get("config", {}))

    @cached_property
    def fields(self) -> dict[str, Any]:
        return flatten({k: v for k, v in self.metrics.items() if k not in ("config", "history")})

    def value(self, key: str) -> Any:
        """A metrics.json field (dotted for nested ones) or, failing that, a config key."""
        return self.fields[key] if key in self.fields else self.config.get(key)

    def history(self, metric: str) -> list[float]:
        """The metric's value per epoch (epochs that did not record it left out)."""
        return [row[metric] for row in self.metrics.get("history", []) if metric in row]


def collect(sweep_dir: Path) -> tuple[list[RunRecord], list[tuple[Path, str]]]:
    """Complete runs, and (folder, why) for every run folder without complete results; both in
    the natural order of their folders."""
    done, missing = [], []
    folders = (
        {p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml")}
        | {p.parent for p in sweep_dir.rglob("metrics.json")}
        | {p.parent for p in sweep_dir.rglob(FAILED_FILE)}
    )
    for folder in sorted(folders, key=lambda f: natural_key(f.relative_to(sweep_dir).as_posix())):
        inside = folder.parts[len(sweep_dir.parts) :]
        if {"teachers", "evaluators"} & set(inside) or any(OLD_SUFFIX in part for part in inside):
            continue  # cached helper classifiers, and runs moved aside by rerun=true
        state, description = job_state(folder)
        if state == "complete":
            done.append(RunRecord(folder, json.loads((folder / "metrics.json").read_text())))
        else:
            missing.append((folder, description))
    return done, missing


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
DIGITS = re.compile(r"(\d+(?:\.\d+)?)")


def natural_key(text: str) -> tuple[tuple[int, Any], ...]:
    """A sort key under which a number is a number: '4.0' < '16.0', 'seed=9' < 'seed=10';
    numbers sort before words."""
    if NUMBER.fullmatch(text):
        return ((0, float(text)),)
    return tuple((0, float(part)) if i % 2 else (1, part) for i, part in enumerate(DIGITS.split(text)))


def group_key(key: tuple[str, ...]) -> tuple:
    return tuple(natural_key(part) for part in key)


def group_runs(runs: list[RunRecord], keys: list[str]) -> dict[tuple[str, ...], list[RunRecord]]:
    """Runs by their values of `keys` (as text), the groups in natural order."""
    groups: dict[tuple[str, ...], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(tuple(str(r.value(k)) for k in keys), []).append(r)
    return dict(sorted(groups.items(), key=lambda item: group_key(item[0])))


def seeds(runs: list[RunRecord]) -> list[str]:
    """The seeds the runs used, in natural order."""
    return sorted({str(r.value(SEED_KEY)) for r in runs}, key=natural_key)


def varying_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys whose values differ between runs, apart from the seed."""
    configs = [r.config for r in runs]
    keys = sorted(set().union(*configs))
    return [k for k in keys if k != SEED_KEY and len({json.dumps(c.get(k)) for c in configs}) > 1]


def named_rows(runs: list[RunRecord]) -> list[str]:
    """The named fields (NAMED_FIELDS) whose values differ between runs."""
    return [k for k in NAMED_FIELDS if len({json.dumps(r.fields.get(k)) for r in runs}) > 1]


def numeric_fields(runs: list[RunRecord]) -> list[str]:
    """metrics.json fields with a number (not a bool) in some run, in the order first seen."""
    fields: list[str] = []
    for r in runs:
        fields += [k for k, v in r.fields.items() if is_number(v) and k not in fields]
    return fields


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def constant_fields(runs: list[RunRecord]) -> dict[str, Any]:
    """Numeric metrics with one value in every run (e.g. a training-set size): a header line,
    not a column."""
    if len(runs) < 2:
        return {}
    return {
        k: runs[0].fields[k]
        for k in numeric_fields(runs)
        if k in runs[0].fields and all(r.fields.get(k) == runs[0].fields[k] for r in runs)
    }


def values_of(runs: list[RunRecord], metric: str) -> list[float]:
    """The metric of each run that has it."""
    return [float(r.value(metric)) for r in runs if r.value(metric) is not None]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """The mean and the std over seeds (None where there are too few values)."""
    mean = statistics.mean(values) if values else None
    return mean, statistics.stdev(values) if len(values) > 1 else None


def by_seed(runs: list[RunRecord], metric: str) -> dict[str, float]:
    """The metric of each run that has it, by the run's seed; two runs with one seed are refused
    (their difference to another row's run of that seed would be ambiguous)."""
    found: dict[str, RunRecord] = {}
    for r in runs:
        if r.value(metric) is None:
            continue
        seed = str(r.value(SEED_KEY))
        if seed in found:
            raise ValueError(f"two runs with seed {seed}: {found[seed].folder} and {r.folder}")
        found[seed] = r
    return {seed: float(r.value(metric)) for seed, r in found.items()}


def paired_differences(runs: list[RunRecord], baseline: list[RunRecord], metric: str) -> list[float]:
    """The metric of each run minus the baseline's run of the same seed, over the seeds both
    ran (in the runs' order)."""
    mine, base = by_seed(runs, metric), by_seed(baseline, metric)
    return [mine[s] - base[s] for s in mine if s in base]


def paired_difference(diffs: list[float]) -> str:
    """mean [low, high] (n) of paired differences, a 95 % paired-t interval; with one pair only
    the mean, with none '-'."""
    if not diffs:
        return "-"
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.4f} (n=1)"
    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] (n={len(diffs)})"
