"""task=report: a sweep's metrics.json files -> report.md, report.csv, curves.png (in sweep_dir)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from penrun.errors import ConfigError
from penrun.report import collect, render


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
    try:
        text = render(
            sweep_dir,
            layout.get("rows"),
            layout.get("columns"),
            layout.get("values"),
            layout.get("curve"),
        )
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err
    print(text)
    print(f"wrote {sweep_dir / 'report.md'}, report.csv" + (", curves.png" if layout.get("curve") else ""))
    return {"task": "report", "sweep_dir": str(sweep_dir)}


def layout_from_runs(sweep_dir: Path) -> dict[str, Any]:
    """The table layout an experiment config stored with its runs (`report:` node), if any."""
    runs, _ = collect(sweep_dir)
    for r in runs:
        stored = r.metrics.get("config", {}).get("report")
        if stored:
            return {k: v for k, v in stored.items() if v}
    return {}
