"""LLaVA-1.5 (or any transformers-format LLaVA) from local files: never downloaded.

The model is a transformers ``LlavaForConditionalGeneration`` checkpoint (e.g.
``llava-hf/llava-1.5-7b-hf``) in a local folder or already in the Hugging Face cache. A missing
checkpoint fails before any weight is read, with what to fetch and where to put it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..kinds.instruct import InstructionTuning
from .source import SourceModel, copy_preprocessing, source_name

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


def llava_source_model(model_path: str | None) -> SourceModel:
    """The LLaVA checkpoint as it ships (bf16, as :func:`load_llava` reads it), for export: peft adapters
    point at ``model_path``; a merged copy gets its tokenizer / processor files."""
    from transformers.utils import cached_file

    model, _ = load_llava(model_path)
    directory = Path(cached_file(model_path, "config.json", local_files_only=True)).parent
    return SourceModel(model, source_name(str(model_path)), copy_preprocessing(directory))


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
