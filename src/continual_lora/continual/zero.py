"""DeepSpeed ZeRO for the continual trainer, configured by ``accelerate launch``.

``accelerate launch --config_file configs/accelerate/zero2_8gpu.yaml -m continual_lora.cli run <cfg>``
sets ACCELERATE_USE_DEEPSPEED and the ZeRO settings (stage, offload, an optional DeepSpeed JSON);
:func:`zero_settings` reads them through accelerate's own ``DeepSpeedPlugin``, so every accelerate
DeepSpeed config works. The run config stays the source of truth for what it owns: the global batch
(``train.batch_size`` x ``train.grad_accum``), clipping (``train.max_grad_norm``), precision
(``train.precision``, as autocast) and the optimiser (AdamW + warm-up/cosine, rebuilt per task).
A DeepSpeed setting that contradicts it is an error, never silently overridden.

Per task, after ``method.begin_task`` (the trainable set changes from task to task)::

    engine = deepspeed.initialize(TrainStep(model, method, kind), AdamW(trainable))
    for each micro-batch: engine(batch) -> loss; engine.backward(loss); engine.step()
    release(engine):  ZeRO-3 only: gather every partitioned parameter back into a plain one
                      (layer by layer), then engine.destroy() removes DeepSpeed's hooks

What is sharded, per rank of W:
  ZeRO-1: AdamW state of the trainable (adapter) parameters;
  ZeRO-2: + their gradients;
  ZeRO-3: + the parameters themselves *while a task trains*, frozen base weights included. The
          adapter parameters are kept whole on every rank (``stage3_param_persistence_threshold``
          is raised above the largest of them): methods read them outside their module's forward
          (LiLoRA's stability loss, the Rank-1 pool's AGO loss and routing state). Between tasks the
          model is whole again, so ``end_task`` (the Rank-1 pool merges into W0), evaluation,
          checkpoints and export see ordinary tensors, exactly as under DDP.

So ZeRO-3 lowers the *training* peak (W0 / W per rank plus one gathered layer), while evaluation
needs the whole frozen model on each device once per task, as under DDP.

Mixed precision is our autocast over DeepSpeed's fp32 mode: DeepSpeed's own bf16/fp16 modes cast the
whole module, which would turn the methods' float buffers (vote counts, snapshots) into 16-bit
numbers. Load the frozen model in bf16 to halve its memory (the LLaVA loader does). fp16 needs a
loss scaler that DeepSpeed's fp32 mode lacks and is refused; use bf16.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from ..adapters.base import AdapterBranch


def deepspeed_requested() -> bool:
    """True under ``accelerate launch`` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - make installs it
        raise ImportError(
            "the accelerate config asks for DeepSpeed, which is not installed: "
            "pip install --no-build-isolation 'continual-lora[deepspeed]' (see docs/scale.md)") from err
    return deepspeed


