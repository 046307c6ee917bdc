"""What a benchmark is: a typed config section and a builder that returns the task stream.

A benchmark module defines its config (a :class:`BenchmarkConfig` subclass whose ``name`` default is
the benchmark's name), a ``build(config, run) -> Stream`` function and, optionally, a ``check``
that fails before the run directory is touched (a missing model or data root); it exports them as
``BENCHMARK = Benchmark(config class, build, check)``, and one line of ``benchmarks/__init__.py``
registers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from torch import nn

from ..contract import TaskKind
from ..models.clip import ModelConfig
from ..models.small_clip import PretrainConfig


@dataclass
class BenchmarkConfig:
    """The ``benchmark:`` section of a run config; each benchmark's subclass adds its own keys and sets
    ``name``'s default to the benchmark's name."""

    name: str = ""  # which benchmark (the registry key; see benchmarks/__init__.py)


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


@dataclass(frozen=True)
class Benchmark:
    """A registry entry: the benchmark's config class, builder and fail-fast check."""

    config: type[BenchmarkConfig]
    build: Callable[[Any, RunSettings], Stream]
    check: Callable[[Any, RunSettings], None] = _no_check  # run before the run directory is touched

    @property
    def name(self) -> str:
        """The benchmark's name: its config's ``name`` default."""
        return next(f.default for f in fields(self.config) if f.name == "name")  # type: ignore[return-value]
