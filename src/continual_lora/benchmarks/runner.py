"""Run a config: benchmark tasks x methods -> ``runs/<name>/<label>/`` with results, CSV and plots.

``RunConfig`` is typed data (the CLI builds it from YAML + ``key=value`` overrides). Each
method entry is ``{name: <registered method>, label: <dir name, default = name>, ...its
config keys}``; the method's own config dataclass validates the keys.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__, metrics
from ..adapters import parameter_counts
from ..continual.clip_kind import ClipClassification
from ..continual.config import ConfigError, from_dict, to_dict
from ..continual.distributed import Runtime
from ..continual.engine import ContinualTrainer, RunState, TrainConfig
from ..methods import METHODS, Method
from . import plots
from .cvit import build_cvit_run
from .cvit_mini import build_cvit_mini_run
from .llava_mini import LlavaMiniConfig
from .models import ModelConfig, check_model, load_clip
from .mtil_mini import ORDERS, build_mtil_mini
from .pretrain import PretrainConfig

RESULTS = "results.json"


@dataclass
class BenchmarkConfig:
    """Which embedded benchmark and how it is cut."""

    name: str = "mtil-mini"  # the task stream (mtil-mini: CLIP image classification)
    order: str = "I"  # task order: "I" (alphabetical) or "II"
    shots: int | None = 5  # images per class for training; None = full-shot
    image_size: int = 32  # pixels per side fed to the model
    max_train_per_task: int = 2000  # class-balanced cap on a full-shot training set
    max_test_per_task: int = 300  # class-balanced cap on each test set (CPU-sized evaluation)
    domains: list[str] | None = None  # keep only these domains (in the order's sequence)
    xtail: bool = False  # also evaluate X-TAIL: classify over the union of all class names
    train_templates: str = "first"  # prompts for training captions: "first" (DAC release) or "all"
    llava: LlavaMiniConfig = field(default_factory=LlavaMiniConfig)  # cvit-mini: LLaVA-mini assembly + projector alignment
    model_path: str | None = None  # cvit: LLaVA checkpoint folder or HF id already cached (never downloaded)
    instruction_root: str | None = None  # cvit: <root>/<Task>/train.json + test.json (or val.json), LLaVA format
    image_root: str | None = None  # cvit: folder the instruction files' image paths are relative to
    max_new_tokens: int | None = None  # cvit, cvit-mini: greedy tokens per answer (None: by answer format)
    evaluate_future: bool = True  # cvit, cvit-mini: false = after task k score tasks 0..k only (CVIT's triangle)

    def __post_init__(self) -> None:
        if self.name not in BENCHMARK_BUILDERS:
            raise ValueError(f"benchmark.name: unknown benchmark {self.name!r} (available: {sorted(BENCHMARK_BUILDERS)})")
        if self.order not in ORDERS:
            raise ValueError(f"benchmark.order must be one of {sorted(ORDERS)}, got {self.order!r}")
        if self.shots is not None and self.shots <= 0:
            raise ValueError(f"benchmark.shots must be > 0 or null, got {self.shots}")
        if self.train_templates not in ("first", "all"):
            raise ValueError(f"benchmark.train_templates must be 'first' or 'all', got {self.train_templates!r}")


@dataclass
class RunConfig:
    """One experiment: a benchmark, a base model, a training budget and one or more methods."""

    name: str = "run"  # results go to <output_dir>/<name>/<method label>/
    output_dir: str = "runs"  # root of all run directories
    seed: int = 0  # data split, initialisation and batch order
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # the CLIP to adapt: pretrained-tiny, hf (local) or random
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logit_scale: float = 100.0  # logits = scale * cosine (frozen, as in the DAC release)
    methods: list[dict] = field(default_factory=lambda: [{"name": "seq_lora"}])  # method entries

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
        "config": {**to_dict(config), "methods": [to_dict(method.config)], "label": label},
        "versions": versions(),
    })
    return out


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    tmp = run_dir / f".{RESULTS}.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(run_dir / RESULTS)
    if results["finished"]:
        metrics.write_matrix_csv(run_dir / "accuracy_matrix.csv", results["tasks"], results["matrix"],
                                 zero_shot=results["zero_shot"])
        plots.accuracy_heatmap(results, run_dir / "accuracy_matrix.png")
        plots.task_curves(results, run_dir / "curves.png")


def load_clip_model(config: RunConfig) -> tuple[torch.nn.Module, Any]:
    """The CLIP the benchmark starts from and its tokenizer (callable: texts -> (ids, mask))."""
    return load_clip(config.model, config.pretrain, seed=config.seed, progress=config.train.progress)


def build_mtil_mini_run(config: RunConfig) -> tuple[torch.nn.Module, Any, list[Any]]:
    """(model, task kind, tasks) of the mtil-mini benchmark."""
    bench = config.benchmark
    try:
        tasks = build_mtil_mini(order=bench.order, shots=bench.shots, image_size=bench.image_size, seed=config.seed,
                                max_train_per_task=bench.max_train_per_task,
                                max_test_per_task=bench.max_test_per_task, domains=bench.domains)
    except ValueError as err:
        raise ConfigError(f"benchmark: {err}") from err
    model, tokenizer = load_clip_model(config)
    kind = ClipClassification(tokenizer, tasks, device=config.train.device, logit_scale=config.logit_scale,
                              train_templates=bench.train_templates)
    return model, kind, tasks


# benchmark name -> builder(config) -> (model, task kind, tasks)
BENCHMARK_BUILDERS: dict[str, Callable[[RunConfig], tuple[torch.nn.Module, Any, list[Any]]]] = {
    "mtil-mini": build_mtil_mini_run,
    "cvit-mini": build_cvit_mini_run,  # LLaVA-mini instruction tuning on bundled data (cvit_mini.py)
    "cvit": build_cvit_run,  # LLaVA-1.5 on the CVIT instruction files (cvit.py; local files only)
}


def run_method(config: RunConfig, label: str, method: Method, resume: bool = False,
               overwrite: bool = False, log: Any = print) -> dict[str, Any]:
    """Train ``method`` through the benchmark; write and return its results.

    Under torchrun / accelerate launch every rank calls this; rank 0 alone writes the run
    directory (see :mod:`continual_lora.continual.distributed`).
    """
    check_model(config.model, config.benchmark.image_size)  # a missing model fails before anything runs
    runtime = Runtime.for_training(config.train)
    if runtime.device != config.train.device:  # "cuda" -> this rank's "cuda:<local rank>"
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=runtime.device))
    run_dir = Path(config.output_dir) / config.name / label
    runtime.on_main(prepare_run_dir, run_dir, resume, overwrite)
    with runtime.main_first():  # rank 0 fills the data and model caches, then the others read them
        model, kind, tasks = BENCHMARK_BUILDERS[config.benchmark.name](config)
    train = config.train
    if train.seed != config.seed:
        train = TrainConfig(**{**to_dict(train), "seed": config.seed})

    def results_of(state: RunState) -> dict[str, Any]:
        out = {**results_dict(config, label, method, state, model, kind.protocol), "runtime": runtime.describe()}
        return kind.extra_results(out) if hasattr(kind, "extra_results") else out  # a kind's own numbers (cvit: MIF)

    trainer = ContinualTrainer(
        model, method, kind, tasks, train, checkpoint_dir=run_dir, xtail=config.benchmark.xtail,
        on_task_end=(lambda state: write_results(run_dir, results_of(state))) if runtime.is_main else None,
        runtime=runtime,
    )
    if runtime.is_main:
        log(f"[{label}] {len(tasks)} tasks: {', '.join(t.name for t in tasks)} -> {run_dir}")
    state = trainer.run(resume=resume)
    results = results_of(state)
    if runtime.is_main:
        write_results(run_dir, results)
    runtime.barrier()
    return results


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no {RESULTS} (not a run directory)")
    return json.loads(path.read_text())


def compare(run_dirs: list[str | Path], plot_path: str | Path | None = None) -> str:
    """Markdown table (method x metric, mean ± std over runs with the same label) + a plot.

    Plain files among ``run_dirs`` are skipped (``runs/x/*`` also matches the comparison plot a
    previous run wrote there); a directory without results is an error."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        if Path(d).is_file():
            continue
        res = load_results(d)
        if not res.get("finished"):
            raise ValueError(f"{d}: run is not finished")
        grouped.setdefault(res.get("label", res["method"]), []).append(res)
    names = list(next(iter(grouped.values()))[0]["metrics"])
    rows: dict[str, dict[str, Any]] = {}
    for label, runs in grouped.items():
        row: dict[str, Any] = {}
        for key in names:
            vals = torch.tensor([r["metrics"][key] for r in runs], dtype=torch.float64)
            row[key] = (float(vals.mean()), float(vals.std())) if len(runs) > 1 else float(vals[0])
        row["trainable"] = f"{runs[0]['params']['trainable']:,}"
        row["stored"] = f"{runs[0]['params']['stored']:,}"
        row["wall_time_s"] = f"{sum(r['wall_time_s'] for r in runs) / len(runs):.0f}"
        row["seeds"] = str(len(runs))
        rows[label] = row
    if plot_path is not None:
        plots.comparison(rows, names, plot_path)
    return metrics.format_metrics_table(rows, names + ["trainable", "stored", "wall_time_s", "seeds"])
