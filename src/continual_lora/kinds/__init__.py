"""What a task is: CLIP image classification (``clip.py`` on the pure functions of ``clip_ops.py``) and
LLaVA-style instruction tuning (``instruct.py`` on the samples of ``instruct_data.py``, scored by
``scorers.py``). Each kind implements :class:`~continual_lora.contract.TaskKind`."""

from .clip import ClipClassification, ImageTask, xtail_label_space
from .instruct import InstructionTuning
from .instruct_data import InstructSample, InstructTask

__all__ = ["ClipClassification", "ImageTask", "InstructSample", "InstructTask", "InstructionTuning",
           "xtail_label_space"]
