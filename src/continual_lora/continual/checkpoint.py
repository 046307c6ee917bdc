"""What a run has produced so far (:class:`RunState`) and its checkpoint on disk, written atomically.

``<run dir>/checkpoint/`` holds ``state.json`` (the RunState: accuracy rows so far, losses, method
and kind records, the run's config, the SHA-256 of every method file) and ``method/`` (the method's
adapters as safetensors + JSON, see ``Method.save``). A new checkpoint is built beside the old one
and swapped in by two renames; a crash between them leaves ``.checkpoint.old``, which
:func:`read_checkpoint` recovers. A file whose bytes no longer match its recorded SHA-256 (a
same-size corruption would otherwise load silently) is refused with a message naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError

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
    # a task router's share (percent) of each task's test samples routed to that task, at the latest
    # evaluation: of the per-task matrix (route: all) and of X-TAIL
    task_id_accuracy: dict[str, float] = field(default_factory=dict)
    xtail_task_id_accuracy: dict[str, float] = field(default_factory=dict)
    task_seconds: list[float] = field(default_factory=list)
    train_losses: list[float | None] = field(default_factory=list)  # mean loss of each task's last 10 % of steps
    grad_norms: list[float | None] = field(default_factory=list)  # mean pre-clip gradient norm, same steps
    trainable_params: list[int] = field(default_factory=list)  # parameters trained on each task
    task_steps: list[int] = field(default_factory=list)  # optimiser steps each task took (sum: the global step)
    elapsed_s: float = 0.0
    method_state: dict[str, Any] = field(default_factory=dict)
    kind_state: dict[str, Any] = field(default_factory=dict)  # a kind's own record (instruction tuning: MIF log)
    config: dict[str, Any] = field(default_factory=dict)  # the run's effective config (resume compares it)
    checksums: dict[str, str] = field(default_factory=dict)  # SHA-256 of each method file, by relative path

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
    state.checksums = {path.relative_to(tmp).as_posix(): sha256(path)
                       for path in sorted((tmp / METHOD).rglob("*")) if path.is_file()}
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=1, allow_nan=False))
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
    path = final / STATE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        state = RunState(**{k: v for k, v in data.items() if k in {f.name for f in fields(RunState)}})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{path} is unreadable or corrupt ({err}); start the run again with --overwrite") from None
    state.grad_norms += [None] * (len(state.train_losses) - len(state.grad_norms))  # older checkpoints
    for rel, digest in state.checksums.items():
        file = final / rel
        if not file.is_file() or sha256(file) != digest:
            raise CheckpointError(f"{file} is missing or does not match the SHA-256 recorded in {path} (corrupted on "
                                  "disk?); restore it, or start the run again with --overwrite")
    return state


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def method_dir(directory: Path) -> Path:
    """Where the checkpoint in ``directory`` keeps the method's files."""
    return directory / CHECKPOINT / METHOD
