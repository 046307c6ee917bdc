"""Training curves for experiment trackers (TensorBoard, Weights & Biases, MLflow), and always a
``metrics.jsonl`` in the run directory.

The trainer knows no tracker: it calls ``on_start(state)``, ``on_step(StepLog)`` and the runner's
``on_task_end(state)``; :class:`RunLogger` turns those into events. Only rank 0 logs (the runner
creates a logger on the main process only). ``<run dir>/metrics.jsonl`` holds one JSON object per
event, each with ``"event"`` and ``"time"`` (Unix seconds)::

    config     the run config (nested, as in results.json) and the versions            once
    zero_shot  the base model's accuracy per task (global_step 0)                      once
    step       task, task_index, step, global_step, loss, task_loss, terms, lr, grad_norm
               (every ``logging.every``-th optimiser step and each task's last)
    task       task, task_index, global_step, accuracy (the row after it), metrics (as if the
               stream ended there), params (trainable on it, stored / shared / per task / base),
               task_seconds, elapsed_s, train_loss, grad_norm (means over its last 10 % of steps)
    resume     completed_tasks: a resumed run; events of the unfinished task were dropped
    end        metrics, wall_time_s, peak_memory_mb of the finished run

Trackers get the same numbers as flat scalars at ``global_step`` (``loss/total``, ``loss/task``,
``loss/<term>``, ``train/lr``, ``train/grad_norm``; ``eval/<task>``, ``metrics/<name>``,
``params/trainable``, ``params/stored``, ``time/task_seconds``) and the run config as
hyper-parameters. Each tracker is its own client, not accelerate's tracker classes: those need
accelerate's process state (``PartialState``) even to log, which this project's runtime never
creates and which, created on rank 0 alone, can start a rendezvous the other ranks never join.

* TensorBoard: ``torch.utils.tensorboard`` into ``<run dir>/tensorboard`` (``tensorboard --logdir
  runs/<name>`` shows every method); the config as text, and at the end as hparams with the
  final metrics (``final/<name>``).
* W&B: ``wandb.init(mode="offline")`` into ``<run dir>/wandb`` (``wandb sync`` uploads it later);
  project = ``logging.project`` (default: the run name), group = the run name, name = the label.
* MLflow: ``MlflowClient`` on a file store ``<output_dir>/<name>/mlruns`` (``mlflow ui
  --backend-store-uri <that>``); experiment = the project, run name = the label. Recent MLflow
  (3.17.2 here) refuses to open a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set (the store is
  in maintenance mode); it is set to ``true`` for a ``file:`` store unless the environment sets it.

A resumed run (``--resume``) continues the same W&B / MLflow runs (ids in ``<run dir>/trackers.json``),
TensorBoard purges the steps from the resumed task on, and metrics.jsonl drops the unfinished task's events.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import metrics
from ..config import ConfigError
from ..continual import RunState, StepLog
from ..storage import atomic_write
from .rundir import finite_json

METRICS = "metrics.jsonl"
TRACKER_IDS = "trackers.json"
TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> module to import


@dataclass
class LoggingConfig:
    """The ``logging:`` section: experiment trackers besides ``metrics.jsonl`` (always written)."""

    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)  # trackers to log to; optional extras: pip install 'continual-lora[tracking]'
    project: str | None = None  # W&B project / MLflow experiment (None: the run config's name)
    every: int = 1  # log every N-th optimiser step (each task's last step is always logged)
    wandb_mode: Literal["offline", "online"] = "offline"  # "offline": files in <run dir>/wandb (`wandb sync` later); "online": stream to the W&B server
    mlflow_tracking_uri: str | None = None  # MLflow store (None: the file store <output_dir>/<name>/mlruns); a server URI or sqlite:/// also works

    def __post_init__(self) -> None:
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown:
            raise ValueError(f"logging.trackers: unknown {unknown}; choose from {list(TRACKERS)}")
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"logging.trackers: each tracker once, got {list(self.trackers)}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"logging.every must be a positive integer, got {self.every!r}")
        if self.project is not None and not self.project.strip():
            raise ValueError("logging.project must be a non-empty name or null")
        if self.wandb_mode not in ("offline", "online"):
            raise ValueError(f"logging.wandb_mode must be 'offline' or 'online', got {self.wandb_mode!r}")


def check_trackers(config: LoggingConfig) -> None:
    """Fail before any training when a tracker's package is missing."""
    missing = [t for t in config.trackers if importlib.util.find_spec(PACKAGES[t]) is None]
    if missing:
        raise ConfigError(f"logging.trackers: {', '.join(missing)} not installed; pip install "
                          f"'continual-lora[tracking]' (or {' '.join(PACKAGES[t] for t in missing)})")


