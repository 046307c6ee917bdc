"""Parameter accounting: what trains, what is stored, what is shared, what each task costs."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ParamCount
from .inject import branches


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """Counts for an adapted model.

    ``trainable``: parameters with ``requires_grad`` right now (anywhere in the model);
    ``stored``: everything an adapter checkpoint holds (branch parameters and buffers);
    ``shared``: branch parameters shared by all tasks; ``per_task``: parameters owned by each
    task; ``base``: parameters of the model outside the adapters.
    """
    found = branches(model)
    adapter_ids = {id(t) for b in found.values() for t in b.parameters()}
    total = ParamCount()
    stored = 0
    for branch in found.values():
        total = total + branch.parameter_count()
        stored += sum(t.numel() for t in branch.state_dict().values())
    return {
        "base": sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "stored": stored,
        "shared": total.shared,
        "per_task": dict(total.per_task),
        "adapted_layers": len(found),
    }


def parameter_table(model: nn.Module) -> str:
    """The counts of :func:`parameter_counts` as a small aligned text table."""
    counts = parameter_counts(model)
    rows = [
        ("adapted weights", counts["adapted_layers"]),
        ("base parameters", counts["base"]),
        ("trainable", counts["trainable"]),
        ("stored (adapters)", counts["stored"]),
        ("shared across tasks", counts["shared"]),
    ]
    rows += [(f"task {task}", n) for task, n in counts["per_task"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'parameters':<{width}}  {'count':>14}", f"{'-' * width}  {'-' * 14}"]
    base = counts["base"] or 1
    for name, n in rows:
        pct = f"  {100 * n / base:6.2f} % of base" if name != "base parameters" and name != "adapted weights" else ""
        lines.append(f"{name:<{width}}  {n:>14,}{pct}")
    return "\n".join(lines)
