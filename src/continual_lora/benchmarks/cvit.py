"""CVIT at real scale: LLaVA-1.5 on the SMoLoRA / LiLoRA instruction stream (needs local files).

Nothing is downloaded. The model is a transformers-format LLaVA (e.g. ``llava-hf/llava-1.5-7b-hf``)
in a local folder or already in the Hugging Face cache; the instructions are the CVIT benchmark's
single-type files in LLaVA format, laid out as::

    <instruction_root>/<Task>/train.json
    <instruction_root>/<Task>/test.json   (or val.json, as the release names TextVQA / Flickr30k)

with image paths relative to ``image_root``. Missing pieces fail before any training, with what to
fetch and where to put it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..kinds.instruct_data import InstructTask, load_instruct_task
from ..models.llava import check_llava_path, kind_for, llava_source_model, load_llava
from ..models.source import SourceModel
from .base import Benchmark, BenchmarkConfig, RunSettings, Stream

CVIT_ORDER = ("ScienceQA", "TextVQA", "Flickr30k", "ImageNet", "GQA", "VQAv2")
CVIT_SCORING = {  # task -> (scorer, instructed answer format)
    "ScienceQA": ("option", "letter"),
    "TextVQA": ("vqa", "short"),
    "Flickr30k": ("cider", "sentence"),
    "ImageNet": ("answer_match", "short"),
    "GQA": ("exact", "short"),
    "VQAv2": ("vqa", "short"),
}
DATA_HINT = (
    "fetch the CVIT benchmark's Instructions_Single files (SMoLoRA release, github.com/Minato-Zackie/SMoLoRA) "
    "into benchmark.instruction_root and the datasets' images into benchmark.image_root"
)


def build_cvit_tasks(instruction_root: str | None, image_root: str | None, tasks: Sequence[str] | None = None,
                     max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> list[InstructTask]:
    """The CVIT stream in the paper's order (``tasks`` keeps a subset); every file is checked first."""
    if not instruction_root or not Path(instruction_root).is_dir():
        raise ConfigError(f"benchmark.instruction_root {instruction_root!r} is not a folder; {DATA_HINT}")
    if not image_root or not Path(image_root).is_dir():
        raise ConfigError(f"benchmark.image_root {image_root!r} is not a folder; {DATA_HINT}")
    unknown = sorted(set(tasks or ()) - set(CVIT_ORDER))
    if unknown:
        raise ConfigError(f"benchmark.domains: unknown CVIT tasks {unknown}; known: {list(CVIT_ORDER)}")
    out = []
    for name in (n for n in CVIT_ORDER if tasks is None or n in tasks):
        folder = Path(instruction_root) / name
        test = next((folder / f for f in ("test.json", "val.json", "test.jsonl") if (folder / f).is_file()), None)
        if not (folder / "train.json").is_file() or test is None:
            raise ConfigError(f"CVIT task {name!r}: need {folder}/train.json and {folder}/test.json (or val.json); "
                              + DATA_HINT)
        scorer, fmt = CVIT_SCORING[name]
        out.append(load_instruct_task(name, folder / "train.json", test, image_root, scorer, fmt,
                                      max_train=max_train, max_test=max_test, seed=seed))
    return out


@dataclass
class CvitConfig(BenchmarkConfig):
    """Where the LLaVA checkpoint and the CVIT instruction files are (local files only)."""

    name: str = "cvit"
    model_path: str | None = None  # LLaVA checkpoint folder or HF id already cached (never downloaded)
    instruction_root: str | None = None  # <root>/<Task>/train.json + test.json (or val.json), LLaVA format
    image_root: str | None = None  # folder the instruction files' image paths are relative to
    domains: list[str] | None = None  # keep only these CVIT tasks (in the paper's order)
    max_train_per_task: int | None = 2000  # seeded cap on each task's training samples
    max_test_per_task: int | None = 300  # seeded cap on each task's test samples
    max_new_tokens: int | None = None  # greedy tokens per answer (None: by answer format)
    evaluate_future: bool = True  # false = after task k score tasks 0..k only (CVIT's triangle)


def check(bench: CvitConfig, run: RunSettings) -> None:
    check_llava_path(bench.model_path)  # before reading the data: a missing model is the likelier mistake


def build(bench: CvitConfig, run: RunSettings) -> Stream:
    """Model path and data files checked, then the weights loaded."""
    check(bench, run)
    tasks = build_cvit_tasks(bench.instruction_root, bench.image_root, bench.domains, bench.max_train_per_task,
                             bench.max_test_per_task, seed=run.seed)
    model, processor = load_llava(bench.model_path)
    kind = kind_for(model, processor, device=run.device, max_new_tokens=bench.max_new_tokens,
                    evaluate_future=bench.evaluate_future)
    return Stream(model, kind, tasks)


def source(bench: CvitConfig, run: RunSettings) -> SourceModel:
    return llava_source_model(bench.model_path)


BENCHMARK = Benchmark(CvitConfig, build, check, source)
