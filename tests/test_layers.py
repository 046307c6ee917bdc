"""The package's layers, checked from the source: imports run one way (docs/architecture.md).

Every module of ``continual_lora`` belongs to a component (a subpackage or a top-level module); the
components form layers, lowest first. A module may import its own component and any component of a
lower layer, never a higher or same-layer one, and never the package root (a cycle: the root's
``__init__`` imports the adapter core and the methods). Imports inside functions count too. The
package root (the public facade) imports only the adapter core and the methods at module level; a
higher layer only inside its module-level ``__getattr__`` (PEP 562: imported on first access).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import continual_lora

PACKAGE = Path(continual_lora.__file__).resolve().parent
ROOT = "continual_lora"
LAYERS: list[tuple[str, ...]] = [  # lowest first; keep in step with docs/architecture.md
    ("errors",),  # the errors a user can fix (the CLI prints them in one line)
    ("version", "config", "metrics", "storage"),  # leaf utilities: import nothing of the package but errors
    ("adapters",),  # the adapter core
    ("contract",),  # the method <-> kind <-> trainer contract
    ("methods",),  # continual methods, one file each
    ("kinds",),  # what a task is: CLIP classification, instruction tuning, scorers
    ("runtime",),  # where a step runs: one process, DDP, DeepSpeed ZeRO
    ("continual",),  # the trainer: schedule, checkpoints, the training step
    ("data",),  # bundled image domains
    ("models",),  # base models: CLIP sources, the small CLIP and its pretraining, LLaVA-mini, LLaVA
    ("benchmarks",),  # task streams
    ("app",),  # runner, compare, plots, speed bench
    ("cli",),  # the command line
]
RANK = {component: rank for rank, layer in enumerate(LAYERS) for component in layer}
FACADE = {"version", "adapters", "methods"}  # what the package root may import (its public API)
LAZY = "__getattr__"  # the root's module-level function that may import higher layers on first access


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of the package in ``path``; ``from X import name``
    yields ``X.name`` so that ``from .. import metrics`` names the metrics component."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return [(line, m) for line, m in found if m == ROOT or m.startswith(ROOT + ".")]


def component(module: str) -> str | None:
    """``continual_lora.methods.base`` -> ``methods``; the root itself (or a name in it) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def lazy_lines(path: Path) -> set[int]:
    """Lines of the module-level ``__getattr__`` function of ``path`` (empty if it has none)."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.FunctionDef) and node.name == LAZY:
            return set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return set()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer() -> None:
    loose = [module_name(p) for p in SOURCES if p != PACKAGE / "__init__.py" and component(module_name(p)) is None]
    assert not loose, f"modules outside the layers of tests/test_layers.py (add them to LAYERS and the docs): {loose}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path: Path) -> None:
    own = component(module_name(path))
    lazy = lazy_lines(path) if own is None else set()
    wrong = []
    for line, module in imported_modules(path):
        target = component(module)
        if own is None:  # the package root: its public API; higher layers only inside __getattr__
            if target is None or (target not in FACADE and line not in lazy):
                wrong.append(f"line {line}: the package root imports {module}")
        elif target is None:
            wrong.append(f"line {line}: imports the package root ({module}); import the defining module instead")
        elif target != own and RANK[target] >= RANK[own]:
            wrong.append(f"line {line}: {own} (layer {RANK[own]}) imports {module} (layer {RANK[target]})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_resolves_relative_and_function_level_imports() -> None:
    """The parser behind the check: relative imports two levels up, and imports inside functions."""
    methods = {m for _, m in imported_modules(PACKAGE / "methods" / "base.py")}
    assert {"continual_lora.adapters.add_task", "continual_lora.contract.TaskContext"} <= methods
    cli = {m for _, m in imported_modules(PACKAGE / "cli.py")}
    assert "continual_lora.app.runner.run_method" in cli  # imported inside cmd_run
    assert component("continual_lora.app.runner.run_method") == "app" and component("continual_lora") is None


def test_the_root_imports_the_application_only_lazily() -> None:
    """``continual_lora.export_hf`` comes from the application layer, imported inside ``__getattr__``."""
    root = PACKAGE / "__init__.py"
    lazy = lazy_lines(root)
    late = {m for line, m in imported_modules(root) if line in lazy}
    assert lazy and late == {"continual_lora.app.export"}, late
    assert all(component(m) in FACADE for line, m in imported_modules(root) if line not in lazy)
    from continual_lora.app.export import export_hf, export_peft

    assert continual_lora.export_hf is export_hf and continual_lora.export_peft is export_peft
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        continual_lora.nosuch  # noqa: B018


def test_importing_the_library_does_not_import_the_trainer_or_the_application() -> None:
    code = ("import sys, continual_lora; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('continual_lora.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))  # noqa: S307 - our own printed list
    assert loaded <= {"errors", "version", "storage", "adapters", "contract", "methods"}, loaded