def zero_settings(batch_size: int, grad_accum: int, world_size: int, max_grad_norm: float | None,
                  precision: str) -> dict[str, Any]:
    """The DeepSpeed config for one rank: accelerate's plugin config with our values filled in."""
    from accelerate.utils import DeepSpeedPlugin

    if precision == "fp16":
        raise ValueError("train.precision=fp16 is not supported with DeepSpeed (no loss scaler in its fp32 "
                         "mode, see continual_lora.continual.zero); use train.precision=bf16")
    plugin = DeepSpeedPlugin(zero3_init_flag=False)  # the model is built whole, then partitioned per task
    config = dict(plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ValueError(f"the DeepSpeed config has a {key!r} section; the trainer builds AdamW and its "
                             "schedule per task from train.lr / train.warmup_ratio: remove the section")
    for key in ("fp16", "bf16"):
        enabled = config.get(key, {}).get("enabled", False)
        if enabled not in (False, "auto"):
            raise ValueError(f"the DeepSpeed config enables {key}; set train.precision instead (bf16 runs as "
                             "autocast, see continual_lora.continual.zero)")
        config.pop(key, None)
    if config.get("amp", {}).get("enabled", False):
        raise ValueError("the DeepSpeed config enables amp; set train.precision instead")
    ours = {
        "train_micro_batch_size_per_gpu": batch_size // world_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum,
        "gradient_clipping": float(max_grad_norm or 0.0),
    }
    for key, value in ours.items():
        given = config.get(key, "auto")
        # accelerate launch writes gradient accumulation 1 and clipping from its own config by default
        if given not in ("auto", value) and not (key == "gradient_accumulation_steps" and given == 1):
            raise ValueError(f"the DeepSpeed / accelerate config sets {key}={given!r}, the run config implies "
                             f"{value!r}; set it in the run config (train.batch_size, train.grad_accum, "
                             "train.max_grad_norm) and leave it 'auto' in the DeepSpeed config")
        config[key] = value
    zero = dict(config.get("zero_optimization", {}))
    config["zero_optimization"] = {k: v for k, v in zero.items() if v != "auto"}  # DeepSpeed's defaults
    config["zero_allow_untested_optimizer"] = True  # torch AdamW, as in the DDP path
    config["zero_force_ds_cpu_optimizer"] = False  # optimizer offload runs the same AdamW on CPU
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def build_engine(step: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> tuple[Any, Any]:
    """``deepspeed.initialize`` on the per-task training module; returns (engine, its optimizer)."""
    deepspeed = _import_deepspeed()
    config = dict(config)
    if zero_stage(config) == 3:
        adapters = [p.numel() for m in step.modules() if isinstance(m, AdapterBranch) for p in m.parameters()]
        keep_whole = 1 + max(adapters, default=0)
        zero = dict(config["zero_optimization"])
        zero["stage3_param_persistence_threshold"] = max(keep_whole, int(zero.get("stage3_param_persistence_threshold", 0)))
        config["zero_optimization"] = zero
    # DeepSpeed's own collectives call a torch API that warns on every call
    warnings.filterwarnings("ignore", message="`torch.distributed.[a-z_]*_tensor` is deprecated", category=FutureWarning)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=step, optimizer=optimizer, config=config,
                                                      dist_init_required=False)
    return engine, ds_optimizer


def zero3_layout(module: nn.Module) -> dict[str, Any]:
    """What ZeRO-3 partitioned in ``module`` (call while its engine is alive): element counts of the
    partitioned parameters (whole, and held by this rank) and of those kept whole on every rank."""
    partitioned = {n: p for n, p in module.named_parameters() if hasattr(p, "ds_id") and not p.ds_persist}
    whole = {n: p for n, p in module.named_parameters() if not (hasattr(p, "ds_id") and not p.ds_persist)}
    adapters = {n for m_name, m in module.named_modules() if isinstance(m, AdapterBranch)
                for n in (f"{m_name}.{k}" for k, _ in m.named_parameters())}
    return {
        "partitioned_tensors": len(partitioned),
        "partitioned_numel": sum(int(p.ds_numel) for p in partitioned.values()),
        "local_numel": sum(int(p.ds_tensor.numel()) for p in partitioned.values()),
        "whole_numel": sum(int(getattr(p, "ds_numel", p.numel())) for p in whole.values()),
        "adapters_partitioned": sorted(adapters & set(partitioned)),
        "example_partitioned": sorted(partitioned)[:3],
    }


def release(engine: Any) -> None:
    """End a task's engine. ZeRO-3: every partitioned parameter becomes a plain, whole one again
    (same values, same ``requires_grad``), one at a time so that at most one extra layer is gathered.
    Every rank must call this (gathering is a collective)."""
    deepspeed = _import_deepspeed()
    module = engine.module
    replaced: dict[int, nn.Parameter] = {}
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is None or not hasattr(param, "ds_id"):
                continue
            if id(param) not in replaced:  # tied weights: one new parameter for one old one
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    whole = param.data.detach().clone()
                replaced[id(param)] = nn.Parameter(whole, requires_grad=param.requires_grad)
            owner._parameters[name] = replaced[id(param)]
    engine.destroy()  # ZeRO-3: removes the fetch / release hooks from the modules


def set_leaf_modules(model: nn.Module, classes: tuple[type, ...]) -> None:
    """ZeRO-3: gather all parameters of these modules' subtrees before their forward (their forward
    reads a child's weights directly, as :class:`AdaptedMultiheadAttention` does)."""
    if any(isinstance(m, classes) for m in model.modules()):
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, list(classes))
