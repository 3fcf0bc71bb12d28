"""task=report: a sweep's metrics.json files -> report.md, report.csv, runs.csv, curves.png
(in sweep_dir).

Runs are grouped by the named fields that vary (task, method, vmf, cond), else by what their
configs differ in, apart from the seed; each cell is the mean +- std over the seeds of a group.
Metrics with one value in every run go to a header line; curves.png shows the first metric
with a per-epoch history (mean and a band of one std over seeds) unless `report.curve` names
one. With `report.baseline=ROW`, a second table gives each other
row's paired difference to that row (over the seeds both ran) with a 95 % paired-t confidence
interval. With `report.choose=[KEYS]` (a search's sweep), a third gives each row's setting of
those keys with the best mean of the first value (chosen.csv). report.csv is the table as
numbers (a mean and a std column per cell); runs.csv holds one line per run, with raw numbers
and every config key that varies. A run folder without a complete metrics.json is reported as missing, with
why: interrupted (and after how many epochs), failed (with the error), or never started. The
layout is the same whichever Hydra launcher ran the sweep.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from scipy.stats import t

from penrun.app.config import job_folder
from penrun.app.errors import ConfigError
from penrun.app.sweeps import FAILED_FILE, job_state
from penrun.train.files import atomic_write
from penrun.train.run_folder import OLD_SUFFIX, flatten

log = logging.getLogger(__name__)

SEED_KEYS = ("seed",)


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


def collect(sweep_dir: Path) -> tuple[list[RunRecord], list[tuple[Path, str]]]:
    """Complete runs, and (folder, why) for every run folder without complete results."""
    done, missing = [], []
    for folder in sorted(
        {p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml")}
        | {p.parent for p in sweep_dir.rglob("metrics.json")}
        | {p.parent for p in sweep_dir.rglob(FAILED_FILE)}
    ):
        inside = folder.parts[len(sweep_dir.parts) :]
        if {"teachers", "evaluators"} & set(inside) or any(OLD_SUFFIX in part for part in inside):
            continue  # cached helper classifiers, and runs moved aside by rerun=true
        state, description = job_state(folder)
        if state == "complete":
            done.append(RunRecord(folder, json.loads((folder / "metrics.json").read_text())))
        else:
            missing.append((folder, description))
    return done, missing


def varying_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys whose values differ between runs, apart from the seed."""
    configs = [r.config for r in runs]
    keys = sorted(set().union(*configs)) if configs else []
    return [k for k in keys if k not in SEED_KEYS and len({json.dumps(c.get(k)) for c in configs}) > 1]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """The mean and the std over seeds (None where there are too few values)."""
    mean = statistics.mean(values) if values else None
    return mean, statistics.stdev(values) if len(values) > 1 else None


