"""Put adapters into any ``nn.Module`` by target names, and the model-level verbs.

Targets are module names: a list of suffixes (``"q_proj"`` matches
``"vision_model.encoder.layers.0.self_attn.q_proj"``) or one regular expression matched
against the whole name. Every ``nn.Linear`` is a candidate; an ``nn.MultiheadAttention`` at
``"...attn"`` offers the virtual names ``"...attn.q_proj"``, ``".k_proj"``, ``".v_proj"`` (the
thirds of its fused ``in_proj_weight``) and its real ``"...attn.out_proj"``. So one target
list (``q_proj, k_proj, v_proj, out_proj, ...``) adapts transformers' CLIP and OpenAI-style
CLIP alike.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .base import AdapterBranch, AdapterConfig, check_task_name
from .layers import MHA_SLOTS, AdaptedLinear, AdaptedModule, AdaptedMultiheadAttention

CONFIG_ATTR = "continual_lora_config"  # the AdapterConfig a model was adapted with


def _matches(name: str, pattern: Sequence[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def candidate_names(model: nn.Module) -> list[str]:
    """Every name a target can match: Linear modules and attention slots."""
    names: list[str] = []
    mha_children: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, AdaptedModule):
            raise ValueError(f"model already has adapters (at {name!r}); unload them first")
        if isinstance(module, nn.MultiheadAttention):
            names += [f"{name}.{slot}" if name else slot for slot in MHA_SLOTS]
            mha_children.add(f"{name}.out_proj" if name else "out_proj")
        elif isinstance(module, nn.Linear) and name not in mha_children:
            names.append(name)
    return names


def _no_match_message(names: list[str], targets: Sequence[str] | str) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t.split(".")[-1], leaves, n=5, cutoff=0.4)})
    hint = f" Close candidates: {close}." if close else ""
    return (
        f"no module matched targets {wanted}.{hint} "
        f"Adaptable layer names in this model end with: {leaves[:30]}{' ...' if len(leaves) > 30 else ''}"
    )


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def inject_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Wrap every matching layer of ``model`` in place; return the adapted names.

    Freezes all base parameters: afterwards only branch parameters are trainable.
    """
    names = candidate_names(model)
    chosen = [n for n in names if _matches(n, config.targets) and not _matches(n, config.exclude)]
    if not chosen:
        raise ValueError(_no_match_message(names, config.targets))
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")  # "meta" stays meta
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.device(device):
        _wrap(model, config, chosen)
    for layer in adapted_layers(model).values():
        layer.train(layer.base_layer.training)  # new branches follow the model's train / eval mode
    config.link(list(branches(model).values()))
    setattr(model, CONFIG_ATTR, config)
    return chosen


def _wrap(model: nn.Module, config: AdapterConfig, chosen: list[str]) -> None:
    mha_slots: dict[str, dict[str, AdapterBranch]] = {}
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention) and leaf in MHA_SLOTS:
            e = parent.embed_dim
            in_f = e if leaf in ("q_proj", "out_proj") else (parent.kdim if leaf == "k_proj" else parent.vdim)
            mha_slots.setdefault(parent_name, {})[leaf] = config.build_branch(in_f, e)
            continue
        linear = model.get_submodule(name)
        branch = config.build_branch(linear.in_features, linear.out_features)
        branch.seq_dim = config.seq_dim
        parent, attr = _get_parent(model, name)
        setattr(parent, attr, AdaptedLinear(linear, branch))
    for mha_name, branches in mha_slots.items():
        parent, attr = _get_parent(model, mha_name)
        setattr(parent, attr, AdaptedMultiheadAttention(getattr(parent, attr), branches))


def adapted_layers(model: nn.Module) -> dict[str, AdaptedModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedModule)}


def sites(model: nn.Module) -> Iterator[tuple[str, AdapterBranch, torch.Tensor]]:
    """(adapted weight name, branch, view of the frozen base weight) for every adapted weight."""
    for name, layer in adapted_layers(model).items():
        for slot, branch, weight in layer.sites():
            yield (f"{name}.{slot}" if slot else name), branch, weight


def branches(model: nn.Module) -> dict[str, AdapterBranch]:
    return {name: branch for name, branch, _ in sites(model)}


def _require_adapters(model: nn.Module) -> dict[str, AdaptedModule]:
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model has no adapters; call inject_adapters / add_adapters first")
    return layers


def add_task(model: nn.Module, task: str) -> None:
    """Create ``task``'s state in every branch and make it the active task."""
    check_task_name(task)
    _require_adapters(model)
    for branch in branches(model).values():
        branch.add_task(task)
        branch.set_task(task)


