"""The contract between a continual method, a task kind and the trainer, typed and in one place.

Methods, kinds, the runtime and the trainer all import this module; it imports nothing of the
package, so each side can rely on the declarations without depending on the others::

    TaskKind          what a task is to the trainer: its training samples, a batch, the loss of a
                      batch, the score of a task (CLIP classification, instruction tuning)
    ContrastiveKind   a TaskKind whose image / text features methods may read (LwF-VR, ZSCL)
    TaskContext       what the trainer hands a method's hooks while a task trains (data access,
                      budget, the gather of a data-parallel run)
    Routing           a task-id method's choice of adapter per test sample when no task id is
                      given (its task router), which the kind's evaluation calls
    Gather            rows of every data-parallel rank (the identity in one process)

Every member a trainer may use is declared here, the optional ones with their defaults, so no
caller probes a kind with ``hasattr``. A method's hooks receive the context as an argument
(``begin_task``, ``loss_terms``, ``end_task``, ``train_steps``); see ``methods/base.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

Batch = Any  # what a kind's train_batch returns and its loss reads (a dict of tensors for both kinds)
Gather = Callable[[torch.Tensor], torch.Tensor]  # (b, ...) rows of this rank -> (W b, ...) rows of all ranks
ProtocolName = Literal["mtil", "cvit"]  # metric families of continual_lora.metrics.PROTOCOLS


def no_gather(x: torch.Tensor) -> torch.Tensor:
    """The gather of a single process: the rows themselves."""
    return x


def index_stream(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Consecutive seeded permutations of range(n), cut into batches (no sample repeats within a pass)."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while buf.numel() < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def slice_batch(batch: Any, start: int, stop: int, rows: int) -> Any:
    """Rows [start, stop) of every tensor / list in ``batch`` whose first dimension is ``rows``."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == rows else batch
    if isinstance(batch, dict):
        return {k: slice_batch(v, start, stop, rows) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and len(batch) == rows:
        return type(batch)(batch[start:stop]) if isinstance(batch, list) else tuple(batch[start:stop])
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, start, stop, rows) for v in batch)
    return batch


