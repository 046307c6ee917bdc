"""Continual-learning methods: one file each, registered by name."""

from .base import METHODS, Method, build_method, register_method
from .lilora import LiLoRA, LiLoRAConfig, export_peft_lora
from .rank1_pool import Rank1Pool, Rank1PoolConfig
from .seq_lora import SeqLoRA

__all__ = [
    "METHODS", "LiLoRA", "LiLoRAConfig", "Method", "Rank1Pool", "Rank1PoolConfig", "SeqLoRA",
    "build_method", "export_peft_lora", "register_method",
]