def set_task(model: nn.Module, task: str | None) -> None:
    """Select the task whose adapter the forward pass uses (an unknown id is an error).

    While a task is merged into the base weights the forward pass is that task's whatever is
    selected, so selecting another task then is an error: :func:`unmerge` first."""
    merged = {layer.merged_task for layer in _require_adapters(model).values() if layer.merged}
    if merged and merged != {task}:
        raise RuntimeError(f"the model has task {sorted(map(str, merged))[0]!r} merged into its weights, so its "
                           f"forward pass cannot use task {task!r}; call unmerge(model) first")
    for branch in branches(model).values():
        branch.set_task(task)


@contextlib.contextmanager
def use_task(model: nn.Module, task: str | None) -> Iterator[None]:
    """Run the block with ``task`` selected (see :func:`set_task`), then restore the selection."""
    previous = {name: b.active_task for name, b in branches(model).items()}
    set_task(model, task)
    try:
        yield
    finally:
        for name, b in branches(model).items():
            b.active_task = previous[name]


@contextlib.contextmanager
def use_sample_tasks(model: nn.Module, tasks: Sequence[str]) -> Iterator[None]:
    """Run the block's forward passes as a mixed batch: sample n through task ``tasks[n]``'s adapter
    (peft's ``adapter_names=``). Every input of an adapted layer inside must hold exactly
    ``len(tasks)`` samples; the branches must support it (per-task LoRA, LiLoRA)."""
    layers = _require_adapters(model)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("the model has a task merged into its weights: call unmerge(model) before a mixed batch")
    found = branches(model)
    unsupported = sorted({type(b).__name__ for b in found.values() if not b.supports_per_sample})
    if unsupported:
        raise NotImplementedError(f"{', '.join(unsupported)} cannot run a different task per sample")
    names = list(tasks)
    for task in dict.fromkeys(names):
        for branch in found.values():
            branch.resolve_task(task)  # an unknown id is an error
    order = list(dict.fromkeys(names))
    index = torch.tensor([order.index(t) for t in names], dtype=torch.long)
    device = next(iter(layers.values())).slot_weight(next(iter(next(iter(layers.values())).slots()))).device
    groups = [(task, torch.nonzero(index == i).flatten().to(device)) for i, task in enumerate(order)]
    for branch in found.values():
        branch.sample_groups, branch.sample_count = groups, len(names)
    try:
        yield
    finally:
        for branch in found.values():
            branch.sample_groups, branch.sample_count = None, 0


def delta_weights(model: nn.Module, task: str | None = None) -> dict[str, torch.Tensor]:
    """Each adapted weight's update ``dW`` (out x in) for ``task`` (default: the active task)."""
    return {name: branch.delta_weight(task) for name, branch, _ in sites(model)}


def merge(model: nn.Module, task: str | None = None) -> None:
    """Fold ``task``'s update into the base weights (zero-overhead inference)."""
    for layer in _require_adapters(model).values():
        layer.merge(task)


def unmerge(model: nn.Module) -> None:
    """Subtract the merged update again (restores the base weights to fp32 rounding)."""
    for layer in _require_adapters(model).values():
        layer.unmerge()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the plain base model inside the block (a merged update is taken out and put back)."""
    layers = _require_adapters(model)
    merged = {name: layer.merged_task for name, layer in layers.items() if layer.merged}
    for layer in layers.values():
        layer.unmerge()
        layer.adapters_enabled = False
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.adapters_enabled = True
            if name in merged:
                layer.merge(merged[name])


@contextlib.contextmanager
@torch.no_grad()
def merged(model: nn.Module, task: str | None = None) -> Iterator[nn.Module]:
    """Inside the block ``model`` is the plain model of ``task``: the original module types and
    keys (what :func:`unload` gives) with ``task``'s update folded into the weights. Afterwards
    the adapters are back and every base weight is bit-identical to before: the adapted weights
    are copied and restored, not unmerged (``W + dW - dW`` is not ``W`` in low precision).
    """
    layers = _require_adapters(model)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("model is already merged; unmerge it first")
    originals = [weight.clone() for _, _, weight in sites(model)]
    config = getattr(model, CONFIG_ATTR, None)
    merge(model, task)
    for name, layer in layers.items():
        parent, attr = _get_parent(model, name)
        setattr(parent, attr, layer.base_layer)
    if config is not None:
        delattr(model, CONFIG_ATTR)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            parent, attr = _get_parent(model, name)
            setattr(parent, attr, layer)
            layer.merged, layer.merged_task = False, None
        for (_, _, weight), original in zip(sites(model), originals):
            weight.copy_(original)
        if config is not None:
            setattr(model, CONFIG_ATTR, config)


def unload(model: nn.Module, merge: bool = True, task: str | None = None) -> nn.Module:
    """Replace every wrapper by its ``base_layer``; with ``merge`` fold ``task``'s update first.

    Returns the same model object, now with exactly the original module types and keys.
    """
    for name, layer in _require_adapters(model).items():
        if not merge or (task is not None and layer.merged_task != task):
            layer.unmerge()  # another task's update is folded in: take it out first
        if merge and not layer.merged:
            layer.merge(task)
        parent, attr = _get_parent(model, name)
        setattr(parent, attr, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model

