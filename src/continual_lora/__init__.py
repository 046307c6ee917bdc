"""continual-lora: continual fine-tuning of vision-language models with LoRA-family adapters.

Library layers (imports run one way): ``adapters`` -> ``methods`` -> ``continual`` (engine)
-> ``benchmarks`` -> ``cli``. Importing the package loads the adapter core and registers the
methods; the trainer and the benchmarks are imported only when used.
"""

__version__ = "0.1.0"

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
    use_task,
)
from .methods import METHODS, Method, build_method  # noqa: E402

__all__ = [
    "METHODS", "LoRAConfig", "Method", "add_task", "build_method", "delta_weights", "disable_adapters",
    "inject_adapters", "load_adapter", "merge", "parameter_counts", "parameter_table", "save_adapter",
    "set_task", "unload", "unmerge", "use_task", "__version__",
]
