"""Run a config: benchmark tasks x methods -> ``runs/<name>/<label>/`` with results, CSV and plots.

``RunConfig`` is typed data (the CLI builds it from YAML + ``key=value`` overrides). Its
``benchmark:`` section is the named benchmark's own config class; each method entry is
``{name: <registered method>, label: <dir name, default = name>, ...its config keys}``, validated
by the method's own config dataclass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import metrics
from ..adapters import parameter_counts
from ..benchmarks import BENCHMARKS, BenchmarkConfig, RunSettings, parse_benchmark
from ..benchmarks.mtil_mini import MtilMiniConfig
from ..config import ConfigError, from_dict, to_dict
from ..continual import ContinualTrainer, RunState, TrainConfig, runtime_for
from ..methods import METHODS, Method
from ..models import ModelConfig, PretrainConfig
from ..version import __version__
from .rundir import RunDirectory, finished_results, write_artefacts, write_results
from .tracking import LoggingConfig, RunLogger, check_trackers


@dataclass
class RunConfig:
    """One experiment: a benchmark, a base model, a training budget and one or more methods."""

    name: str = "run"  # results go to <output_dir>/<name>/<method label>/
    group: str = ""  # `compare` averages runs of one group and method label (a sweep's variant over seeds); "": by label
    output_dir: str = "runs"  # root of all run directories
    seed: int = 0  # data split, initialisation and batch order
    # the benchmark's own config class, picked by its name (benchmarks/__init__.py)
    benchmark: BenchmarkConfig = field(default_factory=MtilMiniConfig, metadata={"parse": parse_benchmark})
    model: ModelConfig = field(default_factory=ModelConfig)  # the CLIP to adapt: pretrained-tiny, hf (local) or random
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # the small CLIP; mix: null = the benchmark's
    train: TrainConfig = field(default_factory=TrainConfig)
    logit_scale: float = 100.0  # logits = scale * cosine (frozen, as in the DAC release)
    methods: list[dict] = field(default_factory=lambda: [{"name": "seq_lora"}])  # method entries
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # trackers besides <run dir>/metrics.jsonl

    def __post_init__(self) -> None:
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"logit_scale must be a finite number > 0 (logits = scale * cosine), got {self.logit_scale}")
        if not self.methods:
            raise ValueError("methods: list at least one method")
        labels = [m.get("label", m.get("name")) for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"methods: labels must be unique, got {labels}")
        self.pretrain = self.pretrain.with_mix(self.benchmark.small_clip_mix())  # recorded by name in results.json
        for entry, label in zip(self.methods, labels):
            if entry.get("train") is not None and not isinstance(entry["train"], dict):
                raise ValueError(f"methods.{label}.train must be a mapping of train keys, got {entry['train']!r}")
            self._method_train(str(label))  # a bad per-method train key fails here

    def _method_train(self, label: str) -> TrainConfig | None:
        entry = next(m for m in self.methods if str(m.get("label", m.get("name"))) == label)
        if not entry.get("train"):
            return None
        return from_dict(TrainConfig, {**to_dict(self.train), **entry["train"]}, path=f"methods.{label}.train")

    def for_method(self, label: str) -> RunConfig:
        """The config method ``label`` trains under: the keys of its entry's ``train:`` mapping (e.g. its
        own ``lr``) replace the run's ``train:`` values; without one, this config."""
        train = self._method_train(label)
        return self if train is None else dataclasses.replace(self, train=train)


def build_methods(config: RunConfig) -> dict[str, Method]:
    """Validate every method entry into ``label -> Method`` (fails before any training)."""
    out: dict[str, Method] = {}
    for i, entry in enumerate(config.methods):
        entry = dict(entry)
        name = entry.pop("name", None)
        label = entry.pop("label", name)
        entry.pop("train", None)  # the method's own train keys: RunConfig.for_method
        if name not in METHODS:
            raise ConfigError(f"methods[{i}].name: unknown method {name!r}; known: {sorted(METHODS)}")
        cls = METHODS[name]
        out[str(label)] = cls(from_dict(cls.config_cls, entry, path=f"methods.{label}"))
    return out


def run_settings(config: RunConfig) -> RunSettings:
    """What a benchmark builder reads from the run config besides its own section."""
    return RunSettings(seed=config.seed, device=config.train.device, progress=config.train.progress,
                       num_workers=config.train.num_workers, model=config.model, pretrain=config.pretrain,
                       logit_scale=config.logit_scale)


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"continual_lora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_record(config: RunConfig, label: str, method: Method) -> dict[str, Any]:
    """The run config of one method as results.json records it (export reads it back)."""
    return {**to_dict(config), "methods": [to_dict(method.config)], "label": label}


