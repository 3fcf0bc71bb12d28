"""Plausible bugs in the code that decides the published numbers, planted one at a time: each
must make its module's default tests fail (MUTATION.md, "Planted bugs").

    python scripts/planted_bugs.py          # all of them, in a temporary worktree of HEAD

Unlike a mutant, each bug is one a person could write: pairing runs by position, choosing a
search's setting on the test metric, training on the held-out examples, a key left out of a
teacher's identity, a shift turned the other way. The tests run from a `git worktree` of HEAD
(the working copy is untouched) with its src/ first on PYTHONPATH; a bug whose line is no
longer in the code stops the script, naming it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
REPORT = ["tests/test_report.py", "tests/test_results.py"]
DISTILL = ["tests/test_distill.py"]
TEACHERS = ["tests/test_teachers.py", "tests/test_train_teacher.py"]
SHIFTS = ["tests/test_transforms.py", "tests/test_data.py"]
CLI_LAYOUT = "{k: v for k, v in OmegaConf.to_container(cfg.report).items() if v}"


class Bug(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    tests: list[str]


BUGS = [
    Bug("pairs matched by position, not by seed", "src/penrun/app/results.py",
        "return [mine[s] - base[s] for s in mine if s in base]",
        "return [a - b for a, b in zip(mine.values(), base.values())]", REPORT),
    Bug("ties go to the last setting", "src/penrun/app/tasks/report.py",
        "return mean > best + 1e-6 * max(1.0, abs(best))", "return mean >= best", REPORT),
    Bug("a search chooses on the last value (a test metric), not the first", "src/penrun/app/tasks/report.py",
        'layout["choose"], values[0])', 'layout["choose"], values[-1])', REPORT),
    Bug("groups sorted as text (tau 16 before 4)", "src/penrun/app/results.py",
        "sorted(groups.items(), key=lambda item: group_key(item[0]))", "sorted(groups.items())", REPORT),
    Bug("an experiment's stored report layout ignored", "src/penrun/app/tasks/report.py",
        "layout = {**stored_layout(runs), **", "layout = {**", REPORT),
    Bug("the stored layout wins over the command line", "src/penrun/app/tasks/report.py",
        f"layout = {{**stored_layout(runs), **{CLI_LAYOUT}}}",
        f"layout = {{**{CLI_LAYOUT}, **stored_layout(runs)}}", REPORT),
    Bug("the held-out examples are trained on", "src/penrun/app/tasks/distill.py",
        "    kept[held] = False\n", "", DISTILL),
    Bug("the labelled subset ignores the seed", "src/penrun/app/tasks/distill.py",
        "labels, transfer.num_classes, seed)", "labels, transfer.num_classes, 0)", DISTILL),
    Bug("the last epoch is selected", "src/penrun/app/tasks/distill.py",
        "return scores.index(max(scores))", "return len(scores) - 1", DISTILL),
    Bug("the unlabeled protocol holds out by label", "src/penrun/app/tasks/distill.py",
        "held_out_indices(transfer, options.held_out,", 'held_out_indices(transfer, "balanced",', DISTILL),
    Bug("distill.dirichlet_beta never reaches the loss", "src/penrun/app/tasks/distill.py",
        "dirichlet_beta=float(options.dirichlet_beta)", "dirichlet_beta=1.0", DISTILL),
    Bug("a labelled run validates on the teacher's classes", "src/penrun/app/tasks/distill.py",
        "        if examples.y_val is not None\n", "        if False\n", DISTILL),
    Bug("teacher_seed left out of a teacher's identity", "src/penrun/app/teachers.py",
        '"seed": cfg[seed_key],', '"seed": 0,', TEACHERS),
    Bug("the student's trainer in the teacher's identity", "src/penrun/app/teachers.py",
        "OmegaConf.to_container(cfg[trainer_key], resolve=True)",
        "OmegaConf.to_container(cfg.trainer, resolve=True)", TEACHERS),
    Bug("rotate turns the other way", "src/penrun/data/transforms.py",
        "lambda x, s, g: _affine(x, s, 1.0)", "lambda x, s, g: _affine(x, -s, 1.0)", SHIFTS),
    Bug("scale zooms the other way", "src/penrun/data/transforms.py",
        "lambda x, s, g: _affine(x, 0.0, s)", "lambda x, s, g: _affine(x, 0.0, 1 / s)", SHIFTS),
]  # fmt: skip


def first_failure(bug: Bug, tree: Path, env: dict[str, str]) -> str | None:
    """The first test that fails with `bug` planted in `tree` (None: every test passed)."""
    file = tree / bug.path
    original = file.read_text()
    if original.count(bug.old) != 1:
        sys.exit(f"{bug.name}: {bug.old!r} is not once in {bug.path}; update BUGS")
    file.write_text(original.replace(bug.old, bug.new))
    try:
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-n2", "-pno:cacheprovider", *bug.tests]
        out = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    finally:
        file.write_text(original)
    if out.returncode == 0:
        return None
    failed = [
        line[len("FAILED ") :].split(" - ")[0]
        for line in out.stdout.splitlines()
        if line.startswith("FAILED")
    ]
    return failed[0] if failed else f"pytest exit status {out.returncode}"


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), "HEAD"], cwd=REPO, check=True)
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        env.setdefault("PENRUN_DATA_DIR", str(REPO.parent / "shared" / "data"))
        try:
            missed = 0
            for bug in BUGS:
                start = time.monotonic()
                failure = first_failure(bug, tree, env)
                missed += failure is None
                verdict = f"caught by {failure}" if failure else "MISSED"
                print(f"{bug.name}: {verdict} ({time.monotonic() - start:.0f} s)", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)
    print(f"{len(BUGS) - missed} of {len(BUGS)} caught")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
