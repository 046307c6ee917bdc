"""Export a finished run to what serving stacks load: a plain transformers model or stock peft adapters.

``continual-lora export RUN_DIR --format hf|peft --out DIR [--task T | --all-tasks]`` (and
:func:`export_hf` / :func:`export_peft`) rebuild the run's base model from its ``results.json``
config (the benchmark's ``source``: the model as its source ships it), load the method's final
checkpoint into it, and write:

* ``hf``: ``save_pretrained`` of the method's inference model with its update merged (config,
  safetensors weights, and the tokenizer / processor files the base model comes with). Methods
  without a task id give their one final model; task-id methods (LiLoRA, per-task LoRA) the model
  of the chosen task (``--all-tasks``: ``DIR/<task>/`` each). ``CLIPModel.from_pretrained(DIR)`` /
  ``LlavaForConditionalGeneration.from_pretrained(DIR)`` load it with no continual-lora import.
* ``peft``: ``DIR/<adapter>/`` stock peft LoRA adapters (``Method.peft_adapters``): one per task
  for task-id methods, ``final`` for one-update methods, one per task for the Rank-1 pool to apply
  in order (each merged before the next). ``base_model_name_or_path`` names where the base loads
  from: its local directory or hub id, or, for a base the project built (the small CLIP, a random
  preset, LLaVA-mini), ``DIR/base``, written beside the adapters.

``DIR/export.json`` records what was written and how to load it. The directory is built beside
``DIR`` and renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from torch import nn

from ..adapters import ExportError, adapted_layers, merged, save_peft_lora, unload
from ..benchmarks import BENCHMARKS
from ..config import from_dict
from ..continual.checkpoint import method_dir
from ..methods import Method
from ..models.source import SourceModel
from ..storage import atomic_cache_dir
from ..version import __version__
from .rundir import RESULTS
from .runner import RunConfig, build_methods, run_settings

FORMATS = ("hf", "peft")
MANIFEST = "export.json"
BASE = "base"  # DIR/base: a project-built base model, written beside peft adapters


@dataclass
class TrainedRun:
    """A finished run directory, read back: its config, its method (untrained) and its task stream."""

    run_dir: Path
    config: RunConfig
    label: str
    method: Method
    tasks: list[str]  # in training order


def read_run(run_dir: str | os.PathLike) -> TrainedRun:
    """The finished run in ``run_dir`` (``runs/<name>/<label>``); :class:`ExportError` otherwise."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a run directory (no {RESULTS}); pass runs/<name>/<method label>")
    results = json.loads(path.read_text())
    done, total = len(results.get("matrix", [])), len(results.get("tasks", []))
    if not results.get("finished"):
        raise ExportError(f"{run_dir} is an unfinished run ({done} of {total} tasks trained); finish it with "
                          "`continual-lora run <config> --resume` before exporting")
    if not method_dir(run_dir).is_dir():
        raise ExportError(f"{run_dir} has no checkpoint ({method_dir(run_dir)} is missing)")
    data = dict(results["config"])
    bench = data.get("benchmark")
    if isinstance(bench, dict) and bench.get("name", "mtil-mini") == "mtil-mini" and "version" not in bench:
        data["benchmark"] = {**bench, "version": 1}  # written before mtil-mini v2 existed: the run was v1
    label = data.pop("label", results.get("label", results["method"]))
    entry = {k: v for k, v in data.pop("methods")[0].items() if k != "method"}  # "method": the adapter config's
    config = from_dict(RunConfig, {**data, "methods": [{"name": results["method"], "label": label, **entry}]})
    return TrainedRun(run_dir, config, label, build_methods(config)[label], list(results["tasks"]))


def source_model(run: TrainedRun) -> SourceModel:
    """The run's base model as its source ships it (on the CPU, no adapters)."""
    benchmark = BENCHMARKS[run.config.benchmark.name]
    settings = run_settings(run.config)
    return benchmark.source(run.config.benchmark, settings)


def load_method(model: nn.Module, method: Method, checkpoint: str | os.PathLike) -> nn.Module:
    """Attach ``method`` to the freshly built base ``model`` and load its checkpoint (``Method.save``'s folder)."""
    method.attach(model)
    method.load(model, str(checkpoint))
    return model.eval()


# --- choosing what to export ------------------------------------------------------------------
def select(method: Method, trained: Sequence[str], fmt: Literal["hf", "peft"], task: str | None,
           all_tasks: bool) -> list[str | None]:
    """The tasks to export: ``[None]`` for a method without a task id (its final model); for a task-id
    method the asked task, every task with ``all_tasks``, and for peft every task by default."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {FORMATS}")
    if task is not None and all_tasks:
        raise ExportError("give either --task or --all-tasks, not both")
    if not method.uses_task_id:
        if task is not None or all_tasks:
            raise ExportError(f"{method.name} needs no task id: its final model serves every task; "
                              "export it without --task / --all-tasks")
        return [None]
    if task is not None:
        if task not in trained:
            raise ExportError(f"unknown task {task!r}; the run trained {list(trained)}")
        return [task]
    if all_tasks or fmt == "peft":
        return list(trained)
    raise ExportError(f"{method.name} needs a task id at inference: pass --task (one of {list(trained)}) "
                      "or --all-tasks")


# --- the two formats on a loaded model --------------------------------------------------------
@contextlib.contextmanager
def served(model: nn.Module, method: Method, task: str | None) -> Iterator[nn.Module]:
    """The plain model (original module types) that serves ``task``: for a task-id method its task's
    update merged, the adapters back afterwards (base weights restored exactly); for any other
    method ``Method.prepare_inference`` in place: the run's one final model."""
    if method.uses_task_id:
        if task not in method.trained_tasks:
            raise ExportError(f"unknown task {task!r}; the method trained {method.trained_tasks}")
        with merged(model, task) as plain:
            yield plain
        return
    plain = method.prepare_inference(model, None)
    if adapted_layers(plain):
        unload(plain)  # the update is merged: put the original module types back
    yield plain


