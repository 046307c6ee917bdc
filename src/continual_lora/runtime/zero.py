"""DeepSpeed ZeRO for the continual trainer, configured by ``accelerate launch``.

``accelerate launch --config_file configs/accelerate/zero2_8gpu.yaml -m continual_lora.cli run <cfg>``
sets ACCELERATE_USE_DEEPSPEED and the ZeRO settings (stage, offload, an optional DeepSpeed JSON);
:func:`zero_settings` reads them through accelerate's own ``DeepSpeedPlugin``, so every accelerate
DeepSpeed config works. The run config stays the source of truth for what it owns: the global batch
(``train.batch_size`` x ``train.grad_accum``), clipping (``train.max_grad_norm``), precision
(``train.precision``, as autocast) and the optimiser (AdamW + warm-up/cosine, rebuilt per task).
A DeepSpeed setting that contradicts it is an error, not silently overridden (the one exception:
``gradient_accumulation_steps: 1``, which accelerate writes whether or not it was asked for).

Per task, after ``method.begin_task`` (the trainable set changes from task to task),
:class:`DeepSpeedEngine` does::

    engine = deepspeed.initialize(Objective(model, ...), AdamW(trainable))
    for each micro-batch: engine(batch) -> loss; engine.backward(loss); engine.step()
                      (autocast is entered inside the objective's forward; the optimiser steps
                      at the accumulation boundary)
    release(engine):  engine.destroy() and the engine's own hooks removed; ZeRO-3: every
                      partitioned parameter gathered back into a plain one (module by module)
                      and DeepSpeed's module state removed, checked by check_released

What is sharded, per rank of W:
  ZeRO-1: AdamW state of the trainable (adapter) parameters;
  ZeRO-2: + their gradients;
  ZeRO-3: + the parameters themselves *while a task trains*, frozen base weights included. The
          adapter parameters are kept whole on every rank (``stage3_param_persistence_threshold``
          is raised above the largest of them): methods read them outside their module's forward
          (LiLoRA's stability loss, the Rank-1 pool's AGO loss and routing state). Between tasks the
          model is whole again, so ``end_task`` (the Rank-1 pool merges into W0), evaluation,
          checkpoints and export see ordinary tensors, exactly as under DDP.

So ZeRO-3 lowers the *training* peak (W0 / W per rank plus the layers gathered at the time), while
evaluation needs the whole frozen model on each device once per task, as under DDP.

Mixed precision is our autocast over DeepSpeed's fp32 mode: DeepSpeed's own bf16/fp16 modes cast the
whole module, which would turn the methods' float buffers (vote counts, snapshots) into 16-bit
numbers. Load the frozen model in bf16 to halve its memory (the LLaVA loader does). fp16 needs a
loss scaler that DeepSpeed's fp32 mode lacks and is refused; use bf16.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from ..adapters.base import AdapterBranch
from ..adapters.layers import AdaptedMultiheadAttention
from .base import Engine


DEEPSPEED_PERSISTENCE_DEFAULT = 100_000  # DeepSpeed's own default: small tensors (norms, biases) stay whole


def deepspeed_requested() -> bool:
    """True under ``accelerate launch`` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def select_accelerator(device: str) -> None:
    """Make DeepSpeed run where the trainer runs. DeepSpeed picks its accelerator from
    ``torch.cuda.is_available()``, so a CPU run on a machine with a GPU must say so (DS_ACCELERATOR)
    before deepspeed is first imported; a mismatch found later is an error."""
    kind = torch.device(device).type
    if kind == "cpu" and "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    found = get_accelerator().device_name()
    if found != kind:
        raise RuntimeError(f"DeepSpeed runs on {found!r} but train.device is {device!r}; set DS_ACCELERATOR={kind} "
                           "before the run starts")


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
                         "mode, see continual_lora.runtime.zero); use train.precision=bf16")
    plugin = DeepSpeedPlugin(zero3_init_flag=False)  # the model is built whole, then partitioned per task
    config = dict(plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ValueError(f"the DeepSpeed config has a {key!r} section; the trainer builds AdamW and its "
                             "schedule per task from train.lr / train.warmup_ratio: remove the section")
    if config.get("torch_autocast", {}).get("enabled", False):
        raise ValueError("the DeepSpeed config enables torch_autocast; set train.precision instead (the trainer "
                         "enters autocast itself, see continual_lora.runtime.zero)")
    for key in ("fp16", "bf16"):
        enabled = config.get(key, {}).get("enabled", False)
        if enabled not in (False, "auto"):
            raise ValueError(f"the DeepSpeed config enables {key}; set train.precision instead (bf16 runs as "
                             "autocast, see continual_lora.runtime.zero)")
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
        # accelerate launch writes gradient_accumulation_steps 1 even when its config says nothing
        if given not in ("auto", value) and not (key == "gradient_accumulation_steps" and given == 1):
            raise ValueError(f"the DeepSpeed / accelerate config sets {key}={given!r}, the run config implies "
                             f"{value!r}; set it in the run config (train.batch_size, train.grad_accum, "
                             "train.max_grad_norm) and leave it 'auto' in the DeepSpeed config")
        config[key] = value
    zero = _drop_auto(dict(config.get("zero_optimization", {})))  # "auto": DeepSpeed's own defaults
    if zero.get("stage") == 3:
        for key in ("stage3_model_persistence_threshold", "model_persistence_threshold"):  # name and alias
            if key in zero:
                raise ValueError(f"{key} would let ZeRO-3 partition adapter tensors, which methods read outside "
                                 "their module's forward; remove it from the DeepSpeed config")
        # DeepSpeed's memory-efficient linear (it replaces F.linear for the whole process) stays off:
        # with it, 2-rank runs of several methods in one process diverged in a frozen weight (not
        # diagnosed, docs/scale.md); without it, plain F.linear keeps each gathered frozen weight
        # until its backward unless gradient checkpointing is on
        zero["memory_efficient_linear"] = False
    config["zero_optimization"] = zero
    config["zero_allow_untested_optimizer"] = True  # torch AdamW, as in the DDP path
    config["zero_force_ds_cpu_optimizer"] = False  # optimizer offload runs the same AdamW on CPU
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def _drop_auto(section: dict[str, Any]) -> dict[str, Any]:
    """``section`` without its "auto" values, at any depth."""
    return {k: _drop_auto(v) if isinstance(v, dict) else v for k, v in section.items() if v != "auto"}


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
        alias = zero.pop("param_persistence_threshold", DEEPSPEED_PERSISTENCE_DEFAULT)  # DeepSpeed accepts both
        given = int(zero.get("stage3_param_persistence_threshold", alias))
        zero["stage3_param_persistence_threshold"] = max(keep_whole, given)
        config["zero_optimization"] = zero
    # DeepSpeed's own collectives call a torch API that warns on every call
    warnings.filterwarnings("ignore", message="`torch.distributed.[a-z_]*_tensor` is deprecated",
                            category=FutureWarning)
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


def release(engine: Any) -> list[weakref.ref]:
    """End a task's engine; every rank must call it (gathering is a collective).

    ZeRO-3: every partitioned parameter is gathered, module by module, into a plain whole
    ``nn.Parameter`` (same values, same ``requires_grad``; tied weights stay tied). Then DeepSpeed's
    state goes: the parameter coordinator's trace and its class-level cache (both hold the old
    parameters, hence their shards), the engine (``destroy()`` and the engine's own forward hooks),
    what DeepSpeed set on each module (old parameter dict, external-parameter registry, the
    backward-hook classes bound to this engine, ``ds_*`` counters), the module's entry in its
    forward stack, and its ``F.linear`` replacement. :func:`check_released` verifies the modules;
    the returned weak references (an old partitioned parameter, the engine's optimiser) must be dead
    once the caller has dropped the engine (:meth:`DeepSpeedEngine.close` checks).
    """
    deepspeed = _import_deepspeed()
    module = engine.module
    whole: dict[int, nn.Parameter] = {}
    for owner in module.modules():
        todo = {id(p): p for p in owner._parameters.values()
                if p is not None and hasattr(p, "ds_id") and id(p) not in whole}
        if todo:
            with deepspeed.zero.GatheredParameters(list(todo.values()), modifier_rank=None):
                for key, param in todo.items():
                    whole[key] = nn.Parameter(param.data.detach().clone(), requires_grad=param.requires_grad)
    probes: list[weakref.ref] = []
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if whole:
        old = next(p for m in module.modules() for p in m._parameters.values() if p is not None and id(p) in whole)
        probes = [weakref.ref(old), weakref.ref(engine.optimizer)]
    if offload is not None:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

        coordinator = offload.get_param_coordinator()
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()  # the recorded trace holds the old parameters
        cached = Coordinator._PartitionedParameterCoordinator__params_to_release  # an lru_cache keyed by coordinator
        while not hasattr(cached, "cache_clear") and hasattr(cached, "__wrapped__"):  # under its nvtx wrapper
            cached = cached.__wrapped__
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    engine.destroy()  # removes ZeRO's fetch / release / gradient hooks
    for handle in (getattr(engine, "module_forward_pre_hook", None), getattr(engine, "module_forward_post_hook", None)):
        if handle is not None:  # the engine's own hooks on its module (destroy() keeps them)
            handle.remove()
    if whole:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

        parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not module]
        for owner in module.modules():
            owner._parameters = {name: whole.get(id(p), p) if p is not None else None
                                 for name, p in owner._parameters.items()}  # a plain dict, as torch builds it
            for key in [k for k, v in owner.__dict__.items() if _set_by_zero3(k, v)]:
                del owner.__dict__[key]
        if hasattr(Init, "linear_bk"):  # ZeRO-3's memory-efficient linear, installed for the whole process
            torch.nn.functional.linear = Init.linear_bk
    check_released(module)
    return probes


