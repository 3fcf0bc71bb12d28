"""The package's layers (ARCHITECTURE.md): no Hydra or omegaconf outside penrun.app, no imports
hidden in function bodies, no private names across modules, imports in one direction only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import penrun

PACKAGE = Path(penrun.__file__).resolve().parent


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. penrun.core.vmf
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def module_name(path: Path) -> str:
    parts = ("penrun", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = [
    Module(module_name(p), p, ast.parse(p.read_text(), filename=str(p)))
    for p in sorted(PACKAGE.rglob("*.py"))
]


def absolute(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (resolving relative imports)."""
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def penrun_imports(module: Module) -> list[tuple[int, str]]:
    """(line, module) for every penrun module this one imports, anywhere in it. `from a import b`
    counts as importing a.b when a.b is a module (a subpackage's module), else a."""
    names = {m.name for m in MODULES}
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in names else base))
    return [(line, name) for line, name in found if name == "penrun" or name.startswith("penrun.")]


def layer(name: str) -> str:
    """penrun.core.vmf -> core; penrun.errors -> errors; penrun -> penrun."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "penrun"


# ---------------------------------------------------------------- (a) Hydra only in penrun.app
IMPORT_ALL = """
import importlib, json, pkgutil, sys

WATCHED = ("hydra", "omegaconf", "torch", "matplotlib", "sklearn", "torchvision", "penrun.app")


def loaded():
    return sorted(m for m in WATCHED if m in sys.modules)


import penrun

after_penrun = loaded()
penrun.VonMisesFisher
after_a_name = loaded()
names = sorted(
    info.name
    for info in pkgutil.walk_packages(penrun.__path__, "penrun.")
    if not (info.name == "penrun.app" or info.name.startswith("penrun.app.") or info.name == "penrun.__main__")
)
for name in names:
    importlib.import_module(name)
