"""``continual-lora``: run, export, pretrain, metrics, compare, data, bench.

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

from .config import ConfigError, from_dict
from .errors import UserError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2e-3`` as a string; accept the YAML 1.2 / Python float forms too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None


# --- YAML + key=value ---------------------------------------------------------------------
def parse_overrides(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        out.append((key.split("."), _yaml(value, f"override {item!r}") if value != "" else None))
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
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a YAML run config (e.g. configs/demo.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; give a YAML run config") from None
    data = _yaml(text, str(path)) or {}
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
    for label, method in methods.items():  # with --resume, finished methods are skipped
        results = run_method(config, label, method, resume=args.resume, overwrite=args.overwrite,
                             allow_changes=tuple(args.allow_change or ()))
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
    """The small CLIP of a run config's ``pretrain:`` section (its defaults when it has none), or of a
    YAML file of bare pretrain keys; ``mix: null`` is the run's benchmark's mix (the default benchmark's,
    mtil-mini v2, for bare keys or no file)."""
    import dataclasses

    from .app.runner import RunConfig
    from .models.small_clip import PretrainConfig, pretrain

    data = load_yaml(args.config, args.overrides) if args.config else apply_overrides({}, args.overrides)
    if set(data) <= {f.name for f in dataclasses.fields(PretrainConfig)}:
        config = from_dict(RunConfig, {"pretrain": data}).pretrain
    else:  # a run config
        config = from_dict(RunConfig, data).pretrain
    print(pretrain(config, progress=True))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from .metrics import metrics_command

    print(json.dumps(metrics_command(args.matrix, protocol=args.protocol)))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .app.compare import compare

    plot = args.plot or Path(args.run_dirs[0]).parent / "comparison.png"
    print(compare(args.run_dirs, plot_path=plot, by=args.by))
    print(f"\ncomparison plot: {plot}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """``data check mtil --root DIR`` or ``data check CONFIG [--root DIR] [key=value ...]``: print the
    table, one error line per missing dataset, and the JSON summary last; exit 2 if any is missing."""
    from .app.datacheck import format_report, mtil_report, report_for, summary
    from .app.runner import RunConfig

    if args.target == "mtil":
        if not args.root:
            raise ConfigError("data check mtil needs --root DIR (the folder holding the MTIL datasets)")
        report = mtil_report(args.root)
    else:
        report = report_for(from_dict(RunConfig, load_yaml(args.target, args.overrides)).benchmark, args.root)
    print(format_report(report))
    for name in report["missing"]:
        print(f"error: {report['errors'][name]}", file=sys.stderr)
    print(summary(report))
    return 2 if report["missing"] else 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.data:
        from .app import databench

        if args.memory:
            result = databench.memory(args.images, args.image_size, workers=args.workers[-1], data_dir=args.data_dir)
            print(f"peak RSS {result['peak_rss_mib']} MiB (largest worker {result['peak_rss_worker_mib']} MiB): "
                  f"zero-shot pass + {result['steps']} steps on {result['images']} JPEGs at {result['size']} px")
        else:
            result = databench.throughput(args.images, args.image_size, tuple(args.workers), data_dir=args.data_dir)
            print(databench.format_throughput(result))
        print(json.dumps(result))
        return 0
    from .app.opcount import count_ops, format_op_report
    from .app.speed import format_speed_report, run_speed_bench

    if args.count_ops:
        result = count_ops(method=args.method, size=args.size, batch_size=args.batch_size or 2, device=args.device,
                           precision=args.precision, rank=args.rank)
        print(format_op_report(result))
    else:
        result = run_speed_bench(method=args.method, size=args.size, batch_size=args.batch_size or 8,
                                 steps=args.steps, warmup=args.warmup, device=args.device, rank=args.rank,
                                 precision=args.precision, compile=args.compile)
        print(format_speed_report(result))
    print(json.dumps(result))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own (options and ``key=value`` overrides may mix)."""
    parser = argparse.ArgumentParser(prog="continual-lora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train methods through a benchmark and write runs/<name>/<method>/")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iterations=50 seed=1")
    p.add_argument("--resume", action="store_true", help="continue from the last completed task")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory (kept until the new run writes its first checkpoint)")
    p.add_argument("--method", action="append", help="run only this method label (repeatable)")
    p.add_argument("--allow-change", action="append", metavar="KEY",
                   help="with --resume: accept this config key (dotted, e.g. train.device) differing from the "
                        "checkpoint's (repeatable)")
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
    p.add_argument("--by", default="group", choices=["group", "label", "name"],
                   help="rows: <group>/<label> for runs started with group=<g>, else the method label (default); "
                        "the method label only; <run name>/<label>")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("data", help="check a data root before training (data check mtil --root DIR)")
    p.add_argument("action", choices=["check"])
    p.add_argument("target", help="'mtil', or a run config whose benchmark reads data from disk (mtil, folders)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    p.add_argument("--root", help="the data root (overrides benchmark.root)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("bench", help="speed benchmark: step-time and merged-inference ratios")
    p.add_argument("--method", default="lora", help="lora | lilora | rank1_pool")
    p.add_argument("--size", default="vitb16", choices=["vitb16", "tiny", "llava7b-mlp", "tiny-mlp"],
                   help="a CLIP (vitb16, tiny) or one LLaMA MLP block (llava7b-mlp: 4096 -> 11008, 640 tokens)")
    p.add_argument("--batch-size", type=int, default=None, help="samples or sequences (default 8; --count-ops: 2)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", action="store_true",
                   help="input pipeline instead: images/s decoded + preprocessed per DataLoader worker count")
    p.add_argument("--memory", action="store_true", help="with --data: peak RSS of an evaluation pass + 20 steps")
    p.add_argument("--images", type=int, default=1000, help="with --data: images of the generated dataset")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="with --data: worker counts to time")
    p.add_argument("--image-size", type=int, default=224, help="with --data: model resolution")
    p.add_argument("--data-dir", help="with --data: keep the generated dataset here (reused when it exists)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on both sides")
    p.add_argument("--rank", type=int, default=None, help="default: 8 for lora, the method's release rank")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="torch.compile both sides' training models with this mode (default, reduce-overhead, ...)")
    p.add_argument("--count-ops", action="store_true",
                   help="instead of timing: kernel-launching operators of one forward + backward, method vs LoRA")
    p.set_defaults(func=cmd_bench)
    return parser, dict(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. An error the user can fix (:class:`~continual_lora.errors.UserError`) prints one
    line and exits 2; Ctrl-C exits 130 saying how to resume; anything else is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if argv and argv[0] in commands:  # options may follow the overrides: `run cfg.yaml name=x --resume`
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)  # --help, or an unknown command: argparse's message
    try:
        return int(args.func(args))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (f"; every finished task is checkpointed: continue with `continual-lora run {args.config} --resume`"
                if args.func is cmd_run else "")
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
