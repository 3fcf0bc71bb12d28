"""Mutation testing of penrun with mutmut, one module at a time (MUTATION.md).

    python scripts/mutation.py                  # every module, each against its own tests
    python scripts/mutation.py vmf bessel       # some modules (a path or its last part)
    python scripts/mutation.py --survivors vmf  # re-test only what survived last time
    python scripts/mutation.py --report-only    # the last results again, without running

pyproject.toml holds the settings: [tool.mutmut] (shared by every module) and
[tool.penrun.mutation] (the test files of each module). Each module runs in its own folder,
mutants/by-module/<name>/, whose pyproject.toml narrows [tool.mutmut] to that module and its
tests; mutmut keeps its results there. For each mutant mutmut runs only those tests that call
the mutated function, one mutant at a time by default (--max-children), so a core stays free.

The report gives, per module, killed / total (a timeout counts as killed, as in mutmut's own
score; "no tests" and "suspicious" count as not killed) and every other mutant with its diff
in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "mutants" / "by-module"
KILLED = ("killed", "timeout")
LINKED = ("src", "tests", "configs")


def settings() -> tuple[dict[str, Any], dict[str, list[str]]]:
    """([tool.mutmut], {module path: its test files}) from pyproject.toml."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]
    return tool["mutmut"], tool["penrun"]["mutation"]


def pick_modules(names: list[str]) -> list[str]:
    """Module paths matching each name ("vmf", "core/vmf.py", ...); all when none."""
    modules = list(settings()[1])
    if not names:
        return modules
    picked = []
    for name in names:
        found = [m for m in modules if m.removesuffix(".py").endswith(name.removesuffix(".py"))]
        if len(found) != 1:
            sys.exit(f"{name!r} names {len(found)} of the configured modules: {modules}")
        picked += found
    return picked


def folder(module: str) -> Path:
    return RUNS / Path(module).stem


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value)  # strings, numbers and lists of them: JSON is valid TOML here


def module_config(module: str, deselect_more: list[str]) -> str:
    """pyproject.toml with [tool.mutmut] narrowed to one module and its tests."""
    base, tests = settings()
    deselect = [a for a in base["pytest_add_cli_args_test_selection"] if a.startswith("--deselect")]
    deselect += [f"--deselect={node}" for node in deselect_more]
    config = {
        **base,
        "only_mutate": [module],
        "pytest_add_cli_args_test_selection": [*tests[module], *deselect],
        "use_git_change_detection": False,  # the folder is not a checkout
    }
    lines = (REPO / "pyproject.toml").read_text().splitlines()
    start = lines.index("[tool.mutmut]")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("["))
    table = ["[tool.mutmut]", *(f"{key} = {toml_value(value)}" for key, value in config.items())]
    return "\n".join([*lines[:start], *table, "", *lines[end:]]) + "\n"


def prepare(module: str, deselect: list[str]) -> Path:
    """The module's run folder: links to src/, tests/, configs/ and its own pyproject.toml."""
    missing = [test for test in settings()[1][module] if not (REPO / test).is_file()]
    if missing:  # mutmut would report every mutant as surviving a run that tested nothing
        sys.exit(
            f"{module}: its test files {missing} do not exist ([tool.penrun.mutation] in pyproject.toml)"
        )
    where = folder(module)
    where.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = where / name
        if not link.is_symlink():
            link.symlink_to(REPO / name)
    (where / "pyproject.toml").write_text(module_config(module, deselect))
    return where


def test_environment() -> dict[str, str]:
    env = dict(os.environ)
    # the tests run two folders down, where conftest's default data folder does not exist
    env.setdefault("PENRUN_DATA_DIR", str(REPO.parent / "shared" / "data"))
    # one thread per mutant: the run takes one core, and torch's thread pool never meets a fork
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def mutant_glob(module: str) -> str:
    """src/penrun/core/vmf.py -> penrun.core.vmf.* (mutmut's mutant names)."""
    return module.removeprefix("src/").removesuffix(".py").replace("/", ".") + ".*"


