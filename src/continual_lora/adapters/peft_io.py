"""Write an adapted model's update as a stock peft LoRA adapter directory.

``peft.PeftModel.from_pretrained(base, directory)`` loads what :func:`save_peft_lora` writes
(``adapter_config.json`` + ``adapter_model.safetensors``), with no continual-lora import. Every
branch gives its update as one product (:meth:`AdapterBranch.lora_factors`, scales folded into
B), so the adapter is written with ``lora_alpha = r`` (peft's scaling ``alpha / r = 1``)::

    nn.Linear "<name>":   lora_A = A (k, in),  lora_B = B (out, k)           B @ A = dW

Target modules are the base model's own module names (full dotted paths, which peft matches
exactly). A layer whose rank differs from the most common one gets ``rank_pattern`` /
``alpha_pattern`` entries (its escaped full name).

OpenAI-style fused attention (``nn.MultiheadAttention`` with one ``in_proj_weight`` (3E, E)):
this project adapts its q / k / v thirds and ``out_proj`` as separate slots; peft's LoRA for
``nn.MultiheadAttention`` (targeted by the attention module's own name) holds one LoRA on the
fused ``in_proj_weight`` and one on ``out_proj``, with the same rank r. The q / k / v slots become::

    in_proj:  lora_A = [A_q; A_k; A_v]              (k_q + k_k + k_v, E)
              lora_B = blockdiag(B_q, B_k, B_v)     (3E, k_q + k_k + k_v)
              lora_B @ lora_A = [dW_q; dW_k; dW_v]  (the slots' updates, stacked as in in_proj_weight)
    out_proj: lora_A = 0, lora_B = 0                (rank r, all zero)

A q / k / v slot without an adapter contributes no block (zero rows of lora_B). What peft cannot
load raises :class:`ExportError` pointing to the merged model (format hf, or
``unload(model, merge=True)``): an adapted ``out_proj`` slot, because peft (0.21.2 and earlier)
adds the out_proj LoRA twice, in its forward and in ``merge_and_unload`` (huggingface/peft#3774,
open), and attention with ``kdim`` / ``vdim`` other than ``embed_dim``, which peft does not adapt.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..storage import atomic_write
from .base import ExportError
from .inject import adapted_layers
from .io import CONFIG_NAME, WEIGHTS_NAME
from .layers import AdaptedLinear, AdaptedMultiheadAttention

PREFIX = "base_model.model."  # where PeftModel keeps the wrapped model


def _attention(name: str, layer: AdaptedMultiheadAttention, task: str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's two LoRAs of a fused ``nn.MultiheadAttention``: in_proj (block-diagonal) and out_proj."""
    m = layer.base_layer
    if not m._qkv_same_embed_dim:
        raise ExportError(f"{name}: peft's LoRA for nn.MultiheadAttention needs kdim = vdim = embed_dim (one fused "
                          "in_proj_weight); export the merged model instead (format hf, or unload(model, merge=True))")
    slots = layer.slots()
    if "out_proj" in slots:
        raise ExportError(f"{name}.out_proj: peft adds the out_proj LoRA of nn.MultiheadAttention twice (forward and "
                          "merge, huggingface/peft#3774), so it cannot carry this update; export the merged model "
                          "instead (format hf, or unload(model, merge=True)), or leave out_proj out of the targets")
    e = m.embed_dim
    qkv = [(i, *slots[s].lora_factors(task)) for i, s in enumerate(("q_proj", "k_proj", "v_proj")) if s in slots]
    a_in = torch.cat([a for _, a, _ in qkv])  # (k_in, E)
    b_in = a_in.new_zeros(3 * e, a_in.shape[0])  # (3E, k_in): block i holds slot i's B in rows [i E, (i + 1) E)
    col = 0
    for i, a, b in qkv:
        b_in[i * e : (i + 1) * e, col : col + a.shape[0]] = b
        col += a.shape[0]
    zero = (a_in.new_zeros(a_in.shape[0], e), a_in.new_zeros(e, a_in.shape[0]))  # peft's out_proj LoRA: no update
    return {name: (a_in, b_in), f"{name}.base_layer.out_proj": zero}


@torch.no_grad()
def peft_lora_state(model: nn.Module, task: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(peft state dict, rank per target module) of ``task``'s update (None: each branch's active task)."""
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    layers = adapted_layers(model)
    if not layers:
        raise ExportError("model has no adapters to export")
    for name, layer in layers.items():
        if isinstance(layer, AdaptedMultiheadAttention):
            pairs = _attention(name, layer, task)
        elif isinstance(layer, AdaptedLinear):
            pairs = {name: layer.adapter.lora_factors(task)}
        else:
            raise ExportError(f"{name}: {type(layer).__name__} has no peft counterpart")
        for key, (a, b) in pairs.items():
            state[f"{PREFIX}{key}.lora_A.weight"] = a.detach().float().cpu().contiguous()  # (k, in)
            state[f"{PREFIX}{key}.lora_B.weight"] = b.detach().float().cpu().contiguous()  # (out, k)
        ranks[name] = next(iter(pairs.values()))[0].shape[0]
    return state, ranks


def peft_lora_config(ranks: dict[str, int], base_model_name_or_path: str | None) -> dict[str, Any]:
    """peft's ``LoraConfig`` as JSON: scaling 1 everywhere (``lora_alpha = r``), exact target names."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): k for name, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,  # scaling alpha / r = 1: every scale is folded into lora_B
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_dropout": 0.0,
        "target_modules": sorted(ranks),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_peft_lora(model: nn.Module, directory: str | os.PathLike, task: str | None = None,
                   base_model_name_or_path: str | None = None) -> Path:
    """Write ``task``'s update (None: the active task) as a stock peft LoRA adapter; return the directory.

    ``base_model_name_or_path`` is recorded where peft looks for the base model (a local directory
    or a hub id). Each file is written atomically.
    """
    state, ranks = peft_lora_state(model, task)
    config = peft_lora_config(ranks, base_model_name_or_path)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}), mode=0o644)
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)), mode=0o644)
    return out
