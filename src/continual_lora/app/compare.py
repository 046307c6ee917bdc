"""Compare finished runs: a markdown table (mean ± std over runs with the same label) and a bar plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import metrics
from . import plots
from .runner import RESULTS


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
