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

from ..errors import AdapterFileError
from ..storage import atomic_write
from ..version import __version__
from .base import config_from_dict
from .inject import CONFIG_ATTR, adapted_layers, branches, inject_adapters, sites, unload

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
    """Write the adapters of ``model`` (each file atomically) and return the directory.

    The files hold the adapters' own tensors, which merging does not change: a model saved while a
    task is merged into its weights loads into a fresh base model as the unmerged adapters.
    """
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
        "layers": {name: [b.out_features, b.in_features] for name, b in found.items()},
        "extra": extra or {},
    }
    state = adapter_state(model)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of a saved adapter; an unreadable file names itself."""
    path = Path(directory) / CONFIG_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterFileError(f"{path} does not exist: {directory} holds no saved adapter") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path} is unreadable or corrupt ({err}); save the adapter again") from None
    if not isinstance(meta, dict) or not {"config", "tasks"} <= set(meta):
        raise AdapterFileError(f"{path} is not an adapter config (no 'config' / 'tasks' entries)")
    return meta


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter (on CPU); a truncated or corrupt file names itself."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise AdapterFileError(f"{path} does not exist: {directory} holds no saved adapter") from None
    except Exception as err:  # safetensors raises its own SafetensorError on truncated / corrupt files
        raise AdapterFileError(f"{path} is unreadable or corrupt ({err}); save the adapter again") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject the saved adapters into a freshly built base ``model`` and load their weights.

    Every tensor is checked before any is loaded: a file that does not fit raises
    :class:`~continual_lora.errors.AdapterFileError` naming the layer and both shapes, and when this
    call injected the adapters the model is given back unchanged (the original modules).
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    state = read_adapter_tensors(directory)
    injected = not adapted_layers(model)
    if injected:
        trainable = [p for p in model.parameters() if p.requires_grad]  # inject_adapters freezes them
        inject_adapters(model, config_from_dict(meta["config"]))
    try:
        loads = _match_tensors(model, meta, state)
    except Exception:
        if injected:  # the model as it was: original modules, original requires_grad
            unload(model, merge=False)
            for p in trainable:
                p.requires_grad_(True)
        raise
    for branch, base_weight, mine in loads:  # all checked: load, then fold recorded updates into W0
        branch.load_state_dict(mine, strict=True)
        branch.restore(base_weight)
        branch.set_task(meta.get("active_task"))
    return model


def _match_tensors(model: nn.Module, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> list[tuple[Any, ...]]:
    """(branch, base weight, its tensors) for every adapted weight, each checked against the file."""
    loads = []
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
            raise AdapterFileError(f"layer {name!r}: adapter file has no tensors {missing}")
        for key, value in mine.items():
            if tuple(own[key].shape) != tuple(value.shape):
                raise AdapterFileError(
                    f"layer {name!r} tensor {key!r}: adapter file has shape {tuple(value.shape)}, "
                    f"model has {tuple(own[key].shape)}"
                )
        loads.append((branch, base_weight, mine))
    stray = sorted(set(state) - consumed)
    if stray:
        raise AdapterFileError(f"adapter file has tensors the model's adapters lack: {stray[:5]}")
    return loads