def flatten(data: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config -> ``{"train.lr": 0.002, ...}``; lists as JSON text, None as "null"."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    key = prefix[:-1]
    if isinstance(data, (bool, int, float, str)):
        return {key: data}
    return {key: json.dumps(data)}


# --- trackers: each a thin adapter over its own client ------------------------------------------
class Tracker:
    """``hparams`` once, ``log`` scalars at a step, ``close``; ``ids`` to resume the same run later."""

    def hparams(self, config: dict[str, Any], final: dict[str, float] | None = None) -> None:
        pass

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, ok: bool, final: dict[str, float] | None = None) -> None:
        pass

    def ids(self) -> dict[str, str]:
        return {}


class TensorBoardTracker(Tracker):
    def __init__(self, directory: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory), purge_step=purge_step)
        self.config: dict[str, Any] = {}

    def hparams(self, config: dict[str, Any], final: dict[str, float] | None = None) -> None:
        self.config = config
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self, ok: bool, final: dict[str, float] | None = None) -> None:
        if ok and final:  # the HParams dashboard: this run's config against its final metrics
            self.writer.add_hparams(flatten(self.config), {f"final/{k}": v for k, v in final.items()}, run_name=".")
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, directory: Path, project: str, group: str, name: str, mode: str, run_id: str | None) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, group=group, name=name, dir=str(directory), mode=mode, id=run_id,
                              resume="allow" if run_id else None, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))

    def hparams(self, config: dict[str, Any], final: dict[str, float] | None = None) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, ok: bool, final: dict[str, float] | None = None) -> None:
        self.run.finish(exit_code=0 if ok else 1)

    def ids(self) -> dict[str, str]:
        return {"wandb": self.run.id}


class MlflowTracker(Tracker):
    def __init__(self, uri: str, experiment: str, name: str, run_id: str | None, tags: dict[str, str]) -> None:
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see the module docstring
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        self.resumed = run_id is not None

    def hparams(self, config: dict[str, Any], final: dict[str, float] | None = None) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        if self.resumed:  # MLflow refuses to log a parameter twice; the first start logged them
            return
        params = [Param(k, str(v)) for k, v in flatten(config).items() if len(str(v)) <= MAX_PARAM_VAL_LENGTH]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self, ok: bool, final: dict[str, float] | None = None) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def ids(self) -> dict[str, str]:
        return {"mlflow": self.run_id}


