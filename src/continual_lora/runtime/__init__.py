"""Where a training step runs: one process, DDP or DeepSpeed ZeRO, as small objects behind one
interface (a :class:`Runtime` for the process topology, an :class:`Engine` per task for how the
training module and optimiser execute). See ``base.py``."""

from .base import PRECISIONS, Engine, Runtime, enable_gradient_checkpointing
from .ddp import DataParallel, DDPEngine, RowGather
from .launch import launched_world_size, process_rank, runtime_from_env
from .zero import DeepSpeedEngine

__all__ = ["DDPEngine", "DataParallel", "DeepSpeedEngine", "Engine", "PRECISIONS", "RowGather", "Runtime",
           "enable_gradient_checkpointing", "launched_world_size", "process_rank", "runtime_from_env"]
