"""mtil-mini: a CPU-sized MTIL benchmark built from real images that ship inside pip packages.

One task per bundled image domain (``data/domains.py``), each with its own class names and prompt
templates, in order I (alphabetical) or II. Two versions (``benchmark.version``):

* **2** (default): animals, colors, digits, fashion, mnist, shapes_crop, 32-shot, with the small CLIP
  pretrained on the ``v2`` mix (half the classes of every task but digits; ``models/small_clip.py``). Designed so
  fine-tuning helps every task, no task starts above 75 % and sequential fine-tuning forgets
  (docs/benchmarks.md gives the criteria and docs/results.md the numbers). fashion needs Debian's
  ``dataset-fashion-mnist`` (``make`` installs it where it can); without it the stream has five tasks
  and a warning says so.
* **1** (the first version, for old tables): animals, colors, digits, mnist, shapes, textile with
  the ``v1`` mix; old tables used ``shots: 5`` (``benchmark.version=1 benchmark.shots=5``).

The model is the CLIP of the run's ``model:`` section (by default the project's small pretrained
CLIP) and the kind is CLIP classification (:class:`~continual_lora.kinds.clip.ClipClassification`,
MTIL protocol).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError
from ..data.domains import DOMAINS, domain_prompts, domain_task
from ..kinds.clip import ClipClassification, ImageTask
from ..models.clip import check_model, load_clip
from .base import Benchmark, BenchmarkConfig, RunSettings, Stream, clip_source, small_clip_config

VERSIONS: dict[int, dict[str, tuple[str, ...]]] = {  # version -> order -> domains
    1: {"I": ("animals", "colors", "digits", "mnist", "shapes", "textile"),
        "II": ("mnist", "textile", "animals", "colors", "digits", "shapes")},
    2: {"I": ("animals", "colors", "digits", "fashion", "mnist", "shapes_crop"),
        "II": ("mnist", "shapes_crop", "animals", "fashion", "colors", "digits")},
}


def stream_domains(version: int, order: str) -> tuple[str, ...]:
    """The domains of version ``version`` in ``order`` that this machine has (fashion needs Debian's package)."""
    return tuple(n for n in VERSIONS[version][order] if n in DOMAINS)


@dataclass
class MtilMiniConfig(BenchmarkConfig):
    """How mtil-mini is cut."""

    name: str = "mtil-mini"
    version: Literal[1, 2] = 2  # 2: the current tasks and small-CLIP mix; 1: the first version (old tables)
    order: Literal["I", "II"] = "I"  # task order: "I" (alphabetical) or "II"
    shots: int | None = 32  # images per class for training; None = full-shot (v1 tables used 5)
    image_size: int = 32  # pixels per side fed to the model
    max_train_per_task: int = 2000  # class-balanced cap on a full-shot training set
    max_test_per_task: int = 300  # class-balanced cap on each test set (CPU-sized evaluation)
    domains: list[str] | None = None  # keep only these domains (in the order's sequence)
    xtail: bool = False  # also evaluate X-TAIL: classify over the union of all class names
    train_templates: Literal["first", "all"] = "first"  # training captions: "first" template (DAC release) or "all"
    validation: bool = False  # score on a validation set carved from each train split (tuning), not on the test split

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"benchmark.version must be one of {sorted(VERSIONS)}, got {self.version!r}")
        if self.order not in VERSIONS[self.version]:
            raise ValueError(f"benchmark.order must be one of {sorted(VERSIONS[self.version])}, got {self.order!r}")
        self.check_positive_or_null("shots")
        if self.image_size < 4:
            raise ValueError(f"benchmark.image_size must be >= 4 pixels, got {self.image_size}")
        for key in ("max_train_per_task", "max_test_per_task"):
            if getattr(self, key) <= 0:
                raise ValueError(f"benchmark.{key} must be > 0, got {getattr(self, key)}")
        self.check_subset("domains", list(stream_domains(self.version, "I")))
        if self.train_templates not in ("first", "all"):
            raise ValueError(f"benchmark.train_templates must be 'first' or 'all', got {self.train_templates!r}")

    def small_clip_mix(self) -> str:
        return f"v{self.version}"


