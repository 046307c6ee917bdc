"""A run's base model as its source ships it, for export: the weights, where they load from, and the
tokenizer / processor files that go beside a saved copy.

Export (``app/export.py``) merges a method's update into :attr:`SourceModel.model` and saves it with
``save_pretrained``, or writes peft adapters whose ``base_model_name_or_path`` is
:attr:`SourceModel.source`. A model the project builds itself (the small CLIP, a random preset,
LLaVA-mini) has no source to point at (``None``): export then writes it as a transformers directory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .word_tokenizer import WordTokenizer

# tokenizer / processor files of a transformers model directory (weights and config.json excluded)
PREPROCESSING_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "preprocessor_config.json",
    "processor_config.json", "chat_template.json", "chat_template.jinja",
)


@dataclass
class SourceModel:
    """A base model exactly as its source ships it (no pixel-normalisation folding), in eval mode."""

    model: nn.Module
    source: str | None  # a local directory or hub id that from_pretrained loads it from; None: built by the project
    write_preprocessing: Callable[[Path], None]  # writes the tokenizer / processor files into a model directory


def source_name(path: str) -> str:
    """How peft should name a base model given as ``path``: a local directory as an absolute path, else
    the hub id as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.is_dir() else path


def copy_preprocessing(directory: Path) -> Callable[[Path], None]:
    """A writer that copies the tokenizer / processor files of the model directory ``directory``."""

    def write(out: Path) -> None:
        for name in PREPROCESSING_FILES:
            if (directory / name).is_file():
                shutil.copyfile(directory / name, out / name)

    return write


def image_processor_config(image_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                           std: Sequence[float] = (0.5, 0.5, 0.5)) -> dict:
    """transformers' ``CLIPImageProcessor`` settings that give the pixels the project feeds:
    RGB in [0, 1] (``x / 255``), resized to ``image_size`` square, then ``(x - mean) / std``."""
    size = {"height": image_size, "width": image_size}
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": size, "resample": 3,
            "do_center_crop": False, "crop_size": size, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": True}


def write_image_processor(out: Path, image_size: int) -> None:
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor_config(image_size), indent=2))


def word_tokenizer_preprocessing(tokenizer: WordTokenizer, image_size: int) -> Callable[[Path], None]:
    """A writer for the project's CLIPs: the word tokenizer as a transformers tokenizer + the image processor."""

    def write(out: Path) -> None:
        tokenizer.to_transformers().save_pretrained(out)
        write_image_processor(out, image_size)

    return write