class TaskKind(abc.ABC):
    """What the trainer needs from a kind of task. Subclasses implement the four abstract methods."""

    protocol: ClassVar[ProtocolName] = "mtil"  # metric family of the accuracy matrix
    evaluate_future: bool = True  # False: after task j only tasks 0..j are scored (CVIT); the rest repeat R0

    @abc.abstractmethod
    def num_train(self, task: Any) -> int:
        """Training samples of ``task``."""

    @abc.abstractmethod
    def train_batch(self, task: Any, indices: torch.Tensor, generator: torch.Generator) -> Batch:
        """The training batch of ``task``'s samples ``indices`` (any randomness from ``generator``)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch, gather: Gather = no_gather) -> torch.Tensor:
        """Scalar training loss of ``batch``. A loss that couples the samples of the batch (contrastive
        logits, a token mean) passes its per-sample terms through ``gather`` so that every rank of a
        data-parallel run computes the loss of the global batch."""

    routing_modes: ClassVar[tuple[str, ...]] = ()  # the Routing modes evaluate() supports

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, task: Any, xtail: bool = False, routing: Routing | None = None) -> float:
        """Score (percent) of ``task``'s test set; ``xtail``: without a task id, over every task's labels;
        ``routing``: each test sample is scored with the adapter its router picks (no task id)."""

    def route_features(self, model: nn.Module, task: Any, limit: int | None = None) -> torch.Tensor:
        """(N, D) features a prototype router keeps of ``task``'s training inputs (at most ``limit``,
        a fixed choice): those the kind's evaluation routes on, of ``model`` as it is (the caller turns
        the adapters off)."""
        raise NotImplementedError(f"{type(self).__name__} has no features to route on")

    def batches(self, task: Any, batch_size: int, generator: torch.Generator,
                rows: slice | None = None) -> Generator[Batch, None, None]:
        """The training batches of ``task``, one per micro-step: consecutive seeded permutations of its
        samples (:func:`index_stream`) cut into global batches of ``batch_size``, each made by
        :meth:`train_batch`; ``rows``: the rows of each global batch this process keeps (data
        parallelism; None: all). A kind that reads its samples from disk overrides this to load
        them ahead in worker processes, with the same batches."""
        for indices in index_stream(self.num_train(task), batch_size, generator):
            batch = self.train_batch(task, indices, generator)
            yield batch if rows is None else slice_batch(batch, rows.start, rows.stop, batch_size)

    def num_test(self, task: Any) -> int:
        """Test samples of ``task`` (used to weight the scores of test-set shards)."""
        raise NotImplementedError(f"{type(self).__name__} does not count test samples")

    def test_shard(self, task: Any, rank: int, world_size: int) -> Any | None:
        """``task`` with every ``world_size``-th test sample from ``rank``, or None when the kind cannot
        shard (then every rank scores the whole test set)."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """A JSON-able record the checkpoint keeps for the kind (instruction tuning: its evaluation log)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` when a run resumes."""

    def extra_results(self, results: dict[str, Any]) -> dict[str, Any]:
        """``results`` plus the kind's own numbers (instruction tuning: MIF)."""
        return results


class ContrastiveKind(TaskKind):
    """An image-text kind whose features methods may read (LwF-VR and ZSCL distil them)."""

    logit_scale: float  # logits = logit_scale * cosine

    @abc.abstractmethod
    def image_features(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, D) unit image features of ``batch["images"]`` (differentiable)."""

    @abc.abstractmethod
    def text_features(self, model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit features of raw texts (differentiable)."""

    @abc.abstractmethod
    def class_features(self, model: nn.Module, tasks: Sequence[Any], with_grad: bool = True) -> torch.Tensor:
        """(C, D) classifier rows over the distinct class names of ``tasks``, built as evaluation builds them."""

    @abc.abstractmethod
    def random_sentences(self, n: int, words: int, generator: torch.Generator) -> list[str]:
        """``n`` sentences of ``words`` tokens from the vocabulary outside every class name of the stream."""


class Routing(abc.ABC):
    """Which trained task's adapter scores each test sample when no task id is given.

    A kind's ``evaluate(model, task, xtail, routing)`` uses it per batch of test inputs:

    * ``prototype`` mode: ``with routing.base(): f = <routing features of the batch>`` (the frozen
      model: adapters off), then ``index = routing.assign(f)``;
    * ``confidence`` mode: for each of ``routing.tasks``, ``with routing.task(name):`` score the batch
      with that task's adapter over that task's own labels; ``index`` = the most confident task;
    * then ``with routing.per_sample(index):`` one forward of the whole batch, sample n through the
      adapter of ``routing.tasks[index[n]]`` (a mixed batch), and ``routing.record(task name, index)``.

    ``cache`` holds what the kind computes once per evaluation pass (e.g. a classifier per task).
    """

    mode: Literal["prototype", "confidence"]
    tasks: list[str]  # candidate tasks, in training order: what an index refers to

    def __init__(self) -> None:
        self.cache: dict[Any, Any] = {}
        self.counts: dict[str, list[int]] = {}  # true task -> [routed to it, samples]

    @abc.abstractmethod
    def base(self) -> AbstractContextManager[None]:
        """The frozen base model (every adapter off) inside the block."""

    @abc.abstractmethod
    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) routing features -> (N,) indices into ``tasks`` (prototype mode)."""

    @abc.abstractmethod
    def task(self, name: str) -> AbstractContextManager[None]:
        """Every sample through task ``name``'s adapter inside the block."""

    @abc.abstractmethod
    def per_sample(self, index: torch.Tensor) -> AbstractContextManager[None]:
        """Sample n of the next forwards through ``tasks[index[n]]``'s adapter inside the block."""

    def record(self, true_task: str, index: torch.Tensor) -> None:
        """Count how many samples of ``true_task`` were routed to it."""
        hits = int((index == self.tasks.index(true_task)).sum()) if true_task in self.tasks else 0
        count = self.counts.setdefault(true_task, [0, 0])
        count[0] += hits
        count[1] += int(index.numel())

    def routed(self, index: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(task name, positions of the samples routed to it) for every task that was picked."""
        for i in torch.unique(index).tolist():
            yield self.tasks[i], torch.nonzero(index == i).flatten()


@dataclass(frozen=True)
class TaskContext:
    """What the trainer hands a method's hooks while a task trains.

    Methods that need data beyond the current batch use it: EWC's Fisher, replay buffers,
    distillation on reference data, joint training over every task.
    """

    task: Any  # the task being trained (every task has a ``name``: the key of its adapters and results)
    index: int  # its position in the stream
    tasks: Sequence[Any]  # the whole stream, in training order
    kind: TaskKind  # how batches are built and losses computed
    generator: torch.Generator  # seeded per task; use it for any sampling
    batch_size: int = 32  # the trainer's (global) batch size
    task_steps: tuple[int, ...] = ()  # optimiser steps the trainer budgets for each task of the stream
    gather: Gather = no_gather  # rows of every rank, for a term that couples the samples of the batch
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext  # the run's mixed precision, for a hook's own forwards

    def sample(self, task: Any, batch_size: int) -> Batch:
        """A random training batch of ``task`` (any task of the stream)."""
        idx = torch.randint(self.kind.num_train(task), (batch_size,), generator=self.generator)
        return self.kind.train_batch(task, idx, self.generator)

    def contrastive(self, method: str) -> ContrastiveKind:
        """The kind as a :class:`ContrastiveKind`; an error naming ``method`` for any other kind."""
        if not isinstance(self.kind, ContrastiveKind):
            raise TypeError(f"{method} needs an image-text task kind with features (CLIP classification), "
                            f"not {type(self.kind).__name__}")
        return self.kind
