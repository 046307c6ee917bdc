"""Continual-learning methods: one file each, registered by name."""

from .base import METHODS, Method, build_method, register_method
from .lilora import LiLoRA, LiLoRAConfig, export_peft_lora
from .rank1_pool import Rank1Pool, Rank1PoolConfig
from .seq_lora import SeqLoRA
from .ewc import EWC, EWCConfig
from .lwf_vr import LwFVR, LwFVRConfig
from .replay import Replay, ReplayConfig
from .wise_ft import WiSEFT, WiSEFTConfig
from .zscl import ZSCL, ZSCLConfig
from .joint_lora import JointLoRA, JointLoRAConfig
from .moe_lora import MoELoRA, MoELoRAConfig
from .o_lora import OLoRA, OLoRAConfig
from .per_task_lora import PerTaskLoRA, PerTaskLoRAConfig
from .sd_lora import SDLoRA, SDLoRAConfig
from .zero_shot import ZeroShot, ZeroShotConfig
from .task_router import PrototypeRouter, RouterConfig

__all__ = [
    "METHODS", "LiLoRA", "LiLoRAConfig", "Method", "Rank1Pool", "Rank1PoolConfig", "SeqLoRA",
    "build_method", "export_peft_lora", "register_method",
]
__all__ += ["EWC", "EWCConfig", "LwFVR", "LwFVRConfig", "Replay", "ReplayConfig", "WiSEFT", "WiSEFTConfig",
            "ZSCL", "ZSCLConfig"]
__all__ += ["JointLoRA", "JointLoRAConfig", "MoELoRA", "MoELoRAConfig", "OLoRA", "OLoRAConfig", "PerTaskLoRA",
            "PerTaskLoRAConfig", "SDLoRA", "SDLoRAConfig", "ZeroShot", "ZeroShotConfig"]
__all__ += ["PrototypeRouter", "RouterConfig"]
