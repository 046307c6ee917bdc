"""Run a config: benchmark tasks x methods -> ``runs/<name>/<label>/`` with results, CSV and plots.

``RunConfig`` is typed data (the CLI builds it from YAML + ``key=value`` overrides). Its
``benchmark:`` section is the named benchmark's own config class; each method entry is
``{name: <registered method>, label: <dir name, default = name>, ...its config keys}``, validated
by the method's own config dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import shutil
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
from ..storage import atomic_write
from ..version import __version__
from . import plots
from .tracking import LoggingConfig, RunLogger, check_trackers

RESULTS = "results.json"


@dataclass
class RunConfig:
    """One experiment: a benchmark, a base model, a training budget and one or more methods."""

    name: str = "run"  # results go to <output_dir>/<name>/<method label>/
    output_dir: str = "runs"  # root of all run directories
    seed: int = 0  # data split, initialisation and batch order
    # the benchmark's own config class, picked by its name (benchmarks/__init__.py)
    benchmark: BenchmarkConfig = field(default_factory=MtilMiniConfig, metadata={"parse": parse_benchmark})
    model: ModelConfig = field(default_factory=ModelConfig)  # the CLIP to adapt: pretrained-tiny, hf (local) or random
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logit_scale: float = 100.0  # logits = scale * cosine (frozen, as in the DAC release)
    methods: list[dict] = field(default_factory=lambda: [{"name": "seq_lora"}])  # method entries
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # trackers besides <run dir>/metrics.jsonl

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods: list at least one method")
        labels = [m.get("label", m.get("name")) for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"methods: labels must be unique, got {labels}")


def build_methods(config: RunConfig) -> dict[str, Method]:
    """Validate every method entry into ``label -> Method`` (fails before any training)."""
    out: dict[str, Method] = {}
    for i, entry in enumerate(config.methods):
        entry = dict(entry)
        name = entry.pop("name", None)
        label = entry.pop("label", name)
        if name not in METHODS:
            raise ConfigError(f"methods[{i}].name: unknown method {name!r}; known: {sorted(METHODS)}")
        cls = METHODS[name]
        out[str(label)] = cls(from_dict(cls.config_cls, entry, path=f"methods.{label}"))
    return out


def run_settings(config: RunConfig) -> RunSettings:
    """What a benchmark builder reads from the run config besides its own section."""
    return RunSettings(seed=config.seed, device=config.train.device, progress=config.train.progress,
                       model=config.model, pretrain=config.pretrain, logit_scale=config.logit_scale)


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"continual_lora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a finished or partial run unless asked to."""
    results = run_dir / RESULTS
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    elif results.exists() and json.loads(results.read_text()).get("finished"):
        raise FileExistsError(f"{run_dir} already holds a finished run; pass --overwrite or pick another name")
    elif run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise FileExistsError(f"{run_dir} holds a partial run; pass --resume to continue it or --overwrite")
    run_dir.mkdir(parents=True, exist_ok=True)


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
    if state.finished:
        scores = metrics.PROTOCOLS[protocol](matrix)
        out["metrics"] = scores
        out["per_task"] = {
            "transfer": metrics.per_task_transfer(matrix),
            "average": metrics.per_task_average(matrix),
            "last": metrics.per_task_last(matrix),
        }
        if state.xtail_matrix:
            out["xtail"] = {"zero_shot": state.xtail_zero_shot, "matrix": state.xtail_matrix,
                            "metrics": metrics.PROTOCOLS[protocol](state.xtail_matrix)}
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


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    atomic_write(run_dir / RESULTS, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)), mode=0o644)
    if results["finished"]:
        metrics.write_matrix_csv(run_dir / "accuracy_matrix.csv", results["tasks"], results["matrix"],
                                 zero_shot=results["zero_shot"])
        plots.accuracy_heatmap(results, run_dir / "accuracy_matrix.png")
        plots.task_curves(results, run_dir / "curves.png")


def run_method(config: RunConfig, label: str, method: Method, resume: bool = False,
               overwrite: bool = False, log: Any = print) -> dict[str, Any]:
    """Train ``method`` through the benchmark; write and return its results.

    Under torchrun / accelerate launch every rank calls this; rank 0 alone writes the run
    directory (see :mod:`continual_lora.runtime`).
    """
    benchmark = BENCHMARKS[config.benchmark.name]
    benchmark.check(config.benchmark, run_settings(config))  # e.g. a missing model fails before anything runs
    check_trackers(config.logging)
    runtime = runtime_for(config.train)
    if runtime.device != config.train.device:  # "cuda" -> this rank's "cuda:<local rank>"
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=runtime.device))
    run_dir = Path(config.output_dir) / config.name / label
    runtime.on_main(prepare_run_dir, run_dir, resume, overwrite)
    with runtime.main_first():  # rank 0 fills the data and model caches, then the others read them
        model, kind, tasks, xtail = benchmark.build(config.benchmark, run_settings(config))
    train = config.train
    if train.seed != config.seed:
        train = TrainConfig(**{**to_dict(train), "seed": config.seed})

    def results_of(state: RunState) -> dict[str, Any]:
        out = {**results_dict(config, label, method, state, model, kind.protocol), "runtime": runtime.describe()}
        return kind.extra_results(out)  # a kind's own numbers (cvit: MIF)

    logger = None  # metrics.jsonl and the trackers: rank 0 only
    if runtime.is_main:
        logger = RunLogger(run_dir, config.logging, name=config.name, label=label,
                           store=Path(config.output_dir) / config.name, config=run_record(config, label, method),
                           protocol=kind.protocol)

    def task_end(state: RunState) -> None:
        results = results_of(state)
        write_results(run_dir, results)
        logger.task_end(state, results)

    trainer = ContinualTrainer(
        model, method, kind, tasks, train, checkpoint_dir=run_dir, xtail=xtail, runtime=runtime,
        on_task_end=task_end if logger else None, on_step=logger.step if logger else None,
        on_start=logger.start if logger else None,
    )
    if runtime.is_main:
        log(f"[{label}] {len(tasks)} tasks: {', '.join(t.name for t in tasks)} -> {run_dir}")
    try:
        state = trainer.run(resume=resume)
    except BaseException:
        if logger is not None:
            logger.close(ok=False)
        raise
    results = results_of(state)
    if logger is not None:
        write_results(run_dir, results)
        logger.finish(results)
    runtime.barrier()
    return results
