"""continual-lora: continual fine-tuning of vision-language models with LoRA-family adapters.

The layers, lowest first (each imports only from those before it; docs/architecture.md, checked by
tests/test_layers.py): ``adapters`` -> ``contract`` -> ``methods`` -> ``kinds`` -> ``runtime`` ->
``continual`` -> ``data`` -> ``models`` -> ``benchmarks`` -> ``app`` -> ``cli``. Importing the
package loads the adapter core and registers the methods; the trainer, the benchmarks and the
application are imported only when used: ``continual_lora.export_hf`` / ``export_peft`` (the
application's export of a finished run) resolve on first access (PEP 562 ``__getattr__``).
"""

from typing import Any

from .version import __version__

from .adapters import (  # noqa: E402
    LoRAConfig,
    add_task,
    delta_weights,
    disable_adapters,
    inject_adapters,
    load_adapter,
    merge,
    parameter_counts,
    parameter_table,
    save_adapter,
    save_peft_lora,
    set_task,
    unload,
    unmerge,
    use_sample_tasks,
    use_task,
)
from .methods import METHODS, Method, build_method  # noqa: E402

_LAZY = {"export_hf", "export_peft"}  # names of continual_lora.app.export, imported on first access


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from .app import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS", "LoRAConfig", "Method", "add_task", "build_method", "delta_weights", "disable_adapters",
    "export_hf", "export_peft", "inject_adapters", "load_adapter", "merge", "parameter_counts", "parameter_table",
    "save_adapter", "save_peft_lora", "set_task", "unload", "unmerge", "use_sample_tasks", "use_task", "__version__",
]