def results_dict(config: RunConfig, label: str, method: Method, state: RunState, model: torch.nn.Module,
                 protocol: str) -> dict[str, Any]:
    matrix = state.matrix
    out: dict[str, Any] = {
        "method": method.name,
        "label": label,
        "tasks": state.tasks,
        "zero_shot": state.zero_shot,
        "matrix": matrix,
        "finished": state.finished,
        "seed": config.seed,
    }
    if config.group:
        out["group"] = config.group
    if state.finished:
        scores = metrics.PROTOCOLS[protocol](matrix)
        out["metrics"] = scores
        out["per_task"] = {
            "transfer": metrics.per_task_transfer(matrix),
            "average": metrics.per_task_average(matrix),
            "last": metrics.per_task_last(matrix),
        }
        if state.task_id_accuracy:  # a task router replaced the task id (route: all)
            out["task_id_accuracy"] = state.task_id_accuracy
        if state.xtail_matrix:
            out["xtail"] = {"zero_shot": state.xtail_zero_shot, "matrix": state.xtail_matrix,
                            "metrics": metrics.PROTOCOLS[protocol](state.xtail_matrix)}
            if state.xtail_task_id_accuracy:  # a task router picked the adapter of each test sample
                out["xtail"]["task_id_accuracy"] = state.xtail_task_id_accuracy
    counts = parameter_counts(model)
    out["params"] = {
        "trainable": max(state.trainable_params, default=0),
        "trainable_per_task": state.trainable_params,
        "stored": counts["stored"],
        "shared": counts["shared"],
        "per_task": counts["per_task"],
        "base": counts["base"],
    }
    out.update({
        "wall_time_s": round(state.elapsed_s, 2),
        "task_seconds": [round(s, 2) for s in state.task_seconds],
        "train_losses": state.train_losses,
        "grad_norms": state.grad_norms,
        "peak_memory_mb": round(peak_memory_mb(config.train.device), 1),
        "config": run_record(config, label, method),
        "versions": versions(),
    })
    return out


# resume: changes with no effect on results
ALWAYS_ALLOWED_CHANGES = ("output_dir", "group", "train.progress", "train.dump_replicas", "train.num_workers")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """12 hex digits of SHA-256 over every tensor's name, shape, dtype and up to 4096 evenly spaced values:
    recorded in results.json, so that a rebuilt cache that changes the base model is visible."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return digest.hexdigest()[:12]


def run_method(config: RunConfig, label: str, method: Method, resume: bool = False, overwrite: bool = False,
               log: Any = print, allow_changes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train ``method`` through the benchmark; write and return its results.

    ``resume``: continue from the run directory's checkpoint (a finished run only gets its artefacts
    written again); ``allow_changes``: config keys that may differ from the checkpoint's. Under
    torchrun / accelerate launch every rank calls this; rank 0 alone writes the run directory (see
    :mod:`continual_lora.runtime`) and holds its lock.
    """
    config = config.for_method(label)  # its own train keys, recorded as the run's train section
    benchmark = BENCHMARKS[config.benchmark.name]
    benchmark.check(config.benchmark, run_settings(config))  # e.g. a missing model fails before anything runs
    check_trackers(config.logging)
    runtime = runtime_for(config.train)
    if runtime.device != config.train.device:  # "cuda" -> this rank's "cuda:<local rank>"
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=runtime.device))
    directory = RunDirectory(Path(config.output_dir) / config.name / label)
    if resume and not overwrite and (done := finished_results(directory.path)) is not None:
        if runtime.is_main:
            write_artefacts(directory.path, done)
            log(f"[{label}] already finished in {directory.path}: nothing to train (plots and CSV written again)")
        runtime.barrier()
        return done
    runtime.on_main(directory.acquire)
    try:
        runtime.on_main(directory.prepare, resume, overwrite)
        results = _run(config, label, method, benchmark, runtime, directory, resume, log,
                       ALWAYS_ALLOWED_CHANGES + tuple(allow_changes))
    except BaseException:
        if runtime.is_main:
            directory.abandon()  # (--overwrite: the replaced run comes back if no checkpoint was written)
        raise
    finally:
        if runtime.is_main:
            directory.release()
    return results


def _run(config: RunConfig, label: str, method: Method, benchmark: Any, runtime: Any, directory: RunDirectory,
         resume: bool, log: Any, allow_changes: tuple[str, ...]) -> dict[str, Any]:
    with runtime.main_first():  # rank 0 fills the data and model caches, then the others read them
        model, kind, tasks, xtail = benchmark.build(config.benchmark, run_settings(config))
    base = weights_fingerprint(model)
    train = config.train
    if train.seed != config.seed:
        train = TrainConfig(**{**to_dict(train), "seed": config.seed})

    def results_of(state: RunState) -> dict[str, Any]:
        out = {**results_dict(config, label, method, state, model, kind.protocol), "runtime": runtime.describe(),
               "base_model": base, "threads": torch.get_num_threads()}
        return kind.extra_results(out)  # a kind's own numbers (cvit: MIF)

    logger = None  # metrics.jsonl and the trackers: rank 0 only
    if runtime.is_main:
        logger = RunLogger(directory.path, config.logging, name=config.name, label=label,
                           store=Path(config.output_dir) / config.name, config=run_record(config, label, method),
                           protocol=kind.protocol)

    def on_task_end(state: RunState) -> None:
        directory.started()  # a checkpoint of the new run exists: a run it replaces can go
        results = results_of(state)
        write_results(directory.path, results)
        logger.task_end(state, results)

    record = {**to_dict(config), "methods": {label: to_dict(method.config)}}
    trainer = ContinualTrainer(model, method, kind, tasks, train, checkpoint_dir=directory.path, xtail=xtail,
                               on_task_end=on_task_end if logger else None, runtime=runtime,
                               record=record, allow_changes=allow_changes,
                               log=(lambda message: log(f"[{label}] {message}")) if runtime.is_main else None,
                               on_step=logger.step if logger else None, on_start=logger.start if logger else None)
    if runtime.is_main:
        log(f"[{label}] {len(tasks)} tasks: {', '.join(t.name for t in tasks)} -> {directory.path}")
    try:
        state = trainer.run(resume=resume)
    except BaseException:
        if logger is not None:
            logger.close(ok=False)
        raise
    results = results_of(state)
    if logger is not None:
        write_results(directory.path, results)
        logger.finish(results)
    runtime.barrier()
    return results
