"""The continual trainer: the task schedule and checkpoints (``trainer.py``, ``checkpoint.py``) and the one
home of a training step (``step.py``)."""

from .checkpoint import RunState, read_checkpoint
from .step import Objective, TrainConfig, adamw, optimizer_step, warmup_cosine
from .trainer import ContinualTrainer, StepLog, runtime_for

__all__ = ["ContinualTrainer", "Objective", "RunState", "StepLog", "TrainConfig", "adamw", "optimizer_step",
           "read_checkpoint",
           "runtime_for", "warmup_cosine"]
