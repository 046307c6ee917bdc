"""What a run has produced so far (:class:`RunState`) and its checkpoint on disk, written atomically.

``<run dir>/checkpoint/`` holds ``state.json`` (the RunState: accuracy rows so far, losses, method
and kind records) and ``method/`` (the method's adapters as safetensors + JSON, see
``Method.save``). A new checkpoint is built beside the old one and swapped in by two renames; a
crash between them leaves ``.checkpoint.old``, which :func:`read_checkpoint` recovers.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

CHECKPOINT = "checkpoint"
STATE = "state.json"
METHOD = "method"


@dataclass
class RunState:
    """Everything a run has produced so far; enough to resume at a task boundary."""

    tasks: list[str]
    zero_shot: list[float] = field(default_factory=list)
    matrix: list[list[float]] = field(default_factory=list)  # row j = after task j
    xtail_zero_shot: list[float] = field(default_factory=list)
    xtail_matrix: list[list[float]] = field(default_factory=list)
    task_seconds: list[float] = field(default_factory=list)
    train_losses: list[float | None] = field(default_factory=list)  # mean loss of each task's last 10 % of steps
    grad_norms: list[float | None] = field(default_factory=list)  # mean pre-clip gradient norm, same steps
    trainable_params: list[int] = field(default_factory=list)  # parameters trained on each task
    task_steps: list[int] = field(default_factory=list)  # optimiser steps each task took (sum: the global step)
    elapsed_s: float = 0.0
    method_state: dict[str, Any] = field(default_factory=dict)
    kind_state: dict[str, Any] = field(default_factory=dict)  # a kind's own record (instruction tuning: MIF log)

    @property
    def completed(self) -> int:
        return len(self.matrix)

    @property
    def finished(self) -> bool:
        return self.completed == len(self.tasks)


def write_checkpoint(directory: Path, state: RunState, save_method: Callable[[str], None]) -> None:
    """Write ``<directory>/checkpoint`` as a whole (``save_method(folder)`` writes the method's
    files): build it beside, then swap it in by rename."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT
    tmp = directory / f".{CHECKPOINT}.tmp"
    old = directory / f".{CHECKPOINT}.old"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    save_method(str(tmp / METHOD))
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=1))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(directory: Path) -> RunState | None:
    """The RunState of ``<directory>/checkpoint`` (its method files: :func:`method_dir`), or None
    when there is none. A crash between the two renames of :func:`write_checkpoint` is recovered."""
    final = directory / CHECKPOINT
    if not (final / STATE).exists():
        old = directory / f".{CHECKPOINT}.old"
        if not (old / STATE).exists():
            return None
        os.replace(old, final)
    state = RunState(**json.loads((final / STATE).read_text()))
    state.grad_norms += [None] * (len(state.train_losses) - len(state.grad_norms))  # older checkpoints
    return state


def method_dir(directory: Path) -> Path:
    """Where the checkpoint in ``directory`` keeps the method's files."""
    return directory / CHECKPOINT / METHOD