def cell_text(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def group_runs(runs: list[RunRecord], keys: list[str]) -> dict[tuple, list[RunRecord]]:
    groups: dict[tuple, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(tuple(str(r.value(k)) for k in keys), []).append(r)
    return groups


# metrics.json fields that name what a run is (the method, the vMF option, ...): the rows a
# report groups by when none are given, where they vary.
NAMED_FIELDS = ("task", "method", "vmf", "cond")


def named_rows(runs: list[RunRecord]) -> list[str]:
    return [k for k in NAMED_FIELDS if len({json.dumps(r.fields.get(k)) for r in runs}) > 1]


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


def numeric_fields(runs: list[RunRecord]) -> list[str]:
    fields: list[str] = []
    for r in runs:
        fields += [
            k
            for k, v in r.fields.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in fields
        ]
    return fields


def table(
    runs: list[RunRecord], rows: list[str], columns: list[str], values: list[str]
) -> tuple[str, list[list[str]]]:
    """A Markdown table (rows x columns, one "mean ± std" cell per value metric) and the same
    as CSV lines with raw numbers (a mean and a std column per cell)."""
    col_groups = sorted(group_runs(runs, columns)) if columns else [()]
    names = [" ".join([*col, v]).strip() for col in col_groups for v in values]
    md_lines, csv_lines = [], []
    for row_key, members in sorted(group_runs(runs, rows).items()):
        stats = [
            mean_std(
                [
                    float(r.value(v))
                    for r in members
                    if column_of(r, columns) == col and r.value(v) is not None
                ]
            )
            for col in col_groups
            for v in values
        ]
        md_lines.append([*row_key, str(len(members)), *(cell_text(*stat) for stat in stats)])
        csv_lines.append([*row_key, len(members), *(x for stat in stats for x in stat)])
    header = [*rows, "runs", *names]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(line) + " |" for line in md_lines]
    csv_header = [*rows, "runs", *(f"{name} {part}" for name in names for part in ("mean", "std"))]
    return "\n".join(md), [csv_header, *csv_lines]


def column_of(run: RunRecord, columns: list[str]) -> tuple[str, ...]:
    return tuple(str(run.value(k)) for k in columns)


def paired_table(
    runs: list[RunRecord], rows: list[str], columns: list[str], values: list[str], baseline: str
) -> str:
    """Each row's mean difference to the baseline row over the seeds both ran, per column
    group and metric, with a 95 % paired-t confidence interval."""
    groups = group_runs(runs, rows)
    names = {" ".join(key): key for key in groups}
    if baseline not in names:
        raise ConfigError(f"report.baseline={baseline!r} is not a row of the table; rows: {sorted(names)}")
    col_groups = sorted(group_runs(runs, columns)) if columns else [()]

    def by_seed(members: list[RunRecord], col: tuple, metric: str) -> dict[str, float]:
        return {
            str(r.value("seed")): float(r.value(metric))
            for r in members
            if column_of(r, columns) == col and r.value(metric) is not None
        }

    header = [*rows] + [" ".join([*col, f"{v} - {baseline}"]).strip() for col in col_groups for v in values]
    lines = []
    for key, members in sorted(groups.items()):
        if key != names[baseline]:
            cells = []
            for col in col_groups:
                for v in values:
                    mine, base = by_seed(members, col, v), by_seed(groups[names[baseline]], col, v)
                    cells.append(
                        paired_difference([mine[s] - base[s] for s in sorted(mine.keys() & base.keys())])
                    )
            lines.append([*key, *cells])
    md = [
        f"Paired differences to `{baseline}` over shared seeds: mean [95 % CI, paired t] (n pairs).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    return "\n".join(md + ["| " + " | ".join(line) + " |" for line in lines])


def chosen_table(
    runs: list[RunRecord], rows: list[str], choose: list[str], value: str
) -> tuple[str, list[list[str]]]:
    """A search's choice: for each row (its keys apart from the searched ones), the setting of
    the `choose` keys whose mean `value` over seeds is highest (ties: the first in sort order)."""
    fixed = [k for k in rows if k not in choose]
    best: dict[tuple, tuple[float, tuple, int]] = {}
    for key, members in sorted(group_runs(runs, [*fixed, *choose]).items()):
        scores = [float(r.value(value)) for r in members if r.value(value) is not None]
        row, setting = key[: len(fixed)], key[len(fixed) :]
        if scores and (row not in best or statistics.mean(scores) > best[row][0]):
            best[row] = (statistics.mean(scores), setting, len(scores))
    header = [*fixed, *choose, f"mean {value}", "runs"]
    body = [[*row, *setting, f"{mean:.4f}", str(n)] for row, (mean, setting, n) in sorted(best.items())]
    md = [
        f"Chosen per row: the setting of {', '.join(f'`{k}`' for k in choose)} with the highest mean `{value}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    return "\n".join(md + ["| " + " | ".join(line) + " |" for line in body]), [header, *body]


def paired_difference(diffs: list[float]) -> str:
    """mean [low, high] (n) of paired differences; a 95 % paired-t interval needs n >= 2."""
    if not diffs:
        return "-"
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.4f} (n=1)"
    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] (n={len(diffs)})"


def run_lines(runs: list[RunRecord], keys: list[str], values: list[str]) -> list[list[Any]]:
    """One line per run (for pandas): its folder, the table's keys and every other config key
    that varies, the seed, raw values."""
    keys = list(dict.fromkeys([*keys, *varying_keys(runs)]))
    header = ["folder", *keys, "seed", *values]
    return [header] + [
        [r.folder.name, *(r.value(k) for k in keys), r.value("seed"), *(r.value(v) for v in values)]
        for r in sorted(runs, key=lambda r: str(r.folder))
    ]


def render(
    sweep_dir: Path,
    rows: list[str] | None,
    columns: list[str] | None,
    values: list[str] | None,
    curve: str | None,
    baseline: str | None = None,
    choose: list[str] | None = None,
    out_dir: Path | None = None,
) -> str:
    """Write report.md, report.csv and curves.png into out_dir (default: sweep_dir); return
    the Markdown."""
    out_dir = out_dir or sweep_dir
    runs, missing = collect(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no complete run under {sweep_dir} ({len(missing)} incomplete)")
    rows = rows or named_rows(runs) or varying_keys(runs) or ["task.name"]
    columns = columns or []
    constants = constant_fields(runs)
    values = (
        values or [f for f in numeric_fields(runs) if not f.startswith("teacher_") and f not in constants][:8]
    )
    curve = curve or next(
        (v for v in values if any(v in row for r in runs for row in r.metrics.get("history", []))), None
    )
    md, csv_rows = table(runs, rows, columns, values)
    if baseline is not None:
        md += "\n\n" + paired_table(runs, rows, columns, values, baseline)
    if choose:
        chosen_md, chosen_rows = chosen_table(runs, rows, choose, values[0])
        md += "\n\n" + chosen_md
        write_csv(out_dir / "chosen.csv", chosen_rows)
    seeds = sorted({str(r.value("seed")) for r in runs})
    text = [
        f"# Report of {sweep_dir}",
        "",
        f"{len(runs)} complete runs, seeds {', '.join(seeds)}; cells are mean ± std over seeds.",
        "",
        *(
            [f"The same in every run: {', '.join(f'{k} {v}' for k, v in constants.items())}.", ""]
            if constants
            else []
        ),
        md,
    ]
    if missing:
        text += ["", f"## Missing or incomplete runs ({len(missing)})", ""]
        text += [f"- `{folder.relative_to(sweep_dir)}`: {why}" for folder, why in missing]
    report = "\n".join(text) + "\n"
    atomic_write(out_dir / "report.md", lambda p: p.write_text(report))
    write_csv(out_dir / "report.csv", csv_rows)
    write_csv(out_dir / "runs.csv", run_lines(runs, [*rows, *columns], values))
    if curve:
        plot_curves(runs, rows + columns, curve, out_dir / "curves.png")
    else:  # no per-epoch metric: a curves.png of an earlier report would not be this one's
        (out_dir / "curves.png").unlink(missing_ok=True)
    return report


def write_csv(path: Path, lines: list[list[Any]]) -> None:
    buf = io.StringIO()
    csv.writer(buf).writerows(lines)
    atomic_write(path, lambda p: p.write_text(buf.getvalue()))


def plot_curves(runs: list[RunRecord], keys: list[str], metric: str, path: Path) -> None:
    """Per group, the mean over seeds of `metric` per epoch, with a band of one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, members in sorted(group_runs(runs, keys).items()):
        curves = [[row[metric] for row in r.metrics.get("history", []) if metric in row] for r in members]
        length = min((len(c) for c in curves), default=0)
        if length:
            epochs = range(1, length + 1)
            mean = [statistics.mean(c[i] for c in curves) for i in range(length)]
            (line,) = ax.plot(epochs, mean, marker=".", label=" / ".join(key))
            if len(curves) > 1:  # the spread over seeds
                std = [statistics.stdev(c[i] for c in curves) for i in range(length)]
                low = [m - d for m, d in zip(mean, std, strict=True)]
                high = [m + d for m, d in zip(mean, std, strict=True)]
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def run(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.get("sweep_dir"):
        raise ConfigError(
            "task=report needs sweep_dir=DIR (a folder of runs, e.g. outputs/multirun/distill/...)"
        )
    sweep_dir = Path(cfg.sweep_dir).expanduser()
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep_dir={str(sweep_dir)!r} is not a folder")
    layout = {
        **layout_from_runs(sweep_dir),
        **{k: v for k, v in OmegaConf.to_container(cfg.report).items() if v},
    }
    table_layout = [layout.get(key) for key in ("rows", "columns", "values", "curve", "baseline", "choose")]
    out_dir = sweep_dir
    try:
        try:
            text = render(sweep_dir, *table_layout)
        except PermissionError:  # a read-only sweep folder: the report goes to this job's folder
            out_dir = job_folder()
            text = render(sweep_dir, *table_layout, out_dir=out_dir)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err
    log.info(text)
    log.info(
        f"wrote {out_dir / 'report.md'}, report.csv, runs.csv"
        + (", chosen.csv" if layout.get("choose") else "")
        + (", curves.png" if (out_dir / "curves.png").exists() else "")
    )
    return {"task": "report", "sweep_dir": str(sweep_dir)}


def layout_from_runs(sweep_dir: Path) -> dict[str, Any]:
    """The table layout an experiment config stored with its runs (`report:` node), if any."""
    runs, _ = collect(sweep_dir)
    for r in runs:
        stored = r.metrics.get("config", {}).get("report")
        if stored:
            return {k: v for k, v in stored.items() if v}
    return {}