# what ZeRO-3 sets on a module besides ``ds_*`` attributes (deepspeed/runtime/zero/parameter_offload.py,
# partition_parameters.py, utils/z3_leaf_module.py)
ZERO3_MODULE_ATTRIBUTES = ("_original_parameters", "_external_params", "ds_external_parameters", "all_parameters",
                           "pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt", "_z3_leaf")


def _set_by_zero3(name: str, value: Any) -> bool:
    return (name.startswith("ds_") or name in ZERO3_MODULE_ATTRIBUTES or _from_deepspeed(value)
            or _from_deepspeed(type(value)))


def _from_deepspeed(fn: Any) -> bool:
    fn = getattr(fn, "func", fn)  # functools.partial
    return (getattr(fn, "__module__", None) or "").startswith("deepspeed")


def check_released(module: nn.Module) -> None:
    """Raise unless ``module`` is free of DeepSpeed state (see :func:`release`)."""
    from deepspeed.runtime.zero import parameter_offload

    problems = []
    if any(p is not None and hasattr(p, "ds_id") for m in module.modules() for p in m._parameters.values()):
        problems.append("partitioned parameters")
    left = sorted({k for m in module.modules() for k, v in m.__dict__.items() if _set_by_zero3(k, v)})
    if left:
        problems.append(f"ZeRO-3 module attributes {left[:5]}")
    if any(m is module for m in parameter_offload.FWD_MODULE_STACK):
        problems.append("an entry in DeepSpeed's forward-module stack")
    hooks = [f"{name or 'top'}: {getattr(getattr(hook, 'func', hook), '__qualname__', hook)}"
             for name, m in module.named_modules()
             for table in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
             for hook in table.values() if _from_deepspeed(hook)]
    if hooks:
        problems.append(f"{len(hooks)} DeepSpeed hooks (e.g. {hooks[:3]})")
    grad_hooks = [name for name, p in module.named_parameters()
                  for table in (p._backward_hooks or {}, getattr(p, "_post_accumulate_grad_hooks", None) or {})
                  for hook in table.values() if _from_deepspeed(hook)]
    if grad_hooks:
        problems.append(f"DeepSpeed gradient hooks on {len(grad_hooks)} parameters (e.g. {grad_hooks[:3]})")
    if _from_deepspeed(torch.nn.functional.linear):
        problems.append("DeepSpeed's F.linear patch")
    if problems:
        raise RuntimeError(f"ZeRO-3 release left {', '.join(problems)} behind")