# --- the run's logger ------------------------------------------------------------------------------
def _event(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl line; None for a blank or torn line (a run killed while writing it)."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


class RunLogger:
    """metrics.jsonl + the configured trackers for one method's run directory (create on rank 0 only).

    ``config`` is the run config as results.json records it; ``protocol`` the kind's metric protocol.
    Trackers start in :meth:`start` (the trainer's ``on_start``), when a resumed run's position is known.
    """

    def __init__(self, run_dir: Path, logging: LoggingConfig, *, name: str, label: str, store: Path,
                 config: dict[str, Any], protocol: str) -> None:
        self.run_dir, self.logging, self.name, self.label = run_dir, logging, name, label
        self.store, self.config, self.protocol = store, config, protocol
        self.trackers: list[Tracker] = []
        self.path = run_dir / METRICS
        self.pending: StepLog | None = None  # the last step skipped by `every` (logged at its task's end)

    # --- events ---------------------------------------------------------------------------
    def _write(self, event: str, **fields: Any) -> None:
        with self.path.open("a") as f:
            # non-finite values (an fp16 step the loss scaler skipped) become null: the file stays JSON
            f.write(json.dumps(finite_json({"event": event, "time": round(time.time(), 3), **fields}),
                               allow_nan=False) + "\n")

    def _log(self, values: dict[str, float | None], step: int) -> None:
        scalars = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def start(self, state: RunState) -> None:
        """The trainer's ``on_start``: open the trackers; log the config and the zero-shot row (a new run)
        or drop the unfinished task's events (a resumed one)."""
        completed, first_step = state.completed, sum(state.task_steps)
        again = self.path.exists()  # an earlier attempt logged here (resumed, or restarted before any task ended)
        if again:  # keep the finished tasks' events; an attempt that finished none is dropped whole
            events = [(line, _event(line)) for line in self.path.read_text().splitlines()] if completed else []
            kept = [line for line, event in events if event is not None and event.get("task_index", -1) < completed]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)), mode=0o644)
        ids_path = self.run_dir / TRACKER_IDS
        ids = json.loads(ids_path.read_text()) if completed and ids_path.exists() else {}
        self.trackers = [self._open(kind, ids.get(kind), first_step + 1 if again else None)
                         for kind in self.logging.trackers]
        if self.trackers:
            ids_path.write_text(json.dumps({k: v for t in self.trackers for k, v in t.ids().items()}, indent=1))
        for tracker in self.trackers:
            tracker.hparams(self.config)
        if completed:
            self._write("resume", completed_tasks=completed, global_step=first_step)
            return
        self._write("config", config=self.config)
        row = dict(zip(state.tasks, state.zero_shot))
        self._write("zero_shot", global_step=0, accuracy=row)
        self._log({f"eval/{task}": acc for task, acc in row.items()}, 0)

    def _open(self, kind: str, run_id: str | None, purge_step: int | None) -> Tracker:
        project = self.logging.project or self.name
        if kind == "tensorboard":
            return TensorBoardTracker(self.run_dir / "tensorboard", purge_step)
        if kind == "wandb":
            return WandbTracker(self.run_dir, project, self.name, self.label, self.logging.wandb_mode, run_id)
        uri = self.logging.mlflow_tracking_uri or (self.store / "mlruns").resolve().as_uri()
        return MlflowTracker(uri, project, self.label, run_id, {"group": self.name, "label": self.label})

    def step(self, log: StepLog) -> None:
        """The trainer's ``on_step``: every ``every``-th step (and a task's last one, see :meth:`task_end`)."""
        if log.step % self.logging.every:
            self.pending = log
            return
        self.pending = None
        self._step(log)

    def _step(self, log: StepLog) -> None:
        self._write("step", task=log.task, task_index=log.task_index, step=log.step, global_step=log.global_step,
                    loss=log.loss, task_loss=log.task_loss, terms=log.terms, lr=log.lr, grad_norm=log.grad_norm)
        self._log({"loss/total": log.loss, "loss/task": log.task_loss, **{f"loss/{k}": v for k, v in log.terms.items()},
                   "train/lr": log.lr, "train/grad_norm": log.grad_norm}, log.global_step)

    def task_end(self, state: RunState, results: dict[str, Any]) -> None:
        """After each task's checkpoint: its accuracy row, the metrics so far, parameters and wall time."""
        if self.pending is not None:  # the task's last step, skipped by `every`
            self._step(self.pending)
            self.pending = None
        j = state.completed - 1
        step = sum(state.task_steps)
        row = dict(zip(state.tasks, state.matrix[j]))
        square = [r[: j + 1] for r in state.matrix[: j + 1]]  # the stream as if it ended after task j
        so_far = metrics.PROTOCOLS[self.protocol](square)
        params = {**{k: v for k, v in results["params"].items() if k != "trainable_per_task"},
                  "trainable": state.trainable_params[j]}
        self._write("task", task=state.tasks[j], task_index=j, global_step=step, accuracy=row, metrics=so_far,
                    params=params, task_seconds=state.task_seconds[j], elapsed_s=state.elapsed_s,
                    train_loss=state.train_losses[j], grad_norm=state.grad_norms[j])
        self._log({**{f"eval/{task}": acc for task, acc in row.items()},
                   **{f"metrics/{k}": v for k, v in so_far.items()},
                   "params/trainable": params["trainable"], "params/stored": params["stored"],
                   "time/task_seconds": state.task_seconds[j]}, step)

    def finish(self, results: dict[str, Any]) -> None:
        """The finished run: an ``end`` event, the final metrics to the trackers, trackers closed."""
        final = results.get("metrics", {})
        self._write("end", metrics=final, wall_time_s=results.get("wall_time_s"),
                    peak_memory_mb=results.get("peak_memory_mb"))
        self.close(ok=True, final=final)

    def close(self, ok: bool = False, final: dict[str, float] | None = None) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(ok, final)
