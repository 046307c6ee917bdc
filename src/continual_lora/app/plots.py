"""Plots of run results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_heatmap(results: dict[str, Any], path: str | Path) -> None:
    """Annotated heatmap: the zero-shot row, then row j = after training task j."""
    tasks = results["tasks"]
    grid = np.array([results["zero_shot"], *results["matrix"]], dtype=float)  # (T + 1, T)
    rows = ["zero-shot", *[f"after {t}" for t in tasks]]
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 2.5, 0.6 * len(rows) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center",
                    color="white" if grid[i, j] < 60 else "black", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated task")
    ax.set_title(f"{results.get('label', results['method'])}: accuracy (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def task_curves(results: dict[str, Any], path: str | Path) -> None:
    """Each task's score across training steps (step 0 = zero-shot)."""
    tasks = results["tasks"]
    grid = np.array([results["zero_shot"], *results["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(grid.shape[0])
    for i, task in enumerate(tasks):
        ax.plot(steps, grid[:, i], marker="o", label=task)
        ax.axvline(i + 1, color="gray", alpha=0.15)
    ax.set_xticks(steps, ["0-shot", *[f"{j + 1}" for j in range(len(tasks))]])
    ax.set_xlabel("after training task #")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results.get('label', results['method'])}: score of each task over the sequence")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison(rows: dict[str, dict[str, Any]], metric_names: list[str], path: str | Path) -> None:
    """Grouped bars: methods x metrics, with std error bars when several seeds were run."""
    labels = list(rows)
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(1.6 * len(metric_names) + 2, 4))
    x = np.arange(len(metric_names))
    for k, label in enumerate(labels):
        vals = [rows[label][m] for m in metric_names]
        means = [v[0] if isinstance(v, tuple) else v for v in vals]
        stds = [v[1] if isinstance(v, tuple) else 0.0 for v in vals]
        ax.bar(x + k * width - 0.4 + width / 2, means, width, yerr=stds, label=label, capsize=2)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, metric_names)
    ax.set_ylabel("percent")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
