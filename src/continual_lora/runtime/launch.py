"""The launcher environment: which runtime this process is.

torchrun and ``accelerate launch`` set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
accelerate's DeepSpeed configs also set ACCELERATE_USE_DEEPSPEED and the ZeRO settings (read by
:mod:`.zero`). :func:`runtime_from_env` initialises ``torch.distributed`` (gloo on CPU, nccl on
CUDA) when a launcher asked for several processes or for DeepSpeed, and returns the matching
:class:`~.base.Runtime`.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ConfigError
from .base import Runtime
from .ddp import DataParallel
from .zero import deepspeed_requested, select_accelerator, zero_settings


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's global rank (0 without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _check_accelerate_precision(precision: str) -> None:
    """accelerate's ``mixed_precision`` is not read (precision is ``train.precision``): refuse a
    launcher config that asks for another one rather than ignore it."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if asked not in ("no", precision):
        raise ValueError(f"the accelerate config sets mixed_precision={asked!r}, which the trainer does not read; "
                         f"set train.precision={asked} in the run config and keep mixed_precision 'no'")


def runtime_from_env(device: str = "cpu", precision: str = "fp32", batch_size: int | None = None,
                     grad_accum: int = 1, max_grad_norm: float | None = None) -> Runtime:
    """One process, or one rank of torchrun / accelerate launch; DeepSpeed ZeRO when accelerate's
    config asks for it (``batch_size`` etc. then fill DeepSpeed's batch settings, see .zero)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device} but this machine has no CUDA device torch can use; "
                          "set train.device=cpu")
    world = launched_world_size()
    use_deepspeed = deepspeed_requested()
    _check_accelerate_precision(precision)
    if world <= 1 and not use_deepspeed:
        return Runtime(device, precision)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    ds_config = None
    if use_deepspeed:
        if batch_size is None:
            raise ValueError("DeepSpeed needs the run's batch size: runtime_from_env(..., batch_size=...)")
        select_accelerator(device)  # before anything imports deepspeed
        ds_config = zero_settings(batch_size, grad_accum, world, max_grad_norm, precision)
    if not dist.is_initialized():
        # long timeout: rank 0 may fill the data / model caches while the others wait (main_first)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=1))
        atexit.register(_destroy)
    if dist.get_world_size() == 1:  # accelerate launch with one process: ZeRO(-Offload) on one device
        return Runtime(device, precision, deepspeed=ds_config)
    return DataParallel(device, precision, dist.get_rank(), dist.get_world_size(), local_rank, deepspeed=ds_config)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
