"""Compare finished runs: a markdown table (mean ± std over the runs of one row) and a bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import metrics
from ..errors import RunDirError
from . import plots
from .rundir import load_results


GROUP_BY = ("group", "label", "name")


def row_key(results: dict[str, Any], by: str = "group") -> str:
    """The table row a run belongs to; runs of one row are averaged (seeds).

    ``label``: the method label (``lilora``); ``group`` (default): ``<group>/<label>`` for a run
    started with ``group=<g>`` (the variants of a sweep, each over seeds), else the label; ``name``:
    ``<run name>/<label>``, one row per run directory's run name (nothing averaged across names)."""
    label = str(results.get("label", results["method"]))
    if by == "label":
        return label
    if by == "group":
        group = results.get("group")
        return f"{group}/{label}" if group else label
    if by == "name":
        return f"{(results.get('config') or {}).get('name', '?')}/{label}"
    raise ValueError(f"compare: group by one of {GROUP_BY}, got {by!r}")


def compare(run_dirs: list[str | Path], plot_path: str | Path | None = None, by: str = "group") -> str:
    """Markdown table (row x metric, mean ± std over the runs of a row, :func:`row_key`) + a plot.

    Plain files among ``run_dirs`` are skipped (``runs/x/*`` also matches the comparison plot a
    previous run wrote there); a missing directory, one without results, an unfinished run or runs
    of different protocols are one-line errors."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        if Path(d).is_file():
            continue
        if not Path(d).exists():
            raise RunDirError(f"{d} does not exist (a shell pattern that matched nothing is passed on as it is)")
        res = load_results(d)
        if not res.get("finished") or not isinstance(res.get("metrics"), dict):
            raise RunDirError(f"{d}: the run is not finished; finish it with `continual-lora run <config> --resume`")
        grouped.setdefault(row_key(res, by), []).append(res)
    if not grouped:
        raise RunDirError(f"no run directories among {[str(d) for d in run_dirs][:5]}: give runs/<name>/<method> "
                          "directories (or runs/<name>/*)")
    names = list(next(iter(grouped.values()))[0]["metrics"])
    rows: dict[str, dict[str, Any]] = {}
    for label, runs in grouped.items():
        for run in runs:
            if list(run["metrics"]) != names:
                raise RunDirError(f"{label} reports metrics {list(run['metrics'])}, other runs {names}: compare runs "
                                  "of one protocol (MTIL or CVIT) at a time")
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
        try:
            plots.comparison(rows, names, plot_path)
        except OSError as err:
            raise RunDirError(f"cannot write the comparison plot {plot_path} ({err.strerror or err}); "
                              "pass --plot with a writable path") from None
    return metrics.format_metrics_table(rows, names + ["trainable", "stored", "wall_time_s", "seeds"])
