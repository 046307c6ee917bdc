"""continual-lora: continual fine-tuning of vision-language models with LoRA-family adapters.

The layers, lowest first (each imports only from those before it; docs/architecture.md, checked by
tests/test_layers.py): ``adapters`` -> ``contract`` -> ``methods`` -> ``kinds`` -> ``runtime`` ->
``continual`` -> ``data`` -> ``models`` -> ``benchmarks`` -> ``app`` -> ``cli``. Importing the
package loads the adapter core and registers the methods; the trainer, the benchmarks and the
application are imported only when used.
"""

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
    set_task,
    unload,
    unmerge,
    use_sample_tasks,
    use_task,
)
from .methods import METHODS, Method, build_method  # noqa: E402

__all__ = [
    "METHODS", "LoRAConfig", "Method", "add_task", "build_method", "delta_weights", "disable_adapters",
    "inject_adapters", "load_adapter", "merge", "parameter_counts", "parameter_table", "save_adapter",
    "set_task", "unload", "unmerge", "use_sample_tasks", "use_task", "__version__",
]
