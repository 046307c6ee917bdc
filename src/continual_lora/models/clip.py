"""The CLIP a benchmark starts from (the ``model:`` section of a run config).

Three sources, all offline (nothing is downloaded at run time):

* ``pretrained-tiny``: the project's own small CLIP, pretrained on mtil-mini train splits and
  cached (the ``pretrain:`` section; see :mod:`.small_clip`). The default: runs on a CPU.
* ``hf``: ``transformers.CLIPModel.from_pretrained(path, local_files_only=True)`` with its own
  tokenizer, from a local directory or a hub id already in the local HF cache (e.g. OpenAI's
  CLIP ViT-B/16 after ``huggingface-cli download openai/clip-vit-base-patch16``).
* ``random``: a random-init CLIP of a named size (``clip_config``: ``vit-b-16`` = CLIP ViT-B/16,
  149.6M parameters) with the project's word tokenizer: the release's compute and memory
  shape, for GPU checks; its accuracies mean nothing.

Pixels: the benchmark feeds images normalised as ``(x - 0.5) / 0.5`` (what the small CLIP was
pretrained on). An ``hf`` CLIP expects ``(x - mean) / std`` with its processor's mean and std;
since its patch embedding is a stride = kernel convolution (no padding), the change of input
normalisation is folded exactly into that convolution's weight and bias at load time::

    p = (x - M) / S  ->  (x - m) / s = (S / s) p + (M - m) / s     per colour channel
    W' = W * S / s,   b' = b + sum_{c, i, j} W[:, c, i, j] * (M - m_c) / s_c
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

from ..config import ConfigError
from ..kinds.clip_ops import IMAGE_MEAN, IMAGE_STD
from ..kinds.images import Preprocess
from .small_clip import PretrainConfig, build_tokenizer, load_pretrained
from .source import SourceModel, copy_preprocessing, source_name, word_tokenizer_preprocessing
from .word_tokenizer import WordTokenizer

SOURCES = ("pretrained-tiny", "hf", "random")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # used when a model ships no preprocessor config
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_HF_CLIP = "openai/clip-vit-base-patch16"

# architecture presets for source "random" (transformers CLIPTextConfig / CLIPVisionConfig keys)
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "vit-b-16": {  # OpenAI CLIP ViT-B/16: what the Rank-1 pool / MoE-Adapters / ZSCL releases fine-tune
        "text": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                     max_position_embeddings=77, vocab_size=49408),
        "vision": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16),
        "projection_dim": 512,
    },
    "vit-l-14": {  # OpenAI CLIP ViT-L/14
        "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     max_position_embeddings=77, vocab_size=49408),
        "vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       image_size=224, patch_size=14),
        "projection_dim": 768,
    },
    "tiny": {  # seconds on a CPU; for tests
        "text": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=24, vocab_size=256),
        "vision": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8),
        "projection_dim": 16,
    },
}


@dataclass
class ModelConfig:
    """Which CLIP the benchmark adapts (see the module docstring)."""

    source: Literal["pretrained-tiny", "hf", "random"] = "pretrained-tiny"  # "pretrained-tiny" (the pretrain: section), "hf" (local files) or "random"
    path: str | None = None  # hf: a local model directory, or a hub id already in the local HF cache
    clip_config: Literal["vit-b-16", "vit-l-14", "tiny"] = "vit-b-16"  # random: architecture preset ("vit-b-16", "vit-l-14", "tiny")

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"model.source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "hf" and not self.path:
            raise ValueError(f"model.path is required with source 'hf' (a local directory or a cached hub id, "
                             f"e.g. {DEFAULT_HF_CLIP})")
        if self.clip_config not in CLIP_PRESETS:
            raise ValueError(f"model.clip_config must be one of {sorted(CLIP_PRESETS)}, got {self.clip_config!r}")


class MissingModelError(ConfigError):
    """A model named by ``model.path`` is not on this machine (and is never downloaded)."""


# --- finding local files -------------------------------------------------------------------------
def _local_file(path: str, filename: str) -> Path | None:
    """``filename`` of model ``path``: inside a local directory, or in the HF cache for a hub id."""
    directory = Path(path).expanduser()
    if directory.is_dir():
        return directory / filename if (directory / filename).is_file() else None
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(path, filename)
    return Path(found) if isinstance(found, str) else None


def check_model(config: ModelConfig, image_size: int | None = None) -> None:
    """Fail before any training when the model is missing or (``image_size`` given) does not take
    images of the benchmark's size."""
    if config.source == "hf":
        path = str(config.path)
        if _local_file(path, "config.json") is None or not any(_local_file(path, f) for f in WEIGHT_FILES):
            raise MissingModelError(_missing_message(path))
        vision = json.loads(_local_file(path, "config.json").read_text()).get("vision_config", {})  # type: ignore[union-attr]
        expected = vision.get("image_size", 224)
    elif config.source == "random":
        expected = CLIP_PRESETS[config.clip_config]["vision"]["image_size"]
    else:
        return
    if image_size is not None and image_size != expected:
        raise ConfigError(f"benchmark.image_size is {image_size} but the model takes {expected} px images: "
                         f"set benchmark.image_size={expected}")


