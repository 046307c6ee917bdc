"""The CLIP task kind: contrastive training and zero-shot-style evaluation of image tasks.

Plugs :mod:`.clip_task`'s pure functions into the trainer's :class:`~.engine.TaskKind`
protocol. A task is anything with ``name``, ``class_names``, ``templates`` and
``train_images / train_labels / test_images / test_labels`` (e.g. ``ImageTask``).

X-TAIL mode classifies a task's test images over the union of *every* task's class names
(each class embedded with its own domain's templates; identical names count once), with no
domain hint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .clip_task import (
    WordTokenizer,
    captions_for,
    contrastive_loss,
    encode_images,
    encode_texts,
    evaluate_accuracy,
    text_classifier,
)
from .sharding import gather_rows


class ClipClassification:
    protocol = "mtil"

    def __init__(self, tokenizer: WordTokenizer, tasks: Sequence[Any], device: str = "cpu",
                 logit_scale: float = 100.0, train_templates: str = "first", eval_batch_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.device = device
        self.logit_scale = logit_scale
        self.train_templates = train_templates
        self.eval_batch_size = eval_batch_size
        # X-TAIL label space: union of class names; first domain that names a class owns its prompts
        self.union: list[str] = []
        self.union_templates: list[Sequence[str]] = []
        for task in self.tasks:
            for name in task.class_names:
                if name not in self.union:
                    self.union.append(name)
                    self.union_templates.append(task.templates)

    def num_train(self, task: Any) -> int:
        return len(task.train_labels)

    def train_batch(self, task: Any, indices: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
        labels = task.train_labels[indices]
        templates = task.templates[:1] if self.train_templates == "first" else task.templates
        ids, mask = self.tokenizer(captions_for(labels, task.class_names, templates, generator))
        return {"images": task.train_images[indices].to(self.device), "labels": labels.to(self.device),
                "text_ids": ids.to(self.device), "text_mask": mask.to(self.device)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return contrastive_loss(model, batch["images"], batch["labels"], batch["text_ids"], batch["text_mask"],
                                logit_scale=self.logit_scale)

    @torch.no_grad()
    def _union_classifier(self, model: nn.Module) -> torch.Tensor:
        rows = [text_classifier(model, self.tokenizer, [name], templates)
                for name, templates in zip(self.union, self.union_templates)]
        return torch.cat(rows)  # (C_union, D)

    def evaluate(self, model: nn.Module, task: Any, xtail: bool = False) -> float:
        if not xtail:
            return evaluate_accuracy(model, self.tokenizer, task, batch_size=self.eval_batch_size)
        index = torch.tensor([self.union.index(n) for n in task.class_names])
        labels = index[task.test_labels]
        return evaluate_accuracy(model, self.tokenizer, (task.test_images, labels),
                                 batch_size=self.eval_batch_size, classifier=self._union_classifier(model))

    # --- features for distillation methods (LwF-VR, ZSCL); all differentiable unless stated ---
    def image_features(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(B, D) unit image features of a batch's (or any dict's) ``images``."""
        return F.normalize(encode_images(model, batch["images"]), dim=-1)

    @staticmethod
    def gather_rows(x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` from every rank when data-parallel (``x`` itself in one process): a method
        term that couples the samples of the training batch calls it on per-sample features, as
        the contrastive loss does (see ``sharding.gather_rows``)."""
        return gather_rows(x)

    def text_features(self, model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit features of raw texts."""
        ids, mask = self.tokenizer(list(texts))
        return F.normalize(encode_texts(model, ids, mask), dim=-1)

    def class_features(self, model: nn.Module, tasks: Sequence[Any], with_grad: bool = True) -> torch.Tensor:
        """(C, D) classifier rows over the distinct class names of ``tasks``, in order, each built as
        evaluation builds it, with the templates of the first task that names it. ``with_grad=False``:
        eval mode and no_grad, as :func:`text_classifier` documents."""
        seen: list[str] = []
        rows = []
        for task in tasks:
            names = [n for n in dict.fromkeys(task.class_names) if n not in seen]
            if names:
                seen += names
                rows.append(text_classifier(model, self.tokenizer, names, task.templates, with_grad=with_grad))
        return torch.cat(rows)

    def random_sentences(self, n: int, words: int, generator: torch.Generator) -> list[str]:
        """``n`` sentences of ``words`` tokens drawn uniformly from the tokenizer's vocabulary
        minus special tokens and every token of every stream class name: text outside the stream
        (the ZSCL release's "random" reference sentences are random token ids likewise). The
        tokenizer says what its pool is (``word_pool``: whole words for the project's tokenizer,
        alphabetic BPE tokens for a transformers one)."""
        pool = self.tokenizer.word_pool(self.union)
        if not pool:
            raise ValueError("the tokenizer has no word outside the stream's class names")
        pick = torch.randint(len(pool), (n, words), generator=generator)
        return [" ".join(pool[i] for i in row) for row in pick.tolist()]
