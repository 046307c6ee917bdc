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
from pathlib import Path
from typing import Any

from ..continual.config import ConfigError
from ..continual.instruct_data import InstructTask, load_instruct_task
from ..continual.instruct_kind import InstructionTuning

CVIT_ORDER = ("ScienceQA", "TextVQA", "Flickr30k", "ImageNet", "GQA", "VQAv2")
CVIT_SCORING = {  # task -> (scorer, instructed answer format)
    "ScienceQA": ("option", "letter"),
    "TextVQA": ("vqa", "short"),
    "Flickr30k": ("cider", "sentence"),
    "ImageNet": ("answer_match", "short"),
    "GQA": ("exact", "short"),
    "VQAv2": ("vqa", "short"),
}
# LLaVA-1.5's training conversation format ("vicuna_v1"), used when the tokenizer has no chat template
# of its own (llava-hf's processor template expects list-of-parts content, not plain strings)
VICUNA_V1_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
    "{% for m in messages %}{% if m['role'] == 'user' %} USER: {{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %} ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
DOWNLOAD_HINT = (
    "download it on a machine with network access, e.g. `huggingface-cli download llava-hf/llava-1.5-7b-hf "
    "--local-dir /data/models/llava-1.5-7b-hf`, copy it here and set benchmark.model_path to that folder "
    "(or to the repo id once it is in the Hugging Face cache)"
)
DATA_HINT = (
    "fetch the CVIT benchmark's Instructions_Single files (SMoLoRA release, github.com/Minato-Zackie/SMoLoRA) "
    "into benchmark.instruction_root and the datasets' images into benchmark.image_root"
)


def check_llava_path(model_path: str | None) -> None:
    """Fail fast (no weights read) when the LLaVA checkpoint is not on this machine."""
    from transformers import AutoConfig

    if not model_path or model_path.startswith("/path/to"):
        raise ConfigError(f"benchmark.model_path is not set ({model_path!r}): the LLaVA-1.5 checkpoint is missing; "
                          + DOWNLOAD_HINT)
    try:
        AutoConfig.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"benchmark.model_path: no LLaVA checkpoint at {model_path!r} (looked in that folder and "
                          f"the Hugging Face cache, offline); {DOWNLOAD_HINT}") from err


def load_llava(model_path: str | None) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, processor) from a local folder or the HF cache; never downloads.

    The frozen weights load in bf16 (14 GB for the 7B model instead of 28 GB in fp32; docs/scale.md);
    adapters created on them are fp32 (``train.precision=bf16`` runs the forward in autocast)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    check_llava_path(model_path)
    model = LlavaForConditionalGeneration.from_pretrained(model_path, local_files_only=True, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
    return model.eval(), processor


def kind_for(model: Any, processor: Any, **kwargs: Any) -> InstructionTuning:
    """Instruction kind with the processor's normalisation; images are resized to the tower's square
    input (LLaVA-1.5 pads them to a square first). Conversation format: the tokenizer's own chat
    template, else LLaVA-1.5's vicuna_v1."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image = getattr(processor, "image_processor", None)
    extra: dict[str, Any] = {}
    if image is not None:
        extra = {"image_mean": tuple(image.image_mean), "image_std": tuple(image.image_std)}
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else VICUNA_V1_TEMPLATE
    return InstructionTuning.for_model(model, tokenizer, chat_template=template, **extra, **kwargs)


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


def build_cvit_run(config: Any) -> tuple[Any, InstructionTuning, list[InstructTask]]:
    """Runner entry (BENCHMARK_BUILDERS["cvit"]): model path and data files checked, then weights loaded."""
    bench = config.benchmark
    check_llava_path(bench.model_path)  # before reading the data: a missing model is the likelier mistake
    tasks = build_cvit_tasks(bench.instruction_root, bench.image_root, bench.domains, bench.max_train_per_task,
                             bench.max_test_per_task, seed=config.seed)
    model, processor = load_llava(bench.model_path)
    kind = kind_for(model, processor, device=config.train.device, max_new_tokens=bench.max_new_tokens,
                    evaluate_future=bench.evaluate_future)
    return model, kind, tasks