def _missing_message(path: str) -> str:
    local = Path(path).expanduser()
    is_hub_id = not local.exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))
    get = (f"huggingface-cli download {path}" if is_hub_id
           else f"huggingface-cli download {DEFAULT_HF_CLIP} --local-dir {path}")
    return (f"model.path {path!r}: no CLIP model found (need config.json and one of {', '.join(WEIGHT_FILES)}); "
            f"nothing is downloaded at run time. On a machine with internet access run `{get}` "
            f"and bring the files here (a directory, or the HF cache for a hub id), or point model.path at them.")


def preprocess_for(config: ModelConfig, model: CLIPModel) -> Preprocess:
    """CLIP's preprocessing of images read from disk, at the model's resolution, with the resize of its
    ``preprocessor_config.json`` where the model directory has one (``hf`` source)."""
    size = int(model.config.vision_config.image_size)
    processor = _local_file(str(config.path), "preprocessor_config.json") if config.source == "hf" else None
    return Preprocess.from_processor(processor, size)


# --- tokenizers ----------------------------------------------------------------------------------
class HFTextTokenizer:
    """A transformers tokenizer in the CLIP kind's interface: texts -> (input_ids, attention_mask),
    both (B, L) int64, padded or truncated to ``context_length`` tokens."""

    def __init__(self, tokenizer: Any, context_length: int = 77) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: list[str] | tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def word_pool(self, exclude: Iterable[str]) -> list[str]:
        """Random-text material (ZSCL's reference sentences): every vocabulary token that reads as an
        alphabetic string on its own (CLIP's BPE: "dog</w>" -> "dog"), minus special tokens and any
        token that reads as one of the ``exclude`` texts' tokens, in vocabulary order."""
        tok = self.tokenizer
        banned = {w.strip() for text in exclude
                  for w in tok.batch_decode([[i] for i in tok(text, add_special_tokens=False)["input_ids"]])}
        specials = set(tok.all_special_ids)
        ids = sorted(i for i in tok.get_vocab().values() if i not in specials)
        pool: dict[str, None] = {}
        for text in (w.strip() for w in tok.batch_decode([[i] for i in ids])):
            if text.isalpha() and text not in banned:
                pool[text] = None
        return list(pool)


