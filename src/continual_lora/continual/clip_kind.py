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
from torch import nn

from .clip_task import WordTokenizer, captions_for, contrastive_loss, evaluate_accuracy, text_classifier


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
