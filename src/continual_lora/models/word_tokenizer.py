"""The small CLIP's tokenizer: deterministic, word-level, over the benchmark's prompt vocabulary."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

WORD_PATTERN = r"[^\W_]+|[^\w\s]|_"  # a token: a run of letters / digits, one punctuation mark, or "_"


class WordTokenizer:
    """Deterministic word-level tokenizer: lower-case, words and single punctuation marks.

    Why not CLIP's BPE: no CLIP BPE vocabulary ships with this project's dependencies, and the
    model it feeds starts from random init and is pretrained here on a closed set of prompts,
    so sub-word merges would buy nothing for words it never saw. Unknown words map to ``<unk>``.

    Layout of a sequence: ``<sot> w1 ... wn <eos> <pad> ...`` padded to ``context_length``.
    Ids: pad 0, unk 1, sot 2, eos 3. transformers' ``CLIPTextTransformer`` pools the hidden
    state at the first position where ``input_ids == config.eos_token_id``, except for the
    legacy value ``eos_token_id == 2``, where it takes ``argmax(input_ids)`` instead. EOS is
    therefore given id 3 (never 2) and ``special_ids()`` must go into the ``CLIPTextConfig``.
    """

    PAD, UNK, SOT, EOS = "<pad>", "<unk>", "<sot>", "<eos>"
    SPECIALS = (PAD, UNK, SOT, EOS)

    def __init__(self, words: Iterable[str], context_length: int = 32) -> None:
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {context_length}")
        extra = sorted({w for w in words if w not in self.SPECIALS})
        self.vocab: list[str] = list(self.SPECIALS) + extra
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @classmethod
    def from_texts(cls, texts: Iterable[str], context_length: int = 32) -> WordTokenizer:
        """Tokenizer whose vocabulary is every token of ``texts``."""
        return cls((tok for t in texts for tok in cls.split(t)), context_length)

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case ``text`` and split it into words and single punctuation marks."""
        return re.findall(WORD_PATTERN, text.lower())

    def word_pool(self, exclude: Iterable[str]) -> list[str]:
        """Vocabulary words minus the specials and every word of the ``exclude`` texts."""
        banned = {w for text in exclude for w in self.split(text)}
        return [w for w in self.vocab[len(self.SPECIALS):] if w not in banned]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def sot_id(self) -> int:
        return 2

    @property
    def eos_id(self) -> int:
        return 3

    def special_ids(self) -> dict[str, int]:
        """Keyword arguments for ``CLIPTextConfig`` so pooling reads the EOS position."""
        return {"pad_token_id": self.pad_id, "bos_token_id": self.sot_id, "eos_token_id": self.eos_id}

    def encode(self, text: str) -> list[int]:
        """``[sot, w1..wn, eos]``, words truncated to fit ``context_length``."""
        ids = [self.index.get(w, self.unk_id) for w in self.split(text)][: self.context_length - 2]
        return [self.sot_id, *ids, self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Words of ``ids`` joined by spaces, special tokens dropped."""
        return " ".join(self.vocab[i] for i in ids if i >= len(self.SPECIALS))

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids (B, L) int64 and attention_mask (B, L) int64, L = context_length."""
        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            enc = self.encode(text)
            ids[row, : len(enc)] = torch.tensor(enc)
            mask[row, : len(enc)] = 1
        return ids, mask

    def to_transformers(self) -> Any:
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (a ``tokenizers`` WordLevel
        model), so an exported model needs no continual-lora import::

            tok(texts, padding="max_length", truncation=True, max_length=context_length)

        gives this tokenizer's ``(input_ids, attention_mask)``: lower-casing, whitespace split, then
        :meth:`split`'s pattern isolates words and punctuation, ``<sot> ... <eos>`` around them.
        """
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(self.vocab)}, unk_token=self.UNK))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Split(Regex(WORD_PATTERN), "isolated")])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{self.SOT} $A {self.EOS}", special_tokens=[(self.SOT, self.sot_id), (self.EOS, self.eos_id)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=self.SOT, eos_token=self.EOS,
                                       pad_token=self.PAD, unk_token=self.UNK, model_max_length=self.context_length)

    def save(self, path: str | Path) -> None:
        payload = {"type": "WordTokenizer", "version": 1, "context_length": self.context_length, "vocab": self.vocab}
        Path(path).write_text(json.dumps(payload, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        payload = json.loads(Path(path).read_text())
        if payload.get("type") != "WordTokenizer" or list(payload["vocab"][:4]) != list(cls.SPECIALS):
            raise ValueError(f"{path} is not a WordTokenizer file")
        tok = cls(payload["vocab"][4:], payload["context_length"])
        if tok.vocab != payload["vocab"]:
            raise ValueError(f"{path}: vocabulary is not in canonical (sorted) order")
        return tok
