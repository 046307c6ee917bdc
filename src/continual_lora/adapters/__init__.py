"""Adapter core: inject low-rank branches into any nn.Module, merge, save, load, count."""

from .accounting import parameter_counts, parameter_table
from .base import (
    ADAPTER_CONFIGS,
    AdapterBranch,
    AdapterConfig,
    ExportError,
    ParamCount,
    UnknownTaskError,
    config_from_dict,
    register_adapter,
)
from .inject import (
    adapted_layers,
    add_task,
    branches,
    candidate_names,
    delta_weights,
    disable_adapters,
    inject_adapters,
    merge,
    merged,
    set_task,
    sites,
    unload,
    unmerge,
    use_sample_tasks,
    use_task,
)
from .io import load_adapter, read_adapter_config, read_adapter_tensors, save_adapter
from .layers import AdaptedLinear, AdaptedModule, AdaptedMultiheadAttention
from .lora import LoRABranch, LoRAConfig
from .peft_io import save_peft_lora

__all__ = [
    "ADAPTER_CONFIGS", "AdaptedLinear", "AdaptedModule", "AdaptedMultiheadAttention", "AdapterBranch",
    "AdapterConfig", "ExportError", "LoRABranch", "LoRAConfig", "ParamCount", "UnknownTaskError", "adapted_layers",
    "add_task", "branches", "candidate_names", "config_from_dict", "delta_weights", "disable_adapters",
    "inject_adapters", "load_adapter", "merge", "merged", "parameter_counts", "parameter_table",
    "read_adapter_config", "read_adapter_tensors", "register_adapter", "save_adapter", "save_peft_lora", "set_task",
    "sites", "unload", "unmerge", "use_sample_tasks", "use_task",
]
