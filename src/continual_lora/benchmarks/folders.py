"""Users' own image datasets as a continual stream: one image-folder tree or manifest per task.

``benchmark: {name: folders, tasks: [{name: cars, root: /data/cars}, {name: birds, manifest:
/data/birds.csv, class_names: /data/birds_names.tsv, templates: ["a photo of a {}, a bird."]}]}``
(layouts: data/folders.py). Same streaming, CLIP kind, metrics and resume as MTIL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import ConfigError
from ..data.domains import balanced_subset, domain_seed, first_k_per_class
from ..data.folders import DEFAULT_TEMPLATES, folder_task
from ..kinds.images import FileImageTask
from ..models.clip import check_model
from .base import Benchmark, BenchmarkConfig, RunSettings, Stream, clip_source
from .mtil import disk_clip_stream

SPLIT_SEED = 42


@dataclass
class FolderTaskConfig:
    """One task: an image-folder tree (``root``) or a manifest (``manifest``)."""

    name: str  # the task's name (letters, digits, '_' or '-'): the key of its adapters and results
    root: str | None = None  # <root>/train/<class>/<image>, <root>/test/<class>/<image>
    manifest: str | None = None  # CSV (path,label,split) or JSONL with those keys
    class_names: str | None = None  # file of "label<TAB>name" lines (default: the labels, "_" as spaces)
    templates: list[str] | str = field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # prompts with "{}", or a file


@dataclass
class FoldersConfig(BenchmarkConfig):
    """The user's tasks, in training order."""

    name: str = "folders"
    tasks: list[FolderTaskConfig] = field(default_factory=list)  # the stream, in training order
    shots: int | None = None  # training images per class (first k of one seeded shuffled pass); null = all
    max_test_per_task: int | None = None  # class-balanced fixed-seed cap on each test set (null: all)
    xtail: bool = False  # also evaluate over the union of all tasks' class names
    train_templates: Literal["first", "all"] = "first"  # training captions: the first template or all

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("benchmark.tasks: list at least one task ({name, root} or {name, manifest})")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark.tasks: task names must be unique, got {names}")


def _tasks(bench: FoldersConfig, seed: int) -> list[FileImageTask]:
    out = []
    for spec in bench.tasks:
        task = folder_task(spec.name, spec.root, spec.manifest, spec.class_names,
                           spec.templates if isinstance(spec.templates, str) else tuple(spec.templates))
        if bench.shots is not None:
            keep = first_k_per_class(task.train_labels, bench.shots,
                                     _generator(spec.name, seed)).sort().values.tolist()
            task = FileImageTask(task.name, task.class_names, task.templates, task.train_source.subset(keep),
                                 task.train_labels[keep], task.test_source, task.test_labels)
        if bench.max_test_per_task is not None:
            task = task.test_subset(balanced_subset(task.test_labels, bench.max_test_per_task,
                                                    _generator(spec.name, SPLIT_SEED)).tolist())
        out.append(task)
    return out


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(domain_seed(name, seed))


def check(bench: FoldersConfig, run: RunSettings) -> None:
    check_model(run.model)
    _tasks(bench, run.seed)


def build(bench: FoldersConfig, run: RunSettings) -> Stream:
    try:
        tasks = _tasks(bench, run.seed)
    except ValueError as err:
        raise ConfigError(f"benchmark: {err}") from err
    return disk_clip_stream(tasks, run, bench.train_templates, bench.xtail)


BENCHMARK = Benchmark(FoldersConfig, build, check, clip_source)
