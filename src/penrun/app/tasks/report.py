"""task=report: a sweep's metrics.json files -> report.md, report.csv, runs.csv, curves.png
(in sweep_dir). The runs are read, grouped and summed up by penrun.app.results; this module
lays out the tables.

Runs are grouped by the named fields that vary (task, method, vmf, cond), else by what their
configs differ in, apart from the seed; each cell is the mean +- std over the seeds of a group.
Rows, column groups and seeds come in natural order (tau 4 before 16, seed 9 before 10).
Metrics with one value in every run go to a header line; curves.png shows the first metric
with a per-epoch history (mean and a band of one std over seeds) unless `report.curve` names
one. With `report.baseline=ROW`, a second table gives each other row's paired difference to
that row (over the seeds both ran, within each column group) with a 95 % paired-t confidence
interval; ROW is a row's values joined by spaces ('kd none') or as many of them as pick out
one row ('kd'). With `report.choose=[KEYS]` (a search's sweep), a third gives each row's
setting of those keys with the best mean of the first value (chosen.csv). report.csv is the
table as numbers (a mean and a std column per cell); runs.csv holds one line per run, with raw
numbers and every config key that varies. A layout key naming what no run has is refused. The
layout an experiment stored with its runs (its `report:` node) applies where the command line
sets none. A run folder without a complete metrics.json is reported as missing, with why:
interrupted (and after how many epochs), failed (with the error), or never started. The layout
is the same whichever Hydra launcher ran the sweep.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from penrun.app.config import job_folder
from penrun.app.errors import ConfigError
from penrun.app.results import (
    NAMED_FIELDS,
    RunRecord,
    collect,
    constant_fields,
    group_runs,
    is_number,
    mean_std,
    named_rows,
    numeric_fields,
    paired_difference,
    paired_differences,
    seeds,
    values_of,
    varying_keys,
)
from penrun.train.files import atomic_write

log = logging.getLogger(__name__)


def markdown_table(header: list[str], body: list[list[str]], caption: str | None = None) -> str:
    """A Markdown table, under a caption line if one is given."""
    lines = [caption, ""] if caption else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])


def cell_text(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def column_names(col_groups: list[tuple[str, ...]], names: list[str]) -> list[str]:
    """A header per (column group, name): the group's values, then the name."""
    return [" ".join([*col, name]).strip() for col in col_groups for name in names]


def table(
    runs: list[RunRecord], rows: list[str], columns: list[str], values: list[str]
) -> tuple[str, list[list[Any]]]:
    """A Markdown table (rows x columns, one "mean ± std" cell per value metric) and the same
    as CSV lines with raw numbers (a mean and a std column per cell)."""
    col_groups = list(group_runs(runs, columns))
    names = column_names(col_groups, values)
    md_lines, csv_lines = [], []
    for row_key, members in group_runs(runs, rows).items():
        in_column = group_runs(members, columns)
        stats = [mean_std(values_of(in_column.get(col, []), v)) for col in col_groups for v in values]
        md_lines.append([*row_key, str(len(members)), *(cell_text(*stat) for stat in stats)])
        csv_lines.append([*row_key, len(members), *(x for stat in stats for x in stat)])
    csv_header = [*rows, "runs", *(f"{name} {part}" for name in names for part in ("mean", "std"))]
    return markdown_table([*rows, "runs", *names], md_lines), [csv_header, *csv_lines]


def row_named(row_keys: list[tuple[str, ...]], name: str) -> tuple[str, ...]:
    """The row `report.baseline` names: by its label (its values joined by spaces, e.g. 'kd none'), or by
    some of its values (whole words, e.g. 'kd') that only this row has."""
    labels = {" ".join(key): key for key in row_keys}
    if name in labels:
        return labels[name]
    words = Counter(name.split())
    matches = [label for label in labels if words <= Counter(label.split())]
    if not matches:
        raise ConfigError(f"report.baseline={name!r} is not a row of the table; rows: {list(labels)}")
    if len(matches) > 1:
        raise ConfigError(f"report.baseline={name!r} names {len(matches)} rows: {matches}; name one of them")
    return labels[matches[0]]


