"""The CLIP task kind: contrastive training and zero-shot-style evaluation of image classification tasks.

A task is an :class:`ImageTask` (images in memory as float tensors in [0, 1]: the embedded
benchmarks) or a :class:`~.images.FileImageTask` (images read from disk on demand and preprocessed
in DataLoader workers: real datasets), with labels indexing ``class_names`` and prompt templates. Training pairs each image with a caption (a template filled with
its class name) and minimises the symmetric contrastive loss of :mod:`.clip_ops` at a frozen logit
scale; evaluation is top-1 accuracy against the template-ensemble classifier of the task's classes.

X-TAIL mode classifies a task's test images over the union of *every* task's class names
(:func:`xtail_label_space`: identical names count once, each class embedded with the templates
of the first task that names it), with no task hint.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import Batch, ContrastiveKind, Gather, Routing, no_gather, slice_batch
from .clip_ops import (
    TextTokenizer,
    batch_accuracy,
    captions_for,
    contrastive_loss,
    encode_images,
    encode_texts,
    text_classifier,
)
from .images import FileImageTask, Preprocess, evaluation_batches, training_batches


@dataclass(frozen=True)
class ImageTask:
    """One classification task: images in [0, 1], labels indexing ``class_names``."""

    name: str
    class_names: tuple[str, ...]  # natural-language class names, used in prompts
    templates: tuple[str, ...]  # prompt templates, each containing "{}"
    train_images: torch.Tensor  # (N, 3, S, S) float32 in [0, 1]
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor  # (M, 3, S, S) float32 in [0, 1]
    test_labels: torch.Tensor  # (M,) int64

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def xtail_label_space(tasks: Sequence[Any]) -> tuple[list[str], list[list[int]]]:
    """X-TAIL: union of all tasks' class names (identical names merged, first-seen order) and, per
    task, the union index of each of its classes."""
    union: list[str] = []
    where: dict[str, int] = {}
    per_task: list[list[int]] = []
    for task in tasks:
        idx = []
        for name in task.class_names:
            if name not in where:
                where[name] = len(union)
                union.append(name)
            idx.append(where[name])
        per_task.append(idx)
    return union, per_task


class ClipClassification(ContrastiveKind):
    """Task kind for a ``transformers.CLIPModel`` on :class:`ImageTask` streams (MTIL protocol)."""

    protocol = "mtil"
    routing_modes = ("prototype", "confidence")

    def __init__(self, tokenizer: TextTokenizer, tasks: Sequence[Any], device: str = "cpu",
                 logit_scale: float = 100.0, train_templates: Literal["first", "all"] = "first",
                 eval_batch_size: int = 256, preprocess: Preprocess | None = None, num_workers: int = 0) -> None:
        """``preprocess`` and ``num_workers``: how the images of :class:`FileImageTask` s are read
        (CLIP's preprocessing at the model's resolution; DataLoader worker processes, 0 = in this one)."""
        self.tokenizer = tokenizer
        self.preprocess = preprocess if preprocess is not None else Preprocess()
        self.num_workers = num_workers
        self.pin_memory = torch.device(device).type == "cuda"
        self.tasks = list(tasks)
        self.device = device
        self.logit_scale = logit_scale
        self.train_templates = train_templates
        self.eval_batch_size = eval_batch_size
        # X-TAIL label space: union of class names; the first task that names a class owns its prompts
        self.union, per_task = xtail_label_space(self.tasks)
        self.union_templates: list[Sequence[str]] = []
        for task, index in zip(self.tasks, per_task):
            for i in index:
                if i == len(self.union_templates):
                    self.union_templates.append(task.templates)

    # --- TaskKind ----------------------------------------------------------------------------
    def num_train(self, task: Any) -> int:
        return len(task.train_labels)

    def num_test(self, task: Any) -> int:
        return len(task.test_labels)

    def train_batch(self, task: Any, indices: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
        if isinstance(task, FileImageTask):  # decoded here, one at a time (batches() reads ahead in workers)
            seeds = torch.randint(2**31, (len(indices),), generator=generator).tolist()
            images = torch.stack([self.preprocess.training(task.train_source.image(int(i)), random.Random(seed))
                                  for i, seed in zip(indices.tolist(), seeds)])
        else:
            images = task.train_images[indices]
        return self._batch(task, images, indices, generator)

    def _batch(self, task: Any, images: torch.Tensor, indices: torch.Tensor, generator: torch.Generator,
               rows: slice | None = None, size: int | None = None) -> dict[str, Any]:
        """The batch of ``images`` (this process's ``rows`` of a global batch of ``size``) and their
        captions: a random template per sample, drawn for the whole global batch."""
        labels = task.train_labels[indices]
        templates = task.templates[:1] if self.train_templates == "first" else task.templates
        ids, mask = self.tokenizer(captions_for(labels, task.class_names, templates, generator))
        text = {"labels": labels, "text_ids": ids, "text_mask": mask}
        if rows is not None:
            text = slice_batch(text, rows.start, rows.stop, size)
        return {"images": images.to(self.device), **{k: v.to(self.device) for k, v in text.items()}}

    def batches(self, task: Any, batch_size: int, generator: torch.Generator,
                rows: slice | None = None) -> Generator[Batch, None, None]:
        """In-memory tasks: the contract's batches. File tasks: images decoded ahead by ``num_workers``
        DataLoader workers (only this process's ``rows``), captions drawn here in step order."""
        if not isinstance(task, FileImageTask):
            yield from super().batches(task, batch_size, generator, rows)
            return
        for images, indices in training_batches(task, self.preprocess, batch_size, generator, rows, self.num_workers,
                                                self.pin_memory):
            yield self._batch(task, images, indices, generator, rows, batch_size)

    def loss(self, model: nn.Module, batch: dict[str, Any], gather: Gather = no_gather) -> torch.Tensor:
        return contrastive_loss(model, batch["images"], batch["labels"], batch["text_ids"], batch["text_mask"],
                                logit_scale=self.logit_scale, gather=gather)

    @torch.no_grad()
    def _union_classifier(self, model: nn.Module) -> torch.Tensor:
        rows = [text_classifier(model, self.tokenizer, [name], templates)
                for name, templates in zip(self.union, self.union_templates)]
        return torch.cat(rows)  # (C_union, D)

    def _test_batches(self, task: Any, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of ``task``'s test split in order (read from disk for a file task)."""
        if isinstance(task, FileImageTask):
            return evaluation_batches(task.test_source, labels, self.preprocess, self.eval_batch_size,
                                      self.num_workers, self.pin_memory)
        size = self.eval_batch_size
        return ((task.test_images[s : s + size], labels[s : s + size]) for s in range(0, len(labels), size))

    def evaluate(self, model: nn.Module, task: Any, xtail: bool = False, routing: Routing | None = None) -> float:
        labels = task.test_labels
        if xtail:
            labels = torch.tensor([self.union.index(n) for n in task.class_names])[labels]
        if routing is not None:
            return self._routed_accuracy(model, task, xtail, routing, self._test_batches(task, labels))
        classifier = (self._union_classifier(model) if xtail
                      else text_classifier(model, self.tokenizer, task.class_names, task.templates))
        return batch_accuracy(model, classifier, self._test_batches(task, labels))

    @torch.no_grad()
    def _routed_accuracy(self, model: nn.Module, task: Any, xtail: bool, routing: Routing,
                         batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Top-1 accuracy with each test image scored through the adapter its router picks: image
        features from one mixed-batch forward, logits against the classifier (``task``'s classes, or
        the X-TAIL union) that the picked task's adapter builds."""
        own = {t.name: t for t in self.tasks}

        def classifier(name: str, of: Any, union: bool) -> torch.Tensor:
            key = ("union" if union else of.name, name)
            if key not in routing.cache:
                with routing.task(name):
                    routing.cache[key] = (self._union_classifier(model) if union
                                          else text_classifier(model, self.tokenizer, of.class_names, of.templates))
            return routing.cache[key]

        was_training = model.training
        model.eval()
        correct = total = 0
        try:
            for images, labels in batches:
                if routing.mode == "prototype":
                    with routing.base():
                        index = routing.assign(self.image_features(model, {"images": images}))
                else:  # the task whose adapter is most confident over its own classes
                    confidence = []
                    for name in routing.tasks:
                        with routing.task(name):
                            feats = self.image_features(model, {"images": images})
                        logits = self.logit_scale * feats @ classifier(name, own[name], False).t()
                        confidence.append(logits.softmax(dim=-1).amax(dim=-1))
                    index = torch.stack(confidence).argmax(dim=0)
                with routing.per_sample(index):
                    feats = self.image_features(model, {"images": images})  # (b, D)
                predicted = torch.empty(len(labels), dtype=torch.long)
                for name, rows in routing.routed(index):
                    predicted[rows.cpu()] = (feats[rows] @ classifier(name, task, xtail).t()).argmax(dim=-1).cpu()
                correct += int((predicted == labels.cpu()).sum())
                total += len(labels)
                routing.record(task.name, index.cpu())
        finally:
            model.train(was_training)
        if total == 0:
            raise ValueError("evaluate got an empty test set")
        return 100.0 * correct / total

    @torch.no_grad()
    def route_features(self, model: nn.Module, task: Any, limit: int | None = None) -> torch.Tensor:
        """(N, D) unit image features of ``task``'s training images (evaluation preprocessing, no
        augmentation; at most ``limit``, the first of a fixed permutation), in eval mode."""
        n = len(task.train_labels)
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit] if limit and limit < n else None
        if isinstance(task, FileImageTask):
            source = task.train_source if keep is None else task.train_source.subset(keep.tolist())
            batches = (images for images, _ in evaluation_batches(
                source, torch.zeros(len(source), dtype=torch.long), self.preprocess, self.eval_batch_size,
                self.num_workers, self.pin_memory))
        else:
            images = task.train_images if keep is None else task.train_images[keep]
            batches = (images[s : s + self.eval_batch_size] for s in range(0, len(images), self.eval_batch_size))
        was_training = model.training
        model.eval()
        try:
            return torch.cat([self.image_features(model, {"images": b}) for b in batches])
        finally:
            model.train(was_training)

    def test_shard(self, task: Any, rank: int, world_size: int) -> Any | None:
        """A copy of ``task`` whose test split holds every ``world_size``-th sample from ``rank`` (an
        :class:`ImageTask`-like dataclass or a :class:`FileImageTask`; None for anything else, which
        every rank then scores whole)."""
        keep = torch.arange(rank, len(task.test_labels), world_size)
        if isinstance(task, FileImageTask):
            return task.test_subset(keep.tolist())
        if not dataclasses.is_dataclass(task) or not all(hasattr(task, k) for k in ("test_images", "test_labels")):
            return None
        return dataclasses.replace(task, test_images=task.test_images[keep], test_labels=task.test_labels[keep])

    # --- ContrastiveKind: features for distillation methods (LwF-VR, ZSCL) --------------------
    def image_features(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(B, D) unit image features of a batch's (or any dict's) ``images``."""
        return F.normalize(encode_images(model, batch["images"]), dim=-1)

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
