"""Contrastive image classification with a ``transformers.CLIPModel``: pure functions, no loop.

All public functions take images as float tensors in [0, 1], shape (B, 3, S, S); they apply
``normalize_images`` themselves, exactly as pretraining does. Evaluation follows MTIL: the
classifier row of a class is the normalised mean of the normalised text embeddings of all its
prompt templates, and logits are ``100 * cosine``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import Gather, no_gather

IMAGE_MEAN = 0.5  # per-channel mean used by normalize_images (pretraining uses the same)
IMAGE_STD = 0.5  # per-channel std used by normalize_images
DEFAULT_LOGIT_SCALE = 100.0  # MTIL / DAC evaluate and fine-tune with a frozen 100 * cosine


class TextTokenizer(Protocol):
    """What the CLIP functions need from a tokenizer: texts -> (input_ids, attention_mask), both (B, L)
    int64 (``models.word_tokenizer.WordTokenizer`` for the small CLIP, ``models.clip.HFTextTokenizer``
    around a transformers tokenizer)."""

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def word_pool(self, exclude: Iterable[str]) -> list[str]:
        """Vocabulary words outside the ``exclude`` texts (random reference text for ZSCL)."""
        ...


class LabeledImages(Protocol):
    """What ``evaluate_accuracy`` needs from a task (e.g. :class:`~continual_lora.kinds.clip.ImageTask`)."""

    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _features(out: torch.Tensor | object) -> torch.Tensor:
    """transformers < 5 returns a tensor; 5.x returns an output whose pooler_output is projected."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> model input in [-1, 1] (mean = std = 0.5, as in pretraining)."""
    return (images - IMAGE_MEAN) / IMAGE_STD


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> projected image features (B, D), not normalised."""
    pixels = normalize_images(images.to(_device(model), torch.float32))
    return _features(model.get_image_features(pixel_values=pixels))


def encode_texts(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) ids and mask -> projected text features (B, D), not normalised."""
    dev = _device(model)
    return _features(model.get_text_features(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev)))


def text_classifier(model: nn.Module, tokenizer: TextTokenizer, class_names: Sequence[str],
                    templates: Sequence[str], with_grad: bool = False) -> torch.Tensor:
    """-> (C, D) unit rows: normalised mean over templates of normalised text embeddings.

    With ``with_grad=False`` (evaluation) it runs in eval mode under ``no_grad`` and restores
    the model's mode; with ``with_grad=True`` it is differentiable and leaves the mode alone.
    """
    texts = [t.format(c) for c in class_names for t in templates]
    ids, mask = tokenizer(texts)
    was_training = model.training
    if not with_grad:
        model.eval()
    try:
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            emb = F.normalize(encode_texts(model, ids, mask), dim=-1)  # (C*T, D)
    finally:
        model.train(was_training)
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(emb, dim=-1)


def soft_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B,) labels -> (B, B) rows summing to 1, uniform over the pairs that share a label."""
    same = (labels[:, None] == labels[None, :]).float()  # (B, B), symmetric, diagonal 1
    return same / same.sum(dim=1, keepdim=True)


def contrastive_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, text_ids: torch.Tensor,
                     text_mask: torch.Tensor, logit_scale: float | None = DEFAULT_LOGIT_SCALE,
                     gather: Gather = no_gather) -> torch.Tensor:
    """Symmetric image-text InfoNCE with soft targets; text b is the caption of image b.

    logits = scale * cos(image_a, text_b) (B, B); pairs with the same label are positives.
    ``logit_scale=None`` uses the model's learnable ``exp(logit_scale)`` clamped at 100 (CLIP
    pretraining); the default 100 is the frozen scale of the DAC release. ``gather``: in a
    data-parallel step, the rows of every rank (open_clip's ``ClipLoss(rank, world_size)``), so
    each rank computes the loss of the global batch.
    """
    img = gather(F.normalize(encode_images(model, images), dim=-1))  # (B, D)
    txt = gather(F.normalize(encode_texts(model, text_ids, text_mask), dim=-1))  # (B, D)
    scale = model.logit_scale.exp().clamp(max=100.0) if logit_scale is None else logit_scale
    logits = scale * img @ txt.t()  # (B, B)
    targets = soft_targets(gather(labels.to(logits.device)))
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def classify(model: nn.Module, images: torch.Tensor, classifier: torch.Tensor,
             logit_scale: float = DEFAULT_LOGIT_SCALE) -> torch.Tensor:
    """(B, 3, S, S) images, (C, D) unit classifier -> (B, C) logits = scale * cosine.

    Differentiable (the caller picks no_grad or not), so it also serves cross-entropy losses.
    """
    img = F.normalize(encode_images(model, images), dim=-1)  # (B, D)
    return logit_scale * img @ classifier.to(img.device, img.dtype).t()


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, tokenizer: TextTokenizer,
                      data: LabeledImages | tuple[torch.Tensor, torch.Tensor],
                      class_names: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                      batch_size: int = 256, classifier: torch.Tensor | None = None) -> float:
    """Top-1 accuracy in percent on a task's test split or on ``(images, labels)``.

    Class names / templates default to the task's own; a ready (C, D) ``classifier`` (e.g. an
    X-TAIL union classifier) overrides them. Runs in eval mode and restores the mode after.
    """
    if isinstance(data, tuple):
        images, labels = data
    else:
        images, labels = data.test_images, data.test_labels
        class_names = class_names if class_names is not None else data.class_names
        templates = templates if templates is not None else data.templates
    if classifier is None:
        if class_names is None or templates is None:
            raise ValueError("class_names and templates (or a classifier) are required for (images, labels)")
        classifier = text_classifier(model, tokenizer, class_names, templates)
    batches = ((images[s : s + batch_size], labels[s : s + batch_size]) for s in range(0, len(labels), batch_size))
    return batch_accuracy(model, classifier, batches)


@torch.no_grad()
def batch_accuracy(model: nn.Module, classifier: torch.Tensor,
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy in percent of ``classifier`` (C, D) over (images, labels) batches, in eval mode
    (the model's mode is restored after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for images, labels in batches:
            logits = classify(model, images, classifier)  # (b, C)
            correct += int((logits.argmax(dim=-1).cpu() == labels.cpu()).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate_accuracy got an empty set of images")
    return 100.0 * correct / total


def captions_for(labels: torch.Tensor, class_names: Sequence[str], templates: Sequence[str],
                 generator: torch.Generator | None = None) -> list[str]:
    """One training caption per image: a seeded random template filled with its class name."""
    pick = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
    return [templates[t].format(class_names[int(y)]) for t, y in zip(pick, labels.tolist())]
