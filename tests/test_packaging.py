"""The configs travel inside the wheel, so an installed penrun finds them without a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from penrun.app.cli import config_dir

REPO = Path(__file__).resolve().parents[1]


def test_source_checkout_finds_the_top_level_configs() -> None:
    assert config_dir() == REPO / "configs"


@pytest.mark.slow
def test_wheel_carries_every_config(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(tmp_path)], check=True
    )
    (wheel,) = tmp_path.glob("penrun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"penrun/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")
    }
    assert expected and expected <= names


def test_the_console_script_points_at_the_entry_point() -> None:
    import importlib
    import tomllib

    from penrun.app.cli import main

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["penrun"].partition(":")
    assert getattr(importlib.import_module(module), name) is main
