"""mtil-mini: a CPU-sized MTIL benchmark built from real images that ship inside pip packages.

One task per bundled image domain (``data/domains.py``: animals, colors, digits, mnist, shapes,
textile, and fashion when Debian's package is installed), each with its own class names and prompt
templates, in order I (alphabetical) or II; 5-shot by default. The model is the CLIP of the run's
``model:`` section (by default the project's small pretrained CLIP) and the kind is CLIP
classification (:class:`~continual_lora.kinds.clip.ClipClassification`, MTIL protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError
from ..data.domains import DOMAINS, domain_task
from ..kinds.clip import ClipClassification, ImageTask
from ..models.clip import check_model, load_clip
from .base import Benchmark, BenchmarkConfig, RunSettings, Stream, clip_source

_ORDER_II = ("mnist", "textile", "animals", "fashion", "colors", "digits", "shapes")
ORDERS: dict[str, tuple[str, ...]] = {"I": DOMAINS, "II": tuple(n for n in _ORDER_II if n in DOMAINS)}


@dataclass
class MtilMiniConfig(BenchmarkConfig):
    """How mtil-mini is cut."""

    name: str = "mtil-mini"
    order: Literal["I", "II"] = "I"  # task order: "I" (alphabetical) or "II"
    shots: int | None = 5  # images per class for training; None = full-shot
    image_size: int = 32  # pixels per side fed to the model
    max_train_per_task: int = 2000  # class-balanced cap on a full-shot training set
    max_test_per_task: int = 300  # class-balanced cap on each test set (CPU-sized evaluation)
    domains: list[str] | None = None  # keep only these domains (in the order's sequence)
    xtail: bool = False  # also evaluate X-TAIL: classify over the union of all class names
    train_templates: Literal["first", "all"] = "first"  # training captions: "first" template (DAC release) or "all"
    validation: bool = False  # score on a validation set carved from each train split (tuning), not on the test split

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"benchmark.order must be one of {sorted(ORDERS)}, got {self.order!r}")
        self.check_positive_or_null("shots")
        if self.image_size < 4:
            raise ValueError(f"benchmark.image_size must be >= 4 pixels, got {self.image_size}")
        for key in ("max_train_per_task", "max_test_per_task"):
            if getattr(self, key) <= 0:
                raise ValueError(f"benchmark.{key} must be > 0, got {getattr(self, key)}")
        self.check_subset("domains", list(DOMAINS))
        if self.train_templates not in ("first", "all"):
            raise ValueError(f"benchmark.train_templates must be 'first' or 'all', got {self.train_templates!r}")


def build_mtil_mini(order: str = "I", shots: int | None = 5, image_size: int = 32, seed: int = 0,
                    max_train_per_task: int | None = 2000, max_test_per_task: int | None = 400,
                    domains: Sequence[str] | None = None, validation: bool = False) -> list[ImageTask]:
    """The mtil-mini task sequence in ``order`` ("I" alphabetical, "II" a fixed permutation).

    Each task is :func:`~continual_lora.data.domains.domain_task` of its domain (``shots`` per class,
    or full-shot capped to ``max_train_per_task``; a fixed-seed test subset of at most
    ``max_test_per_task``), so both orders hold identical tasks. ``domains`` optionally restricts
    the sequence (kept in the order's order). ``validation``: each task's evaluation set is carved
    from its train split, for tuning (see ``domain_task``).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be >= 1 or None, got {shots}")
    names = [n for n in ORDERS[order] if domains is None or n in domains]
    unknown = set(domains or ()) - set(DOMAINS)
    if unknown:
        raise ValueError(f"domains not available: {sorted(unknown)}; available: {DOMAINS}")
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
                                validation=bench.validation)
    except ValueError as err:
        raise ConfigError(f"benchmark: {err}") from err
    model, tokenizer = load_clip(run.model, run.pretrain, seed=run.seed, progress=run.progress)
    kind = ClipClassification(tokenizer, tasks, device=run.device, logit_scale=run.logit_scale,
                              train_templates=bench.train_templates)
    return Stream(model, kind, tasks, xtail=bench.xtail)


BENCHMARK = Benchmark(MtilMiniConfig, build, check, clip_source)
