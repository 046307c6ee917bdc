"""Task streams: each benchmark is one module (its config section, its builder); one line below
registers it.

    mtil-mini   CLIP classification on bundled image domains (mtil_mini.py)
    mtil        MTIL / X-TAIL on the 11 real datasets under a root, streamed from disk (mtil.py)
    folders     the user's own image-folder trees or manifests, streamed from disk (folders.py)
    cvit-mini   LLaVA-mini instruction tuning on bundled data (cvit_mini.py)
    cvit        LLaVA-1.5 on the CVIT instruction files, local files only (cvit.py)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from ..config import ConfigError, from_dict
from ..errors import ConfigDeprecationWarning
from . import cvit, cvit_mini, folders, mtil, mtil_mini
from .base import Benchmark, BenchmarkConfig, RunSettings, Stream

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (mtil_mini.BENCHMARK, mtil.BENCHMARK, folders.BENCHMARK,
                                                           cvit_mini.BENCHMARK, cvit.BENCHMARK)}
DEFAULT = "mtil-mini"  # the benchmark of a section without a name

# Keys of the single benchmark section of continual-lora <= 0.1.0, which every benchmark accepted
# (and ignored where they did not apply). Such a key in another benchmark's section is dropped
# with a deprecation warning; any other unknown key is an error.
FLAT_KEYS = frozenset({
    "name", "order", "shots", "image_size", "max_train_per_task", "max_test_per_task", "domains", "xtail",
    "train_templates", "llava", "model_path", "instruction_root", "image_root", "max_new_tokens", "evaluate_future",
})


def parse_benchmark(data: Any, path: str = "benchmark") -> BenchmarkConfig:
    """The typed config of the benchmark ``data["name"]`` (default mtil-mini) from its section."""
    if isinstance(data, BenchmarkConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"config key {path}: expected a mapping of benchmark settings, got {data!r}")
    name = data.get("name", DEFAULT)
    if not isinstance(name, str) or name not in BENCHMARKS:
        raise ConfigError(f"{path}.name: unknown benchmark {name!r} (available: {sorted(BENCHMARKS)})")
    cls = BENCHMARKS[name].config
    own = {f.name for f in dataclasses.fields(cls)}
    stale = sorted(k for k in data if k not in own and k in FLAT_KEYS)
    if stale:
        warnings.warn(f"{path}: {', '.join(stale)}: not settings of {name}, ignored; remove them "
                      f"(the settings of {name}: {sorted(own)})", ConfigDeprecationWarning, stacklevel=3)
    return from_dict(cls, {k: v for k, v in data.items() if k not in stale}, path)


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkConfig", "ConfigDeprecationWarning", "FLAT_KEYS", "RunSettings",
           "Stream", "parse_benchmark"]
