"""LwF-VR: Learning without Forgetting with vocabulary replay, on one shared LoRA.

LwF (Li & Hoiem, arXiv 1606.09282) with the vocabulary replay of Ding et al. ("Don't stop
learning", arXiv 2207.09248), as the ZSCL paper (Zheng et al., arXiv 2303.06628) runs it on
CLIP. When task t starts, the current model is frozen as the teacher (task 1: the zero-shot
model). On each new batch of images x the student matches the teacher's image->text
distribution over the text features of every class name seen so far (tasks 1..t: the replayed
vocabulary V)::

    z_teacher = s * f_old(x) g_old(V)^T,      z_student = s * f(x) g(V)^T           (B, |V|)
    L_img     = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))          (batch mean)
    L_txt     = the same on the transposed logits (each text over the batch's images)
    L         = L_task + lambda * (L_img + [text_direction] L_txt)                  (term "lwf_vr")

f, g are unit image / text features, s the kind's logit scale (100). Options (default first):
``student_text=True`` gives the student its own text features g(V) (the text encoder is
distilled too); ``False`` uses the teacher's g_old(V) in both logits, as the ZSCL release does.
The release replays random token sentences (``virtual_vocab``) instead of class names and uses
a soft-target cross-entropy, which differs from the KL here by the teacher's entropy (a constant:
same gradient); the KL is exactly 0 while the student equals the teacher.

The teacher is a frozen deep copy taken in ``begin_task``, so a run resumed at a task boundary
rebuilds it exactly; nothing is saved beyond the LoRA. Needs a
:class:`~continual_lora.contract.ContrastiveKind` (CLIP classification) for the features.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import LoRAConfig
from ..contract import TaskContext
from .base import register_method
from .seq_lora import SeqLoRA


def distillation_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the last dim, batch mean."""
    target = F.log_softmax(teacher / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    return F.kl_div(log_q, target, reduction="batchmean", log_target=True) * temperature**2


def two_way_distillation(t_img: torch.Tensor, t_txt: torch.Tensor, s_img: torch.Tensor, s_txt: torch.Tensor,
                         scale: float, temperature: float, text_direction: bool) -> torch.Tensor:
    """KL of image->text logits (B, N), plus the text->image direction (N, B) if asked."""
    teacher = scale * t_img @ t_txt.t()  # (B, N)
    student = scale * s_img @ s_txt.t()  # (B, N)
    loss = distillation_kl(teacher, student, temperature)
    if text_direction:
        loss = loss + distillation_kl(teacher.t(), student.t(), temperature)
    return loss


@dataclass
class LwFVRConfig(LoRAConfig):
    distill_lambda: float = 1.0  # lambda, weight of the distillation loss (release: 1)
    temperature: float = 2.0  # T of the softened softmaxes; the loss is scaled by T^2 (release: 2)
    text_direction: bool = True  # also distil the transposed, text->image logits (release: yes)
    student_text: bool = True  # student logits use its own text features; False: the teacher's (release)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.distill_lambda >= 0:
            raise ValueError(f"distill_lambda must be >= 0, got {self.distill_lambda!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


@register_method
class LwFVR(SeqLoRA):
    """SeqLoRA plus distillation from the task-start model on the new task's images."""

    name = "lwf_vr"
    config_cls = LwFVRConfig

    def __init__(self, config: LwFVRConfig | None = None) -> None:
        super().__init__(config)
        self.teacher: nn.Module | None = None  # frozen copy of the model at the task start
        self.vocabulary: list[Any] = []  # tasks whose class names are replayed (1..t)
        self.teacher_text: torch.Tensor | None = None  # (|V|, D) teacher text features of the vocabulary

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        super().begin_task(model, task, index, context)
        context = self.need_context(context)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.vocabulary = list(context.tasks[: index + 1])
        self.teacher_text = context.contrastive(self.name).class_features(self.teacher, self.vocabulary,
                                                                           with_grad=False)

    def distillation(self, model: nn.Module, batch: Any, context: TaskContext) -> torch.Tensor:
        """L_img + [text_direction] L_txt of the module docstring on ``batch``'s images."""
        if self.teacher is None or self.teacher_text is None:
            raise RuntimeError("lwf_vr: begin_task has not frozen a teacher yet")
        kind, cfg = context.contrastive(self.name), self.config
        with torch.no_grad():
            t_img = kind.image_features(self.teacher, batch)
        s_img = kind.image_features(model, batch)
        # data parallel: the text->image logits (|V|, B) couple the batch, so every rank scores the
        # global batch (the img->text mean over rows is then the global mean as well)
        t_img, s_img = context.gather(t_img), context.gather(s_img)
        s_txt = kind.class_features(model, self.vocabulary, with_grad=True) if cfg.student_text else self.teacher_text
        return two_way_distillation(t_img, self.teacher_text, s_img, s_txt, kind.logit_scale, cfg.temperature,
                                    cfg.text_direction)

    def loss_terms(self, model: nn.Module, batch: Any, context: TaskContext | None = None) -> dict[str, torch.Tensor]:
        return {"lwf_vr": self.config.distill_lambda * self.distillation(model, batch, self.need_context(context))}

    def end_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        self.teacher, self.teacher_text = None, None  # free the copy between tasks
        super().end_task(model, task, index, context)
