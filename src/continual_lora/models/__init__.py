"""Base models and where they come from: CLIP from a local / cached transformers checkpoint or a random
preset (``clip.py``), the project's small CLIP and its pretraining (``small_clip.py``, with its word
tokenizer), LLaVA-mini assembled from bundled parts (``llava_mini.py``) and LLaVA-1.5 from local files
(``llava.py``); ``source.py``: a base model as its source ships it, with its tokenizer / processor
files, for export."""

from .clip import (
    CLIP_PRESETS,
    HFTextTokenizer,
    MissingModelError,
    ModelConfig,
    check_model,
    clip_source_model,
    load_clip,
)
from .small_clip import MixPart, PretrainConfig, load_pretrained, pretrain
from .source import SourceModel
from .word_tokenizer import WordTokenizer

__all__ = ["CLIP_PRESETS", "HFTextTokenizer", "MissingModelError", "MixPart", "ModelConfig", "PretrainConfig",
           "SourceModel", "WordTokenizer", "check_model", "clip_source_model", "load_clip", "load_pretrained",
           "pretrain"]