config_modules = sorted(m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf"))
print(json.dumps({"after_penrun": after_penrun, "after_a_name": after_a_name, "imported": names,
                  "config_modules": config_modules}))
"""


@pytest.fixture(scope="module")
def fresh_imports() -> dict:
    """In a fresh interpreter: what `import penrun` loads, then every library module imported."""
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_library_imports_neither_hydra_nor_omegaconf(fresh_imports: dict) -> None:
    expected = {m.name for m in MODULES if layer(m.name) not in ("app", "__main__") and m.name != "penrun"}
    assert set(fresh_imports["imported"]) == expected  # every library module was imported
    assert fresh_imports["config_modules"] == [], f"the library loaded {fresh_imports['config_modules'][:5]}"


def test_importing_penrun_loads_torch_when_a_name_is_first_used(fresh_imports: dict) -> None:
    assert fresh_imports["after_penrun"] == []
    assert fresh_imports["after_a_name"] == ["torch"]
    assert not hasattr(penrun, "ConfigError")
    with pytest.raises(AttributeError, match="no attribute 'ConfigError'"):
        penrun.ConfigError  # noqa: B018


# The command line composes a config (tab completion, --cfg) with Hydra alone.
COMPOSE_ONLY = """
import contextlib, io, json, os, sys
os.environ["COMP_LINE"] = "penrun task="
sys.argv = ["penrun", *json.loads(sys.argv[1])]
from penrun.app.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main()
    except SystemExit:
        pass
print(json.dumps({"stdout": out.getvalue(), "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["-sc", "query=bash"], "task=train_teacher"), (["--cfg", "job", "trainer.lr=0.01"], "lr: 0.01")],
)
def test_tab_completion_and_printing_a_config_never_import_torch(args: list[str], expected: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", COMPOSE_ONLY, json.dumps(args)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(proc.stdout.splitlines()[-1])
    assert expected in result["stdout"] and result["torch"] is False


# ---------------------------------------------------------------- (b) imports at module level
# Heavy optional dependencies, imported only by the function that needs them, so that importing
# penrun (or a task that never plots) does not pay for them: (module, function, imported module).
# The function is named without its class or enclosing function (Run.writer -> writer).
FUNCTION_IMPORTS_ALLOWED = {
    # matplotlib (~0.5 s and a backend choice) only when a figure is drawn
    ("penrun.core.diagnostics", "plot_cosine_histograms", "matplotlib"),
    ("penrun.core.diagnostics", "plot_cosine_histograms", "matplotlib.pyplot"),
    ("penrun.core.diagnostics", "plot_circle", "matplotlib"),
    ("penrun.core.diagnostics", "plot_circle", "matplotlib.pyplot"),
    ("penrun.app.tasks.report", "plot_curves", "matplotlib"),
    ("penrun.app.tasks.report", "plot_curves", "matplotlib.pyplot"),
    # reads the figures fit just drew back into TensorBoard
    ("penrun.app.tasks.fit", "log_to_tensorboard", "matplotlib.image"),
    # scikit-learn only for the embedded digits dataset
    ("penrun.data.sources", "_digits", "sklearn.datasets"),
    ("penrun.data.sources", "_digits", "sklearn.model_selection"),
    # the optional Optuna sweeper (~1 s) only when a search starts: its log lines go to stdout
    ("penrun.app.sweeps", "quiet_optuna", "optuna"),
    # the optional imagecorruptions (~1 s: OpenCV, scikit-image, numba) only when images are corrupted
    ("penrun.data.corruptions", "corruption_package", "imagecorruptions"),
    # torchvision's dataset classes only when a dataset is not in the npz folder
    ("penrun.data.sources", "load", "torchvision.datasets"),  # in _torchvision_split
    # torchvision (~1.3 s, it pulls in torch._dynamo) only when a picture is made
    ("penrun.core.conditions", "sample_grid", "torchvision.utils"),
    ("penrun.train.files", "save_image_grid", "torchvision.utils"),
    # TensorBoard's writer (slow to import) only when a run logs its first scalar
    ("penrun.train.run_folder", "writer", "torch.utils.tensorboard"),  # the run folder's writer property
    ("penrun.train.run_folder", "log_hparams", "torch.utils.tensorboard.summary"),
    # torchvision's model zoo and the optional timm only for a network of theirs (net@teacher=torchvision|timm)
    ("penrun.models.networks", "_torchvision", "torchvision.models"),
    ("penrun.models.networks", "_timm", "timm"),
    ("penrun.models.networks", "library_weights", "huggingface_hub.constants"),  # timm's cache, offline
    # a job's code (and torch) once a job starts: composing, --help and tab completion stay fast
    ("penrun.app.cli", "_hydra_main", "penrun.app.job"),
}


def function_imports(module: Module) -> list[tuple[str, str, int]]:
    """(qualified function, imported module, line) of every import inside a function body."""
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, scope: tuple[str, ...], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, (*scope, child.name), True)
            elif isinstance(child, ast.ClassDef):
                visit(child, (*scope, child.name), in_function)
            elif isinstance(child, ast.Import | ast.ImportFrom) and in_function:
                targets = (
                    [alias.name for alias in child.names]
                    if isinstance(child, ast.Import)
                    else [absolute(module, child)]
                )
                found.extend((".".join(scope), target, child.lineno) for target in targets)
            else:
                visit(child, scope, in_function)

    visit(module.tree, (), False)
    return found


def test_no_imports_inside_functions_except_heavy_optional_ones() -> None:
    found = {
        (m.name, function.split(".")[-1], target): f"{m.path.relative_to(PACKAGE.parent)}:{line} {function}"
        for m in MODULES
        for function, target, line in function_imports(m)
    }
    hidden = sorted(
        f"{where} imports {target}"
        for (name, function, target), where in found.items()
        if (name, function, target) not in FUNCTION_IMPORTS_ALLOWED
    )
    assert not hidden, (
        "import these at module level (or add a heavy optional one to the list):\n" + "\n".join(hidden)
    )
    # The list holds nothing stale.
    assert found.keys() >= FUNCTION_IMPORTS_ALLOWED, FUNCTION_IMPORTS_ALLOWED - found.keys()


def test_the_function_import_check_sees_nested_and_method_imports() -> None:
    code = "import os\nclass A:\n    def f(self):\n        def g():\n            from json import dumps\n        import re\n"
    module = Module("penrun.example", PACKAGE / "example.py", ast.parse(code))
    assert function_imports(module) == [("A.f.g", "json", 5), ("A.f", "re", 6)]


# ---------------------------------------------------------------- (c) no private names across modules
def private_uses(module: Module) -> list[str]:
    """`from penrun.x import _name`, and `alias._name` on a penrun module bound by an import."""
    names = {m.name for m in MODULES}
    aliases: dict[str, str] = {}  # local name -> penrun module
    uses = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom):
            base = absolute(module, node)
            if not (base == "penrun" or base.startswith("penrun.")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in names:
                    aliases[alias.asname or alias.name] = sub
                elif alias.name.startswith("_") and base != module.name:
                    uses.append(f"line {node.lineno}: from {base} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "penrun":
                    continue
                if alias.asname:  # import penrun.x.y as z: z is penrun.x.y
                    aliases[alias.asname] = alias.name
                else:  # import penrun.x.y binds penrun
                    aliases["penrun"] = "penrun"
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            dotted = ast.unparse(node.value)
            target = aliases.get(dotted.split(".")[0])
            if target is None:
                continue
            full = ".".join([target, *dotted.split(".")[1:]]) if target == "penrun" else target
            if full in names and full != module.name:
                uses.append(f"line {node.lineno}: {dotted}.{node.attr}")
    return uses


def test_no_module_uses_a_private_name_of_another() -> None:
    uses = {m.name: private_uses(m) for m in MODULES}
    assert not {name: found for name, found in uses.items() if found}


def test_the_private_name_check_sees_both_spellings() -> None:
    code = "from penrun.core.vmf import _check_mu\nfrom penrun.train import distributed\ndistributed._comm_device()\n"
    module = Module("penrun.example", PACKAGE / "example.py", ast.parse(code))
    assert private_uses(module) == [
        "line 1: from penrun.core.vmf import _check_mu",
        "line 3: distributed._comm_device",
    ]


# ---------------------------------------------------------------- (d) the layers
# What each layer may import besides itself (ARCHITECTURE.md).
ALLOWED = {
    "errors": set(),
    "core": set(),
    "models": {"core"},
    "data": {"errors"},
    "train": {"core", "models", "data", "errors"},
    "app": {"core", "models", "data", "train", "errors"},
    "penrun": {"core"},  # penrun/__init__.py re-exports the method
    "__main__": {"app"},
}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_imports_follow_the_layers(module: Module) -> None:
    own = layer(module.name)
    assert own in ALLOWED, f"{module.name}: a new layer? add it to ALLOWED and ARCHITECTURE.md"
    wrong = [
        f"line {line}: {name}"
        for line, name in penrun_imports(module)
        if layer(name) != own and layer(name) not in ALLOWED[own]
    ]
    assert not wrong, f"{module.name} ({own}/) may import only {sorted(ALLOWED[own])}: {wrong}"


def test_nothing_outside_app_imports_app() -> None:
    importers = sorted(
        m.name
        for m in MODULES
        if layer(m.name) not in ("app", "__main__") and any(layer(n) == "app" for _, n in penrun_imports(m))
    )
    assert importers == []


def test_the_layer_check_resolves_every_spelling() -> None:
    code = "import penrun.app.cli\nfrom penrun.train import distributed\nfrom . import vmf\nfrom ..data import ImageData\n"
    module = Module("penrun.core.example", PACKAGE / "core" / "example.py", ast.parse(code))
    assert [name for _, name in penrun_imports(module)] == [
        "penrun.app.cli",
        "penrun.train.distributed",
        "penrun.core.vmf",
        "penrun.data",
    ]
