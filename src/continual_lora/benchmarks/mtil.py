"""MTIL and X-TAIL on the 11 real datasets, read from their torchvision layouts under ``root``.

``benchmark: {name: mtil, root: DIR, order: I | II, shots: 5 | null}`` runs the MTIL stream
(data/mtil.py) on the CLIP of the ``model:`` section (e.g. ``model: {source: hf, path: ...}``: CLIP
ViT-B/16 from a local directory), images read from disk and preprocessed at the model's resolution
in ``train.num_workers`` DataLoader workers. ``xtail: true`` also scores every test image over the
union of all datasets' class names (X-TAIL); ``datasets`` keeps a subset, e.g. RAIL's 10 datasets
without cifar100 (configs/xtail/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError
from ..data.mtil import DATASETS, ORDERS, mtil_tasks, read_dataset
from ..kinds.clip import ClipClassification
from ..kinds.images import FileImageTask
from ..models.clip import check_model, load_clip, preprocess_for
from .base import Benchmark, BenchmarkConfig, RunSettings, Stream, clip_source


@dataclass
class MtilConfig(BenchmarkConfig):
    """Where the 11 datasets are and how the stream is cut."""

    name: str = "mtil"
    root: str | None = None  # folder holding the datasets in torchvision's layouts (docs/benchmarks.md)
    order: Literal["I", "II"] = "I"  # task order (shared/docs/protocols.md)
    shots: int | None = 5  # training images per class; null = full-shot
    datasets: list[str] | None = None  # keep only these datasets (in the order's sequence); null = all 11
    xtail: bool = False  # also evaluate X-TAIL: every test image over the union of all class names
    max_test_per_task: int | None = None  # class-balanced fixed-seed cap on each test set (null: the whole test split)
    split_dir: str | None = None  # split manifests: read when present, else written (null: under the cache)
    train_templates: Literal["first", "all"] = "first"  # training captions: the first template (releases) or all

    def __post_init__(self) -> None:
        self.check_positive_or_null("shots", "max_test_per_task")
        self.check_subset("datasets", DATASETS)

    def stream(self) -> list[str]:
        return [d for d in ORDERS[self.order] if self.datasets is None or d in self.datasets]


def check(bench: MtilConfig, run: RunSettings) -> None:
    """The model, the root and every dataset's files (listing and split, no image decoded) before anything runs."""
    if not bench.root:
        raise ConfigError("benchmark.root is not set: point it at the folder holding the MTIL datasets "
                          "(`continual-lora data check mtil --root DIR` checks one)")
    check_model(run.model)
    for name in bench.stream():
        read_dataset(name, bench.root, bench.split_dir)  # writes the split manifest on the first read


def build(bench: MtilConfig, run: RunSettings) -> Stream:
    check(bench, run)
    tasks = mtil_tasks(str(bench.root), bench.stream(), bench.shots, run.seed, bench.max_test_per_task,
                       bench.split_dir)
    return disk_clip_stream(tasks, run, bench.train_templates, bench.xtail)


def disk_clip_stream(tasks: list[FileImageTask], run: RunSettings, train_templates: str, xtail: bool) -> Stream:
    """The CLIP classification stream over tasks whose images are read from disk, preprocessed as the
    run's model expects (also the ``folders`` benchmark's)."""
    model, tokenizer = load_clip(run.model, run.pretrain, seed=run.seed, progress=run.progress)
    kind = ClipClassification(tokenizer, tasks, device=run.device, logit_scale=run.logit_scale,
                              train_templates=train_templates, preprocess=preprocess_for(run.model, model),
                              num_workers=run.num_workers)
    return Stream(model, kind, tasks, xtail=xtail)


BENCHMARK = Benchmark(MtilConfig, build, check, clip_source)
