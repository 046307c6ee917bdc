"""``continual-lora``: run, export, pretrain, metrics, compare, bench.

The only place that sees argparse and YAML: text becomes typed config objects here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from .adapters import ExportError
from .config import ConfigError, from_dict


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2e-3`` as a string; accept the YAML 1.2 / Python float forms too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# --- YAML + key=value ---------------------------------------------------------------------
def parse_overrides(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        out.append((key.split("."), _yaml(value) if value != "" else None))
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``train.lr=1e-3`` sets data["train"]["lr"]; ``methods.<label>.rank=4`` edits that method entry."""
    for keys, value in parse_overrides(overrides):
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            if isinstance(node, list):  # methods.<label or index>
                match = [m for m in node if str(m.get("label", m.get("name"))) == key]
                if not match and key.isdigit() and int(key) < len(node):
                    match = [node[int(key)]]
                if not match:
                    labels = [m.get("label", m.get("name")) for m in node]
                    raise ConfigError(f"override {'.'.join(keys)}: no method {key!r} (have {labels})")
                node = match[0]
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section")
        node[keys[-1]] = value
    return data


def load_yaml(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    data = _yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return apply_overrides(data, overrides)


# --- commands -----------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .app.compare import compare
    from .app.runner import RunConfig, build_methods, run_method
    from .runtime import process_rank

    config = from_dict(RunConfig, load_yaml(args.config, args.overrides))
    methods = build_methods(config)  # validates every method before any training
    if args.method:
        unknown = sorted(set(args.method) - set(methods))
        if unknown:
            raise ConfigError(f"--method {unknown}: not in the config (have {sorted(methods)})")
        methods = {k: v for k, v in methods.items() if k in args.method}
    main_process = process_rank() == 0  # under torchrun / accelerate launch only rank 0 reports
    run_dirs = []
    for label, method in methods.items():
        results = run_method(config, label, method, resume=args.resume, overwrite=args.overwrite)
        run_dirs.append(Path(config.output_dir) / config.name / label)
        if main_process:
            print(f"[{label}] " + json.dumps(results["metrics"]) + f"  ({results['wall_time_s']:.0f} s)")
    if not main_process:
        return 0
    root = Path(config.output_dir) / config.name
    print()
    print(compare(run_dirs, plot_path=root / "comparison.png"))
    print()
    for d in run_dirs:
        print(f"plots: {d / 'accuracy_matrix.png'}  {d / 'curves.png'}")
    print(f"comparison plot: {root / 'comparison.png'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .app.export import MANIFEST, export_hf, export_peft

    export = export_hf if args.format == "hf" else export_peft
    paths = export(args.run_dir, args.out, task=args.task, all_tasks=args.all_tasks, overwrite=args.overwrite)
    manifest = json.loads((Path(args.out) / MANIFEST).read_text())
    cls = manifest["model_class"]
    for path in paths:
        print(path)
    print(f"\nload with transformers{'' if args.format == 'hf' else ' + peft'} ({manifest['apply']}):")
    print(f"    from transformers import {cls}")
    if args.format == "hf":
        print(f"    model = {cls}.from_pretrained({str(paths[0])!r})")
        return 0
    print(f"    from peft import PeftModel\n    model = {cls}.from_pretrained({manifest['base_model_name_or_path']!r})")
    if len(paths) > 1 and manifest["chain"]:
        print(f"    for adapter in {[str(p) for p in paths]!r}:\n"
              "        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()")
    else:
        print(f"    model = PeftModel.from_pretrained(model, {str(paths[0])!r})")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .models.small_clip import PretrainConfig, pretrain

    data = load_yaml(args.config, args.overrides) if args.config else apply_overrides({}, args.overrides)
    data = data.get("pretrain", data) if "pretrain" in data else data
    config = from_dict(PretrainConfig, data, path="pretrain")
    print(pretrain(config, progress=True))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from .metrics import MatrixFormatError, metrics_command

    try:
        print(json.dumps(metrics_command(args.matrix, protocol=args.protocol)))
    except (MatrixFormatError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .app.compare import compare

    plot = args.plot or Path(args.run_dirs[0]).parent / "comparison.png"
    print(compare(args.run_dirs, plot_path=plot))
    print(f"\ncomparison plot: {plot}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .app.speed import format_speed_report, run_speed_bench

    result = run_speed_bench(method=args.method, size=args.size, batch_size=args.batch_size, steps=args.steps,
                             device=args.device)
    print(format_speed_report(result))
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="continual-lora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train methods through a benchmark and write runs/<name>/<method>/")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iterations=50 seed=1")
    p.add_argument("--resume", action="store_true", help="continue from the last completed task")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.add_argument("--method", action="append", help="run only this method label (repeatable)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="a finished run as a plain transformers model (hf) or stock peft adapters (peft)")
    p.add_argument("run_dir", help="a finished method run: runs/<name>/<method label>")
    p.add_argument("--format", choices=["hf", "peft"], required=True,
                   help="hf: save_pretrained of the merged model; peft: stock peft LoRA adapter directories")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--task", help="task-id methods (lilora, per_task_lora): the task to export")
    which.add_argument("--all-tasks", action="store_true",
                       help="task-id methods: every task (hf: --out/<task>/ each; peft's default)")
    p.add_argument("--out", required=True, help="the directory to write (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pretrain", help="pretrain (or find cached) the small CLIP of the embedded benchmarks")
    p.add_argument("config", nargs="?", help="YAML with a pretrain: section or bare pretrain keys")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("metrics", help="metrics of an accuracy-matrix CSV, as JSON")
    p.add_argument("matrix")
    p.add_argument("--protocol", choices=["mtil", "cvit"], default="mtil")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("compare", help="markdown table + plot over run directories")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--plot", help="where to write the comparison plot")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="speed benchmark: step-time and merged-inference ratios")
    p.add_argument("--method", default="lora", help="lora | lilora | rank1_pool")
    p.add_argument("--size", default="vitb16", choices=["vitb16", "tiny"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, ExportError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
