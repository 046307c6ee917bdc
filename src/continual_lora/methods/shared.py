"""The shared LoRA: one update trained through every task, used by several methods.

SeqLoRA and the baselines built on it (EWC, LwF-VR, WiSE-FT, ZSCL, replay), joint LoRA and
MoE-LoRA keep a single adapter "task" named :data:`SHARED` in every branch: it is created when the
first task begins (a resumed run finds it in the checkpoint) and selected for every later task.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..adapters import AdapterBranch, add_task, set_task
from ..adapters.inject import branches

SHARED = "shared"  # the adapter key of the one update every task trains


def open_shared(model: nn.Module, found: Mapping[str, AdapterBranch] | None = None) -> None:
    """Create the shared update unless it exists (``found``: the branches to look in), then select it."""
    found = branches(model) if found is None else found
    if not found:
        raise ValueError("model has no adapters; attach the method first")
    if SHARED not in next(iter(found.values())).tasks:
        add_task(model, SHARED)
    set_task(model, SHARED)


def shared_factors(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of the shared LoRA in every adapted weight."""
    return [b.factors(SHARED) for b in branches(model).values()]  # type: ignore[attr-defined]