def save_hf_model(model: nn.Module, method: Method, directory: str | os.PathLike, task: str | None = None,
                  write_preprocessing: Callable[[Path], None] | None = None) -> Path:
    """``save_pretrained`` the inference model of ``method`` (``task`` for a task-id method) into ``directory``,
    with the base model's tokenizer / processor files. ``model`` carries the method's trained adapters."""
    out = Path(directory)
    with served(model, method, task) as plain:
        if not hasattr(plain, "save_pretrained"):
            raise ExportError(f"{type(plain).__name__} is not a transformers model (no save_pretrained); save "
                              "its state_dict after unload(model, merge=True) instead")
        out.mkdir(parents=True, exist_ok=True)
        plain.save_pretrained(out)
    if write_preprocessing is not None:
        write_preprocessing(out)
    return out


def save_peft_adapters(model: nn.Module, method: Method, directory: str | os.PathLike,
                       tasks: Sequence[str] | None = None, base_model_name_or_path: str | None = None) -> list[Path]:
    """Write the stock peft adapters of ``method`` (``Method.peft_adapters``; ``tasks``: only these, for a
    task-id method) as ``directory/<adapter>/``; returns their directories in order."""
    plan = method.peft_adapters(model)
    if tasks is not None:
        plan = {name: key for name, key in plan.items() if name in tasks}
    return [save_peft_lora(model, Path(directory) / name, key, base_model_name_or_path)
            for name, key in plan.items()]


# --- run directory -> export directory --------------------------------------------------------
def _building(out: Path, overwrite: bool) -> contextlib.AbstractContextManager[Path]:
    """A temporary sibling of ``out`` to write into, renamed to ``out`` when the block succeeds."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    return atomic_cache_dir(out, replace=True)


def _manifest(run: TrainedRun, fmt: str, model: nn.Module, entries: dict[str, Any]) -> dict[str, Any]:
    return {"format": fmt, "method": run.method.name, "label": run.label, "run_dir": str(run.run_dir.resolve()),
            "tasks": run.tasks, "model_class": type(model).__name__, "continual_lora_version": __version__,
            **entries}


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike, task: str | None = None, all_tasks: bool = False,
              overwrite: bool = False) -> list[Path]:
    """Export a finished run as plain transformers model directories; returns them (``out``, or
    ``out/<task>`` each with ``all_tasks``)."""
    run = read_run(run_dir)
    chosen = select(run.method, run.tasks, "hf", task, all_tasks)
    out = Path(out)
    source = source_model(run)
    model = load_method(source.model, run.method, method_dir(run.run_dir))
    many = all_tasks  # one directory per task under out; else out is the model directory
    with _building(out, overwrite) as tmp:
        for name in chosen:
            save_hf_model(model, run.method, tmp / name if many else tmp, name, source.write_preprocessing)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(run, "hf", model, {
            "models": list(chosen) if many else ["."], "task": None if many else chosen[0],
            "apply": "a plain transformers model" + (" per task" if many else "")}), indent=2))
    return [out / name for name in chosen] if many else [out]


def export_peft(run_dir: str | os.PathLike, out: str | os.PathLike, task: str | None = None, all_tasks: bool = False,
                overwrite: bool = False) -> list[Path]:
    """Export a finished run as stock peft LoRA adapters ``out/<adapter>/`` (and ``out/base`` for a
    project-built base model); returns the adapter directories in order (for the Rank-1 pool: the
    order to apply them in)."""
    run = read_run(run_dir)
    chosen = select(run.method, run.tasks, "peft", task, all_tasks)
    out = Path(out)
    source = source_model(run)
    base = source.source if source.source is not None else str(out.resolve() / BASE)
    with _building(out, overwrite) as tmp:
        if source.source is None:  # the project built it: write it before the adapters touch it
            source.model.save_pretrained(tmp / BASE)
            source.write_preprocessing(tmp / BASE)
        model = load_method(source.model, run.method, method_dir(run.run_dir))
        tasks = None if chosen == [None] else [name for name in chosen if name is not None]
        written = save_peft_adapters(model, run.method, tmp, tasks, base)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(run, "peft", model, {
            "base_model_name_or_path": base,
            "adapters": [p.name for p in written],
            "chain": run.method.peft_chain,
            "apply": "every adapter in order, each merged before the next" if run.method.peft_chain else
                     ("one per task: the task's adapter on the base model" if run.method.uses_task_id else
                      "the one adapter on the base model"),
        }), indent=2))
    return [out / p.name for p in written]
