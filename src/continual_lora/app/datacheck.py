"""``continual-lora data check``: is a data root complete, before any training? A table per dataset,
one error line per problem, and as the last line one JSON object
``{"datasets": {name: {"classes", "train", "test", "ok"}}, "missing": [...]}``."""

from __future__ import annotations

import json
from typing import Any

from ..benchmarks.folders import FoldersConfig
from ..benchmarks.folders import _tasks as folder_tasks
from ..benchmarks.mtil import MtilConfig
from ..config import ConfigError
from ..data.mtil import DATASETS
from ..data.mtil import check as check_mtil
from ..errors import UserError


def report_for(benchmark: Any, root: str | None = None) -> dict[str, Any]:
    """The check of a benchmark config section (mtil: its datasets under ``root`` or its own root;
    folders: each task's files)."""
    if isinstance(benchmark, MtilConfig):
        root = root or benchmark.root
        if not root:
            raise ConfigError("data check mtil needs a root: --root DIR (or benchmark.root in the config)")
        return check_mtil(root, benchmark.stream())
    if isinstance(benchmark, FoldersConfig):
        report: dict[str, Any] = {"datasets": {}, "missing": [], "errors": {}}
        for spec in benchmark.tasks:
            try:
                (task,) = folder_tasks(FoldersConfig(tasks=[spec]), seed=0)
                report["datasets"][spec.name] = {"classes": task.num_classes, "train": len(task.train_labels),
                                                 "test": len(task.test_labels), "ok": True}
            except UserError as err:
                report["datasets"][spec.name] = {"classes": 0, "train": 0, "test": 0, "ok": False}
                report["missing"].append(spec.name)
                report["errors"][spec.name] = str(err)
        return report
    raise ConfigError(f"data check knows the mtil and folders benchmarks, not {benchmark.name!r} (the embedded "
                      "benchmarks ship with the packages)")


def mtil_report(root: str) -> dict[str, Any]:
    """The check of all 11 MTIL datasets under ``root``."""
    return check_mtil(root, DATASETS)


def format_report(report: dict[str, Any]) -> str:
    """A fixed-width table: dataset, classes, train, test, status."""
    lines = [f"{'dataset':<16}{'classes':>8}{'train':>9}{'test':>9}  status", "-" * 52]
    for name, row in report["datasets"].items():
        lines.append(f"{name:<16}{row['classes']:>8}{row['train']:>9}{row['test']:>9}  "
                     f"{'ok' if row['ok'] else 'MISSING'}")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    """The last line: the report as one JSON object (datasets and missing)."""
    return json.dumps({"datasets": report["datasets"], "missing": report["missing"]})
