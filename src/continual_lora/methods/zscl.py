"""ZSCL, Zero-Shot Continual Learning (Zheng et al., arXiv 2303.06628), on one shared LoRA.

Feature-space distillation to the ORIGINAL (zero-shot) model on reference data that is not in
the task stream: reference images x_ref and reference texts t_ref. With f, g unit image / text
features (f_0, g_0 of the original model, which here is simply the model with its adapters
disabled) and s the kind's logit scale::

    z_0 = s * f_0(x_ref) g_0(t_ref)^T,     z = s * f(x_ref) g(t_ref)^T                (B, N)
    L_img = T^2 KL(softmax(z_0 / T) || softmax(z / T)),  L_txt = the same on z_0^T, z^T
    L     = L_task + lambda * (L_img + [text_direction] L_txt)                      (term "zscl")
          + l2_lambda * ||theta - theta_start||^2                                   (term "l2", optional)

Parameter space ("weight ensemble", WE): every ``weight_ensemble_every`` steps the running
mean of the trainable factors theta (A, B of the LoRA) is updated, starting from the task-start
factors: theta_bar <- theta_bar + (theta - theta_bar) / n; at the task end theta <- theta_bar.
The release averages full weights every 100 of 1000 steps; averaging LoRA factors is the same
operation on the parameters that train here (not the same as averaging the products B A).

Reference data (a bundled set, never the stream): ``num_reference_images`` seeded random crops of
scikit-learn's two sample photos (``load_sample_images``), resized to the task's image size, or
any tensor given to the constructor. Reference texts: ``reference_texts`` if given, else random
sentences over the tokenizer's words outside every stream class name (the release uses
Conceptual Captions or random token sentences). Options (default first): ``student_text=True``
(paper: the student uses its own g) or ``False`` (release: z uses g_0 too). The release adds
``l2_lambda = 1`` and WE; the KL is the release's soft cross-entropy minus the teacher's entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import LoRAConfig, disable_adapters
from ..contract import TaskContext
from .base import register_method
from .lwf_vr import two_way_distillation
from .seq_lora import SeqLoRA
from .shared import shared_factors


@dataclass
class ZSCLConfig(LoRAConfig):
    distill_lambda: float = 1.0  # lambda, weight of the feature distillation (release: 1)
    temperature: float = 2.0  # T of the softened softmaxes; the loss is scaled by T^2 (release: 2)
    text_direction: bool = True  # also distil the transposed, text->image logits (release: yes)
    student_text: bool = True  # the student's logits use its own text features (paper); False: original's
    num_reference_images: int = 256  # random crops of scikit-learn's sample photos
    reference_batch_size: int = 32  # reference images per step
    reference_texts: tuple[str, ...] = ()  # reference prompts; () = random sentences outside the stream
    num_random_texts: int = 64  # random reference sentences when reference_texts is empty
    random_text_words: int = 6  # words per random sentence
    reference_seed: int = 0  # seed of the crops and the random sentences
    weight_ensemble_every: int = 0  # WE: steps between running-mean updates of the factors (0: off)
    l2_lambda: float = 0.0  # pull of the factors to their task-start values (release: 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reference_texts = tuple(self.reference_texts)
        for key in ("distill_lambda", "l2_lambda"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        for key in ("num_reference_images", "reference_batch_size", "num_random_texts", "random_text_words"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        every = self.weight_ensemble_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"weight_ensemble_every must be an integer >= 0, got {every!r}")


def sample_photo_crops(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: random square crops (1/8 to all of the short side) of the two
    photos of ``sklearn.datasets.load_sample_images``, alternating photos, each resized to ``size``."""
    from sklearn.datasets import load_sample_images

    photos = [torch.tensor(im).permute(2, 0, 1).float().div(255.0) for im in load_sample_images().images]
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]  # (3, H, W)
        h, w = photo.shape[1:]
        side = int(torch.randint(min(h, w) // 8, min(h, w) + 1, (1,), generator=generator))
        y = int(torch.randint(h - side + 1, (1,), generator=generator))
        x = int(torch.randint(w - side + 1, (1,), generator=generator))
        crop = photo[None, :, y : y + side, x : x + side]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(crops).clamp(0.0, 1.0)


@register_method
class ZSCL(SeqLoRA):
    """SeqLoRA plus distillation to the zero-shot model on reference data, and optional WE / L2."""

    name = "zscl"
    config_cls = ZSCLConfig

    def __init__(self, config: ZSCLConfig | None = None, reference_images: torch.Tensor | None = None) -> None:
        super().__init__(config)
        self.reference_images = reference_images  # (M, 3, S, S) in [0, 1]; None: built from sklearn at first use
        self.texts: list[str] = []
        self.ref_img: torch.Tensor | None = None  # (M, D) original-model features of the reference images
        self.ref_txt: torch.Tensor | None = None  # (N, D) original-model features of the reference texts
        self._start: list[torch.Tensor] = []  # factors at the task start (L2 anchor, WE init)
        self._mean: list[torch.Tensor] = []  # WE running mean of the factors
        self._count, self._steps = 0, 0

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        return [p for pair in shared_factors(model) for p in pair]

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        super().begin_task(model, task, index, context)
        self._start = [p.detach().clone() for p in self._params(model)]
        self._mean = [p.clone() for p in self._start]
        self._count, self._steps = 1, 0

    @torch.no_grad()
    def prepare_reference(self, model: nn.Module, image_size: int, context: TaskContext) -> None:
        """Reference images and texts and their original-model features (once per process)."""
        cfg, kind = self.config, context.contrastive(self.name)
        g = torch.Generator().manual_seed(cfg.reference_seed)
        if self.reference_images is None:
            self.reference_images = sample_photo_crops(cfg.num_reference_images, image_size, g)
        self.texts = list(cfg.reference_texts) or kind.random_sentences(cfg.num_random_texts, cfg.random_text_words, g)
        was_training = model.training
        model.eval()
        try:
            with disable_adapters(model):
                self.ref_img = torch.cat([kind.image_features(model, {"images": x})
                                          for x in self.reference_images.split(256)])
                self.ref_txt = kind.text_features(model, self.texts)
        finally:
            model.train(was_training)

    def distillation(self, model: nn.Module, images: torch.Tensor, context: TaskContext) -> torch.Tensor:
        """L_img + [text_direction] L_txt on a batch of reference images (B, 3, S, S); ``images`` (the
        training batch's) only give the image size the reference crops are made at."""
        cfg, kind = self.config, context.contrastive(self.name)
        if self.ref_img is None:
            self.prepare_reference(model, images.shape[-1], context)
        idx = torch.randperm(len(self.reference_images), generator=context.generator)[: cfg.reference_batch_size]
        s_img = kind.image_features(model, {"images": self.reference_images[idx]})
        s_txt = kind.text_features(model, self.texts) if cfg.student_text else self.ref_txt
        return two_way_distillation(self.ref_img[idx.to(self.ref_img.device)], self.ref_txt, s_img, s_txt,
                                    kind.logit_scale, cfg.temperature, cfg.text_direction)

    def loss_terms(self, model: nn.Module, batch: Any, context: TaskContext | None = None) -> dict[str, torch.Tensor]:
        cfg = self.config
        terms = {"zscl": cfg.distill_lambda * self.distillation(model, batch["images"], self.need_context(context))}
        if cfg.l2_lambda > 0:
            terms["l2"] = cfg.l2_lambda * sum(((p - p0) ** 2).sum() for p, p0 in zip(self._params(model), self._start))
        return terms

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        self._steps += 1
        every = self.config.weight_ensemble_every
        if every and (self._steps - 1) % every == 0:  # steps 1, 1 + k, 1 + 2k, ... (release schedule)
            self._count += 1
            for mean, p in zip(self._mean, self._params(model)):
                mean.add_((p - mean) / self._count)

    def end_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        if self.config.weight_ensemble_every:
            with torch.no_grad():
                for p, mean in zip(self._params(model), self._mean):
                    p.copy_(mean)
        super().end_task(model, task, index, context)