def build_mtil_mini(order: str = "I", shots: int | None = 32, image_size: int = 32, seed: int = 0,
                    max_train_per_task: int | None = 2000, max_test_per_task: int | None = 400,
                    domains: Sequence[str] | None = None, validation: bool = False,
                    version: int = 2) -> list[ImageTask]:
    """The mtil-mini task sequence of ``version`` in ``order`` ("I" alphabetical, "II" a fixed permutation).

    Each task is :func:`~continual_lora.data.domains.domain_task` of its domain (``shots`` per class,
    or full-shot capped to ``max_train_per_task``; a fixed-seed test subset of at most
    ``max_test_per_task``), so both orders hold identical tasks. ``domains`` optionally restricts
    the sequence (kept in the order's order). ``validation``: each task's evaluation set is carved
    from its train split, for tuning (see ``domain_task``).
    """
    if version not in VERSIONS or order not in VERSIONS[version]:
        raise ValueError(f"version must be one of {sorted(VERSIONS)} and order one of {sorted(VERSIONS[2])}, "
                         f"got {version!r} / {order!r}")
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be >= 1 or None, got {shots}")
    available = stream_domains(version, order)
    unknown = set(domains or ()) - set(available)
    if unknown:
        raise ValueError(f"domains not available: {sorted(unknown)}; available: {available}")
    missing = [n for n in VERSIONS[version][order] if n not in available and (domains is None or n in domains)]
    if missing:
        warnings.warn(f"mtil-mini v{version}: {missing} not installed on this machine, so the stream has "
                      f"{len(available)} tasks instead of {len(VERSIONS[version][order])} (Fashion-MNIST: "
                      "`apt-get install dataset-fashion-mnist`, which `make` runs where it can)", stacklevel=2)
    names = [n for n in available if domains is None or n in domains]
    return [domain_task(name, image_size, shots, seed, max_train_per_task, max_test_per_task, validation)
            for name in names]


def check(bench: MtilMiniConfig, run: RunSettings) -> None:
    """A missing model, or images of a size the model does not take, fail before anything runs."""
    check_model(run.model, bench.image_size)
    if run.model.source == "pretrained-tiny" and bench.image_size != run.pretrain.image_size:
        raise ConfigError(f"benchmark.image_size is {bench.image_size} but the small CLIP takes "
                          f"pretrain.image_size={run.pretrain.image_size} px images: set both to the same value")


def build(bench: MtilMiniConfig, run: RunSettings) -> Stream:
    try:
        tasks = build_mtil_mini(order=bench.order, shots=bench.shots, image_size=bench.image_size, seed=run.seed,
                                max_train_per_task=bench.max_train_per_task,
                                max_test_per_task=bench.max_test_per_task, domains=bench.domains,
                                validation=bench.validation, version=bench.version)
    except ValueError as err:
        raise ConfigError(f"benchmark: {err}") from err
    model, tokenizer = load_clip(run.model, small_clip_config(bench, run), seed=run.seed, progress=run.progress)
    kind = ClipClassification(tokenizer, tasks, device=run.device, logit_scale=run.logit_scale,
                              train_templates=bench.train_templates)
    return Stream(model, kind, tasks, xtail=bench.xtail)


BENCHMARK = Benchmark(MtilMiniConfig, build, check, clip_source)


@dataclass(frozen=True)
class Criterion:
    """One design criterion of mtil-mini v2, measured."""

    name: str  # what is checked, in words
    value: float  # the measured number
    bound: float  # the limit it is compared with
    ok: bool


def design_criteria(per_task_lora: Sequence[dict], seq_lora: Sequence[dict]) -> list[Criterion]:
    """The v2 design criteria from ``results.json`` dicts (one per seed) of per_task_lora and seq_lora.

    Means over the given seeds: for each task, per-task LoRA's accuracy right after its own training
    is >= its zero-shot accuracy + 10 and >= chance + 15 (chance = 100 / classes); no task is above
    75 % zero-shot, and at least half are above chance + 10; sequential LoRA's BWT is <= -10.
    """
    if not per_task_lora or not seq_lora:
        raise ValueError("design_criteria needs at least one per_task_lora and one seq_lora result")
    tasks = list(per_task_lora[0]["tasks"])
    for r in (*per_task_lora, *seq_lora):
        if list(r["tasks"]) != tasks:
            raise ValueError(f"results of different streams: {r['tasks']} vs {tasks}")

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    zero = [mean([r["zero_shot"][i] for r in per_task_lora]) for i in range(len(tasks))]
    own = [mean([r["matrix"][i][i] for r in per_task_lora]) for i in range(len(tasks))]
    chance = [100.0 / len(domain_prompts(t)[0]) for t in tasks]
    out: list[Criterion] = []
    for t, z, o, c in zip(tasks, zero, own, chance):
        out.append(Criterion(f"{t}: own-task gain over zero-shot", o - z, 10.0, o - z >= 10.0))
        out.append(Criterion(f"{t}: own-task accuracy over chance", o - c, 15.0, o - c >= 15.0))
    out.append(Criterion("highest zero-shot accuracy", max(zero), 75.0, max(zero) <= 75.0))
    above = sum(z >= c + 10.0 for z, c in zip(zero, chance))
    out.append(Criterion("tasks above chance + 10 at zero-shot", float(above), len(tasks) / 2, above >= len(tasks) / 2))
    bwt = mean([r["metrics"]["bwt"] for r in seq_lora])
    out.append(Criterion("seq_lora BWT", bwt, -10.0, bwt <= -10.0))
    return out