def paired_table(
    runs: list[RunRecord], rows: list[str], columns: list[str], values: list[str], baseline: str
) -> str:
    """Each row's mean difference to the baseline row over the seeds both ran, per column
    group and metric, with a 95 % paired-t confidence interval."""
    groups = group_runs(runs, rows)
    base_key = row_named(list(groups), baseline)
    col_groups = list(group_runs(runs, columns))
    base = group_runs(groups[base_key], columns)
    lines = []
    for key, members in groups.items():
        if key != base_key:
            mine = group_runs(members, columns)
            try:
                cells = [
                    paired_difference(paired_differences(mine.get(col, []), base.get(col, []), v))
                    for col in col_groups
                    for v in values
                ]
            except ValueError as err:  # two runs of a row share a seed
                raise ConfigError(
                    f"report.baseline={baseline!r}: {err}; the key that tells them apart belongs in "
                    "report.rows or report.columns"
                ) from err
            lines.append([*key, *cells])
    return markdown_table(
        [*rows, *column_names(col_groups, [f"{v} - {baseline}" for v in values])],
        lines,
        f"Paired differences to `{baseline}` over shared seeds: mean [95 % CI, paired t] (n pairs).",
    )


def beats(mean: float, best: float) -> bool:
    """Higher, and not only by rounding: metrics are stored as float32 (0.21 reads 0.2099999934),
    so means equal to 6 significant digits (0.20 + 0.23 against 0.21 + 0.22) are ties."""
    return mean > best + 1e-6 * max(1.0, abs(best))


def chosen_table(
    runs: list[RunRecord], rows: list[str], choose: list[str], value: str
) -> tuple[str, list[list[str]]]:
    """A search's choice: for each row (its keys apart from the searched ones), the setting of
    the `choose` keys whose mean `value` over seeds is highest (ties: the first in natural
    order, e.g. tau 4 before 16)."""
    fixed = [k for k in rows if k not in choose]
    best: dict[tuple, tuple[float, tuple, int]] = {}
    for key, members in group_runs(runs, [*fixed, *choose]).items():
        scores = values_of(members, value)
        mean, _ = mean_std(scores)
        row, setting = key[: len(fixed)], key[len(fixed) :]
        if mean is not None and (row not in best or beats(mean, best[row][0])):
            best[row] = (mean, setting, len(scores))
    header = [*fixed, *choose, f"mean {value}", "runs"]
    body = [[*row, *setting, f"{mean:.4f}", str(n)] for row, (mean, setting, n) in best.items()]
    caption = f"Chosen per row: the setting of {', '.join(f'`{k}`' for k in choose)} with the highest mean `{value}`."
    return markdown_table(header, body, caption), [header, *body]


def run_lines(runs: list[RunRecord], keys: list[str], values: list[str]) -> list[list[Any]]:
    """One line per run (for pandas), in the runs' order: its folder, the table's keys and every
    other config key that varies, the seed, raw values."""
    keys = list(dict.fromkeys([*keys, *varying_keys(runs)]))
    header = ["folder", *keys, "seed", *values]
    return [header] + [
        [r.folder.name, *(r.value(k) for k in keys), r.value("seed"), *(r.value(v) for v in values)]
        for r in runs
    ]