def mutmut_run(module: str, names: list[str], max_children: int, deselect: list[str]) -> None:
    command = ["mutmut", "run", "--max-children", str(max_children), *names]
    print(f"$ (cd {folder(module).relative_to(REPO)}) mutmut run ... ({len(names)} names)", flush=True)
    done = subprocess.run(command, cwd=prepare(module, deselect), env=test_environment(), check=False)
    if done.returncode != 0:  # e.g. no selected test calls the module: report it, go on
        print(f"mutmut run failed for {module} (exit {done.returncode})", flush=True)


def run_module(module: str, max_children: int, survivors_only: bool, deselect: list[str]) -> None:
    """Test every mutant of the module, or only those not killed last time (after testing,
    without names, the mutants of functions changed since, which mutmut does by itself)."""
    if not survivors_only:
        mutmut_run(module, [mutant_glob(module)], max_children, deselect)
        return
    mutmut_run(module, [], max_children, deselect)
    names = [name for name, status in results(module).items() if status not in KILLED]
    if names:
        mutmut_run(module, names, max_children, deselect)


@contextlib.contextmanager
def inside(where: Path) -> Iterator[None]:
    """mutmut reads its files relative to the working directory."""
    cwd = Path.cwd()
    os.chdir(where)
    try:
        yield
    finally:
        os.chdir(cwd)


def results(module: str) -> dict[str, str]:
    """Mutant name -> status, from mutmut's record of the module's last run."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    if not (folder(module) / "mutants" / (module + ".meta")).exists():
        return {}
    meta = SourceFileMutationData(path=Path(module))
    with inside(folder(module)):
        meta.load()
    return {name: status_by_exit_code[code] for name, code in meta.exit_code_by_key.items()}


def function_name(mutant: str) -> str:
    """penrun.core.vmf.xǁVonMisesFisherǁexpand__mutmut_5 -> VonMisesFisher.expand."""
    local = mutant.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]
    if local.startswith("xǁ"):
        return ".".join(part for part in local.split("ǁ")[1:] if part)
    return local.removeprefix("x_")


def one_line_diff(module: str, mutant: str) -> str:
    """The changed lines of the mutant's diff, as `old` -> `new`."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    with inside(folder(module)):
        lines = get_diff_for_mutant(mutant, path=module).splitlines()
    old = [x[1:].strip() for x in lines if x.startswith("-") and not x.startswith("---")]
    new = [x[1:].strip() for x in lines if x.startswith("+") and not x.startswith("+++")]
    return f"`{' '.join(old)}` -> `{' '.join(new)}`"


def report(modules: list[str]) -> bool:
    """Print the per-module scores and the mutants not killed; True when all reach 90 %."""
    rows, survivors = [], []
    for module in modules:
        status = results(module)
        counts = Counter(status.values())
        killed, total = sum(counts[s] for s in KILLED), len(status)
        rows.append((module, killed, total, counts))
        survivors += [(module, name, s) for name, s in sorted(status.items()) if s not in KILLED]
    print("\n| module | killed / total | score | statuses |\n|---|---|---|---|")
    for module, killed, total, counts in rows:
        score = f"{killed / total:.1%}" if total else "not run"
        detail = ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
        print(f"| {module} | {killed} / {total} | {score} | {detail} |")
    if survivors:
        print(
            f"\nnot killed ({len(survivors)}):\n| module | function | mutant | status | diff |\n|---|---|---|---|---|"
        )
    for module, name, status in survivors:
        mutant = name.rsplit("__mutmut_", 1)[1]
        print(f"| {module} | {function_name(name)} | {mutant} | {status} | {one_line_diff(module, name)} |")
    print(f"\n{describe_machine()}")
    return all(total and killed >= 0.9 * total for _, killed, total, _ in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("modules", nargs="*", help="modules of [tool.penrun.mutation] (default: all)")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--survivors", action="store_true", help="re-test only the mutants not killed")
    parser.add_argument("--report-only", action="store_true", help="print the last results, run nothing")
    parser.add_argument(
        "--deselect",
        action="append",
        default=[],
        metavar="NODE",
        help="leave out a test (one that fails now, or one too slow to re-run for every mutant)",
    )
    args = parser.parse_args()
    modules = pick_modules(args.modules)
    print(describe_machine(), flush=True)
    if not args.report_only:
        for module in modules:
            run_module(module, args.max_children, args.survivors, args.deselect)
    sys.exit(0 if report(modules) else 1)


if __name__ == "__main__":
    main()