def set_leaf_modules(model: nn.Module, classes: tuple[type, ...]) -> None:
    """ZeRO-3: gather all parameters of these modules' subtrees before their forward (their forward
    reads a child's weights directly, as :class:`AdaptedMultiheadAttention` does)."""
    if any(isinstance(m, classes) for m in model.modules()):
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, list(classes))


class DeepSpeedEngine(Engine):
    """One task's DeepSpeed engine: ``deepspeed.initialize`` on the task's objective and optimiser;
    backward and step through the engine; :meth:`close` releases it (see :func:`release`).

    The caller must drop its own references to the optimiser, its schedule, the parameter list and
    the last loss's graph before :meth:`close`: they hold the partitioned parameters of ZeRO-3.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> None:
        stage3 = zero_stage(config) == 3
        if stage3:
            set_leaf_modules(module, (AdaptedMultiheadAttention,))
        engine, ds_optimizer = build_engine(module, optimizer, config)
        super().__init__(engine, ds_optimizer)
        self.zero3_layout: dict[str, Any] | None = zero3_layout(engine.module) if stage3 else None
        if self.zero3_layout is not None and self.zero3_layout["adapters_partitioned"]:
            # methods read adapter tensors outside their module's forward
            raise RuntimeError(f"ZeRO-3 partitioned adapter tensors {self.zero3_layout['adapters_partitioned'][:3]}")

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch, then ``engine.step()``, which steps the optimiser only at the
        accumulation boundary."""
        self.module.backward(loss, scale_wrt_gas=False)
        self.module.step()

    def step(self, params: list[nn.Parameter], max_grad_norm: float | None) -> Any:
        """DeepSpeed clipped and stepped in its last ``engine.step()``: the norm it computed, or None."""
        return self.module.get_global_grad_norm()

    def close(self) -> None:
        """ZeRO-3 parameters whole again, the engine's hooks removed, its state freed (checked)."""
        engine, self.module, self.optimizer = self.module, None, None
        probes = release(engine)
        del engine
        gc.collect()
        alive = [ref() for ref in probes if ref() is not None]
        if alive:  # the old shards (about W0 / W per rank) would stay in memory, task after task
            raise RuntimeError(f"ZeRO-3 state outlived its task: {[type(x).__name__ for x in alive]} still "
                               "referenced (see continual_lora.runtime.zero.release)")
