"""Save and load adapters: ``adapter_model.safetensors`` + ``adapter_config.json``.

Tensors are keyed by the adapted weight's name plus the branch's own key
(``vision_model.encoder.layers.0.self_attn.q_proj.lora_A.task1``). Nothing is pickled:
weights go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..storage import atomic_write
from ..version import __version__
from .base import config_from_dict
from .inject import CONFIG_ATTR, adapted_layers, branches, inject_adapters, sites

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, branch in branches(model).items():
        for key, value in branch.state_dict().items():
            state[f"{name}.{key}"] = value.detach().contiguous()
    return state


def save_adapter(model: nn.Module, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapters of ``model`` (each file atomically) and return the directory."""
    config = getattr(model, CONFIG_ATTR, None)
    found = branches(model)
    if config is None or not found:
        raise ValueError("model has no adapters to save")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(found.values()))
    meta = {
        "format_version": FORMAT_VERSION,
        "continual_lora_version": __version__,
        "config": config.to_dict(),
        "tasks": list(first.tasks),
        "active_task": first.active_task,
        "merged": any(layer.merged for layer in adapted_layers(model).values()),
        "layers": {name: [b.out_features, b.in_features] for name, b in found.items()},
        "extra": extra or {},
    }
    state = adapter_state(model)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / CONFIG_NAME).read_text())


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject the saved adapters into a freshly built base ``model`` and load their weights.

    Raises ``ValueError`` naming the layer and both shapes when the file does not fit.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    if meta.get("merged"):
        raise ValueError(f"{directory} was saved while merged; save adapters unmerged")
    if not adapted_layers(model):
        inject_adapters(model, config_from_dict(meta["config"]))
    state = load_file(str(directory / WEIGHTS_NAME), device="cpu")
    consumed: set[str] = set()
    for name, branch, base_weight in sites(model):
        for task in meta["tasks"]:
            if task not in branch.tasks:
                branch.add_task(task)
        own = branch.state_dict()
        prefix = f"{name}."
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in own}
        consumed.update(prefix + k for k in mine)
        missing = sorted(set(own) - set(mine))
        if missing:
            raise ValueError(f"layer {name!r}: adapter file has no tensors {missing}")
        for key, value in mine.items():
            if tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"layer {name!r} tensor {key!r}: adapter file has shape {tuple(value.shape)}, "
                    f"model has {tuple(own[key].shape)}"
                )
        branch.load_state_dict(mine, strict=True)
        branch.restore(base_weight)
        branch.set_task(meta.get("active_task"))
    stray = sorted(set(state) - consumed)
    if stray:
        raise ValueError(f"adapter file has tensors the model's adapters lack: {stray[:5]}")
    return model