# --- building ------------------------------------------------------------------------------------
@torch.no_grad()
def fold_pixel_normalization(model: CLIPModel, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Make ``model`` (trained on ``(x - mean) / std``) take the benchmark's ``(x - 0.5) / 0.5``."""
    conv = model.vision_model.embeddings.patch_embedding
    if conv.padding not in (0, (0, 0)) or conv.stride != conv.kernel_size:
        raise ValueError("pixel normalisation can only be folded into a stride = kernel, unpadded patch embedding")
    w = conv.weight  # (C_out, 3, P, P)
    m = torch.tensor(mean, dtype=w.dtype, device=w.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=w.dtype, device=w.device).view(1, -1, 1, 1)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=True,
                       device=w.device, dtype=w.dtype)
    folded.weight.copy_(w * (IMAGE_STD / s))
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device)
    folded.bias.copy_(bias + (w * ((IMAGE_MEAN - m) / s)).sum(dim=(1, 2, 3)))
    folded.requires_grad_(conv.weight.requires_grad)
    model.vision_model.embeddings.patch_embedding = folded


def _hf_dir(path: str) -> Path:
    """The local directory of model ``path`` (a directory, or a hub id in the HF cache)."""
    found = _local_file(path, "config.json")
    if found is None:
        raise MissingModelError(_missing_message(path))
    return found.parent


def _load_hf(path: str) -> tuple[CLIPModel, HFTextTokenizer]:
    from transformers import AutoTokenizer

    resolved = str(_hf_dir(path))
    model = CLIPModel.from_pretrained(resolved, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolved, local_files_only=True)
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    processor = _local_file(path, "preprocessor_config.json")
    if processor is not None:
        spec = json.loads(processor.read_text())
        mean, std = tuple(spec.get("image_mean", mean)), tuple(spec.get("image_std", std))
    fold_pixel_normalization(model, mean, std)
    return model, HFTextTokenizer(tokenizer, model.config.text_config.max_position_embeddings)


def random_clip_config(preset: str) -> tuple[CLIPConfig, WordTokenizer]:
    """The ``preset`` architecture, pooling at the EOS of the project's word tokenizer (returned too)."""
    spec = CLIP_PRESETS[preset]
    tokenizer = build_tokenizer(replace(PretrainConfig(), context_length=spec["text"]["max_position_embeddings"]))
    text = dict(spec["text"], vocab_size=max(spec["text"]["vocab_size"], tokenizer.vocab_size),
                **tokenizer.special_ids())
    return CLIPConfig(text_config=text, vision_config=spec["vision"], projection_dim=spec["projection_dim"]), tokenizer


def build_random_clip(preset: str, seed: int = 0) -> tuple[CLIPModel, WordTokenizer]:
    """A random-init CLIP of ``preset`` size and its word tokenizer."""
    config, tokenizer = random_clip_config(preset)
    torch.manual_seed(seed)
    return CLIPModel(config).eval(), tokenizer


def load_clip(config: ModelConfig, pretrain: PretrainConfig, seed: int = 0,
              progress: bool = True) -> tuple[CLIPModel, Any]:
    """(model in eval mode, tokenizer: texts -> (ids, mask)) for ``config``."""
    if config.source == "hf":
        return _load_hf(str(config.path))
    if config.source == "random":
        return build_random_clip(config.clip_config, seed)
    return load_pretrained(pretrain, progress=progress)


def clip_source_model(config: ModelConfig, pretrain: PretrainConfig, seed: int = 0,
                      progress: bool = True) -> SourceModel:
    """The CLIP of ``config`` as its source ships it, for export. ``hf``: the checkpoint's own weights
    (pixel normalisation not folded: it takes its processor's pixels), loaded from its directory or
    hub id, with its tokenizer / processor files. The project's CLIPs (``pretrained-tiny``,
    ``random``) have no source to point at; they come with the word tokenizer as a transformers
    tokenizer and an image processor for the benchmark's pixels ``(x - 0.5) / 0.5``."""
    if config.source == "hf":
        path = str(config.path)
        directory = _hf_dir(path)
        model = CLIPModel.from_pretrained(str(directory), local_files_only=True).eval()
        return SourceModel(model, source_name(path), copy_preprocessing(directory))
    model, tokenizer = load_clip(config, pretrain, seed=seed, progress=progress)
    return SourceModel(model, None, word_tokenizer_preprocessing(tokenizer, model.config.vision_config.image_size))