def check_layout(runs: list[RunRecord], layout: dict[str, Any]) -> None:
    """Every key the layout names is in some run: else a one-line error naming it and what exists."""
    metrics = numeric_fields(runs)
    for value in layout.get("values") or []:
        found = [r.value(value) for r in runs if r.value(value) is not None]
        if not found or not all(is_number(x) for x in found):
            what = "is not a number in every run that has it" if found else "no run has"
            raise ConfigError(f"report.values names {value!r}, which {what}; metrics: {', '.join(metrics)}")
    for option in ("rows", "columns", "choose"):
        for key in layout.get(option) or []:
            if all(r.value(key) is None for r in runs):
                known = [k for k in NAMED_FIELDS if any(k in r.fields for r in runs)] + varying_keys(runs)
                raise ConfigError(
                    f"report.{option} names {key!r}, which no run has; named fields and keys that vary: "
                    + ", ".join(known)
                )
    curve = layout.get("curve")
    if curve and not any(r.history(curve) for r in runs):
        rows = (row for r in runs for row in r.metrics.get("history", []))
        per_epoch = dict.fromkeys(key for row in rows for key in row if key != "epoch")
        raise ConfigError(
            f"report.curve={curve!r} is in no run's history; metrics per epoch: {', '.join(per_epoch) or 'none'}"
        )


def render(
    sweep_dir: Path,
    runs: list[RunRecord],
    missing: list[tuple[Path, str]],
    layout: dict[str, Any],
    out_dir: Path,
) -> str:
    """Write report.md, report.csv, runs.csv (chosen.csv, curves.png) of a sweep's runs into
    out_dir, laid out as `layout` (the `report:` node's keys; those not given chosen from the
    runs) says; return the Markdown."""
    check_layout(runs, layout)
    rows = layout.get("rows") or named_rows(runs) or varying_keys(runs) or ["task.name"]
    columns = layout.get("columns") or []
    constants = constant_fields(runs)
    values = (
        layout.get("values")
        or [f for f in numeric_fields(runs) if not f.startswith("teacher_") and f not in constants][:8]
    )
    curve = layout.get("curve") or next((v for v in values if any(r.history(v) for r in runs)), None)
    md, csv_rows = table(runs, rows, columns, values)
    if layout.get("baseline") is not None:
        md += "\n\n" + paired_table(runs, rows, columns, values, layout["baseline"])
    if layout.get("choose"):
        chosen_md, chosen_rows = chosen_table(runs, rows, layout["choose"], values[0])
        md += "\n\n" + chosen_md
        write_csv(out_dir / "chosen.csv", chosen_rows)
    text = [
        f"# Report of {sweep_dir}",
        "",
        f"{len(runs)} complete runs, seeds {', '.join(seeds(runs))}; cells are mean ± std over seeds.",
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
    for key, members in group_runs(runs, keys).items():
        curves = [r.history(metric) for r in members]
        length = min((len(c) for c in curves), default=0)
        if length:
            epochs = range(1, length + 1)
            per_epoch = [mean_std([c[i] for c in curves]) for i in range(length)]
            mean = [m for m, _ in per_epoch]
            (line,) = ax.plot(epochs, mean, marker=".", label=" / ".join(key))
            if len(curves) > 1:  # the spread over seeds
                low = [m - d for m, d in per_epoch]
                high = [m + d for m, d in per_epoch]
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
    runs, missing = collect(sweep_dir)
    if not runs:
        raise ConfigError(f"no complete run under {sweep_dir} ({len(missing)} incomplete)")
    layout = {**stored_layout(runs), **{k: v for k, v in OmegaConf.to_container(cfg.report).items() if v}}
    out_dir = sweep_dir
    try:
        text = render(sweep_dir, runs, missing, layout, out_dir)
    except PermissionError:  # a read-only sweep folder: the report goes to this job's folder
        out_dir = job_folder()
        text = render(sweep_dir, runs, missing, layout, out_dir)
    log.info(text)
    log.info(
        f"wrote {out_dir / 'report.md'}, report.csv, runs.csv"
        + (", chosen.csv" if layout.get("choose") else "")
        + (", curves.png" if (out_dir / "curves.png").exists() else "")
    )
    return {"task": "report", "sweep_dir": str(sweep_dir)}


def stored_layout(runs: list[RunRecord]) -> dict[str, Any]:
    """The table layout an experiment config stored with its runs (`report:` node), if any."""
    for r in runs:
        stored = r.metrics.get("config", {}).get("report")
        if stored:
            return {k: v for k, v in stored.items() if v}
    return {}
