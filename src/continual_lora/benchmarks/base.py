"""What a benchmark is: a typed config section and a builder that returns the task stream.

A benchmark module defines its config (a :class:`BenchmarkConfig` subclass whose ``name`` default is
the benchmark's name), a ``build(config, run) -> Stream`` function and, optionally, a ``check``
that fails before the run directory is touched (a missing model or data root) and a
``source(config, run) -> SourceModel`` that gives the base model as its source ships it (what
``continual-lora export`` merges into); it exports them as
``BENCHMARK = Benchmark(config class, build, check, source)``, and one line of
``benchmarks/__init__.py`` registers it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from torch import nn

from ..adapters import ExportError
from ..contract import TaskKind
from ..models.clip import ModelConfig, clip_source_model
from ..models.small_clip import PretrainConfig
from ..models.source import SourceModel


@dataclass
class BenchmarkConfig:
    """The ``benchmark:`` section of a run config; each benchmark's subclass adds its own keys and sets
    ``name``'s default to the benchmark's name."""

    name: str = ""  # which benchmark (the registry key; see benchmarks/__init__.py)

    def small_clip_mix(self) -> str:
        """The named pretraining mix (``small_clip.MIXES``) of the small CLIP this benchmark starts from
        when the run's ``pretrain.mix`` is null."""
        return "v1"

    def check_positive_or_null(self, *keys: str) -> None:
        """For ``__post_init__``: each of ``keys`` is > 0 or null."""
        for key in keys:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"benchmark.{key} must be > 0 or null, got {value}")

    def check_subset(self, key: str, known: Sequence[str]) -> None:
        """For ``__post_init__``: ``key`` lists some of ``known``, or is null (all of them)."""
        chosen = getattr(self, key)
        if chosen is not None and (not chosen or set(chosen) - set(known)):
            raise ValueError(f"benchmark.{key} must list some of {list(known)} (or be null for all), got {chosen}")


@dataclass(frozen=True)
class RunSettings:
    """What a builder reads from the run config besides its own section."""

    seed: int = 0  # data draws, model initialisation
    device: str = "cpu"  # where the kind puts its batches
    progress: bool = True  # progress bars while caches are filled (pretraining, alignment)
    num_workers: int = 0  # DataLoader workers for images read from disk (train.num_workers)
    model: ModelConfig = field(default_factory=ModelConfig)  # the CLIP that image benchmarks adapt
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # the small CLIP (also LLaVA-mini's vision tower)
    logit_scale: float = 100.0  # CLIP kinds: logits = scale * cosine


class Stream(NamedTuple):
    """A benchmark, built: the base model, its task kind and the tasks in training order."""

    model: nn.Module
    kind: TaskKind
    tasks: list[Any]
    xtail: bool = False  # also evaluate X-TAIL (classification over every task's labels)


def _no_check(config: Any, run: RunSettings) -> None:
    pass


def small_clip_config(config: BenchmarkConfig, run: RunSettings) -> PretrainConfig:
    """The run's ``pretrain:`` section with ``mix: null`` resolved to the benchmark's mix (``RunConfig``
    does this already; builders called from Python with bare ``RunSettings`` need it here)."""
    return run.pretrain.with_mix(config.small_clip_mix())


def clip_source(config: Any, run: RunSettings) -> SourceModel:
    """The source of a CLIP benchmark's base model: the run's ``model:`` section (every image benchmark)."""
    return clip_source_model(run.model, small_clip_config(config, run), seed=run.seed, progress=run.progress)


def _no_source(config: Any, run: RunSettings) -> SourceModel:
    raise ExportError(f"benchmark {config.name!r} does not say where its base model comes from "
                      "(its Benchmark has no source), so its runs cannot be exported")


@dataclass(frozen=True)
class Benchmark:
    """A registry entry: the benchmark's config class, builder, fail-fast check and base-model source."""

    config: type[BenchmarkConfig]
    build: Callable[[Any, RunSettings], Stream]
    check: Callable[[Any, RunSettings], None] = _no_check  # run before the run directory is touched
    source: Callable[[Any, RunSettings], SourceModel] = _no_source  # the base model as shipped (export)

    @property
    def name(self) -> str:
        """The benchmark's name: its config's ``name`` default."""
        return next(f.default for f in fields(self.config) if f.name == "name")  # type: ignore[return-value]
