"""Continual-learning metrics: pure functions of the accuracy matrix R (docs/protocols.md).

``R[j, i]`` is the score (percent) on task i evaluated right after training task j, both in
training order, so R is T x T. Formulas below use 1-based j, i = 1..T as in the papers; the code
is 0-based. No function mutates its input; every scalar comes back as a Python ``float``.

MTIL family (ZSCL, MoE-Adapters, DAC, RAIL, GIFT):
    Transfer   = 1/(T-1) * sum_{i=2..T} mean_{j<i} R[j, i]        strict upper triangle, per column
    Average    = 1/T * sum_{i=1..T} mean_{j=1..T} R[j, i]         = mean of all T*T entries
    Last       = mean_i R[T, i]                                   last row
General continual-learning metrics:
    BWT        = 1/(T-1) * sum_{i<T} (R[T, i] - R[i, i])
    Forgetting = 1/(T-1) * sum_{i<T} (max_{i<=j<T} R[j, i] - R[T, i])
CVIT family (SMoLoRA / LiLoRA; lower triangle only):
    AP         = mean_i R[T, i]                                   same as Last
    MAP        = 1/T * sum_{k=1..T} mean_{i<=k} R[k, i]

Per-task columns (ZSCL reports a per-dataset Transfer / Average / Last row):
    per_task_transfer[i] = mean_{j<i} R[j, i]  (None for the first task: nothing precedes it)
    per_task_average[i]  = mean_j R[j, i]
    per_task_last[i]     = R[T, i]

T = 1 convention: Transfer, BWT and Forgetting average over an empty set of tasks; they are
defined as 0.0 (not NaN, not None) so that result dicts stay valid JSON numbers and tables stay
numeric. Non-finite entries (NaN / inf) are rejected with ValueError for the same reason.

Accuracy-matrix CSV format (read_matrix_csv / write_matrix_csv):
    after,Aircraft,Caltech101,...      header: task names in training order
    Aircraft,81.2,88.0,...             row j = scores after training task j
    Caltech101,80.9,95.1,...
The first column ``after`` is optional; its cells (task name or index) label the rows and are
ignored for values. Exactly T data rows for T tasks; nothing else (no zero-shot row).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np

from .errors import UserError

MatrixLike = Union[Sequence[Sequence[float]], np.ndarray]
Cell = Union[float, int, str, tuple, None]

AFTER_COLUMN = "after"
MTIL_KEYS = ("transfer", "average", "last", "bwt", "forgetting")
CVIT_KEYS = ("ap", "map", "bwt")


class MatrixFormatError(UserError, ValueError):
    """An accuracy-matrix CSV (or array) does not have the documented shape or content."""


def _as_matrix(R: MatrixLike) -> np.ndarray:
    """A float64 copy of R, checked to be a non-empty, square, finite 2-D matrix."""
    try:
        m = np.array(R, dtype=np.float64)  # np.array copies: the caller's R is never touched
    except (TypeError, ValueError) as exc:
        raise ValueError(f"accuracy matrix is not a rectangular numeric array: {exc}") from None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("accuracy matrix contains NaN or infinite entries")
    return m


# --------------------------------------------------------------------------- per-task columns

def per_task_transfer(R: MatrixLike) -> list[float | None]:
    """mean_{j<i} R[j, i] per task i (strictly upper triangle); None for the first task."""
    m = _as_matrix(R)
    return [None] + [float(m[:i, i].mean()) for i in range(1, m.shape[0])]


def per_task_average(R: MatrixLike) -> list[float]:
    """mean_j R[j, i] per task i (column means over every training step)."""
    return [float(v) for v in _as_matrix(R).mean(axis=0)]


def per_task_last(R: MatrixLike) -> list[float]:
    """R[T, i] per task i (the last row)."""
    return [float(v) for v in _as_matrix(R)[-1]]


# --------------------------------------------------------------------------- scalar metrics

def transfer(R: MatrixLike) -> float:
    """MTIL Transfer: mean over tasks 2..T of the mean score before that task was trained."""
    upper = [v for v in per_task_transfer(R) if v is not None]
    return float(np.mean(upper)) if upper else 0.0


def average(R: MatrixLike) -> float:
    """MTIL Average: mean over tasks of the column mean = mean of all T*T entries."""
    return float(_as_matrix(R).mean(axis=0).mean())


def last(R: MatrixLike) -> float:
    """MTIL Last: mean of the final row."""
    return float(_as_matrix(R)[-1].mean())


def bwt(R: MatrixLike) -> float:
    """Backward transfer: mean over tasks 1..T-1 of R[T, i] - R[i, i] (negative = forgetting)."""
    m = _as_matrix(R)
    t = m.shape[0]
    if t == 1:
        return 0.0
    idx = np.arange(t - 1)
    return float((m[-1, idx] - m[idx, idx]).mean())


def forgetting(R: MatrixLike) -> float:
    """Forgetting: mean over tasks i < T of (best R[j, i] for i <= j < T) - R[T, i]."""
    m = _as_matrix(R)
    t = m.shape[0]
    if t == 1:
        return 0.0
    drops = [m[i : t - 1, i].max() - m[-1, i] for i in range(t - 1)]
    return float(np.mean(drops))


def ap(R: MatrixLike) -> float:
    """CVIT AP (average performance): mean of the final row, identical to Last."""
    return last(R)


def mean_average_performance(R: MatrixLike) -> float:
    """CVIT MAP: mean over steps k of the mean score on the tasks seen so far (i <= k)."""
    m = _as_matrix(R)
    return float(np.mean([m[k, : k + 1].mean() for k in range(m.shape[0])]))


map_score = mean_average_performance


def _check_range(R: MatrixLike, low: float, high: float, what: str) -> None:
    """Raise naming the first entry of R outside [low, high]."""
    m = _as_matrix(R)
    bad = np.argwhere((m < low) | (m > high))
    if len(bad):
        j, i = (int(v) for v in bad[0])
        raise ValueError(f"{what}; R[{j}][{i}] (row {j + 1}, task {i + 1}) is {m[j, i]:g}")


def mtil_metrics(R: MatrixLike) -> dict[str, float]:
    """The MTIL report: transfer, average, last, bwt, forgetting (percent). Entries are accuracies:
    anything outside [0, 100] is an error."""
    _check_range(R, 0.0, 100.0, "MTIL scores are accuracies in percent, within [0, 100]")
    return {
        "transfer": transfer(R),
        "average": average(R),
        "last": last(R),
        "bwt": bwt(R),
        "forgetting": forgetting(R),
    }


def cvit_metrics(R: MatrixLike) -> dict[str, float]:
    """The CVIT report: ap, map, bwt (percent). Entries must be >= 0 (CIDEr x 100 may exceed 100)."""
    _check_range(R, 0.0, math.inf, "CVIT scores are >= 0")
    return {"ap": ap(R), "map": mean_average_performance(R), "bwt": bwt(R)}


PROTOCOLS = {"mtil": mtil_metrics, "cvit": cvit_metrics}


# --------------------------------------------------------------------------- CSV I/O

def _parse_cell(text: str, row_label: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MatrixFormatError(
            f"non-numeric cell {text.strip()!r} at row {row_label!r}, column {column!r}"
        ) from None
    if not math.isfinite(value):
        raise MatrixFormatError(
            f"non-finite cell {text.strip()!r} at row {row_label!r}, column {column!r}"
        )
    return value


def read_matrix_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read an accuracy-matrix CSV (format in the module docstring) -> (task_names, R)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise MatrixFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MatrixFormatError(f"{path} is a directory; give the accuracy_matrix.csv inside a run directory") from None
    except UnicodeDecodeError:
        raise MatrixFormatError(f"{path} is not a UTF-8 text file; expected an accuracy-matrix CSV") from None
    except csv.Error as err:
        raise MatrixFormatError(f"{path}: not a CSV file ({err})") from None
    if not rows:
        raise MatrixFormatError(f"{path}: empty file, expected a header row of task names")
    header = [cell.strip() for cell in rows[0]]
    has_after = header[0] == AFTER_COLUMN
    names = header[1:] if has_after else header
    if not names:
        raise MatrixFormatError(f"{path}: header has no task names")
    if any(not n for n in names):
        raise MatrixFormatError(f"{path}: empty task name in header")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise MatrixFormatError(f"{path}: duplicate task names in header: {', '.join(dups)}")

    values = []
    labels = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise MatrixFormatError(
                f"{path}: ragged row at line {line}: {len(row)} cells, header has {len(header)}"
            )
        label = row[0].strip() if has_after else f"line {line}"
        labels.append(label)
        cells = row[1:] if has_after else row
        values.append([_parse_cell(c, label, n) for c, n in zip(cells, names)])
    if has_after:
        _check_row_labels(path, labels, names)
    if len(values) != len(names):
        raise MatrixFormatError(
            f"{path}: matrix is not square: {len(values)} rows for {len(names)} tasks "
            f"(need one row per training step)"
        )
    return names, np.array(values, dtype=np.float64)


def _check_row_labels(path: str | os.PathLike, labels: list[str], names: list[str]) -> None:
    """Row j must be labelled with task j's name or index (all 0-based or all 1-based), or be blank:
    a label naming another task means the rows are not in training order."""
    conventions = {"names": names, "0-based indices": [str(j) for j in range(len(names))],
                   "1-based indices": [str(j + 1) for j in range(len(names))]}
    given = [(j, label) for j, label in enumerate(labels) if label]
    if not given or any(all(label == want[j] for j, label in given if j < len(want)) for want in conventions.values()):
        return
    j, label = next((j, label) for j, label in given if j >= len(names) or label != names[j])
    expected = names[j] if j < len(names) else "(no such task)"
    raise MatrixFormatError(f"{path}: row {j + 1} is labelled {label!r} but row {j + 1} must hold the scores after "
                            f"training task {expected!r} (rows in training order, as in the header)")


def write_matrix_csv(
    path: str | os.PathLike,
    task_names: Sequence[str],
    R: MatrixLike,
    zero_shot: Sequence[float] | None = None,
) -> None:
    """Write R in the format read_matrix_csv reads, with the ``after`` column = task names.

    ``zero_shot`` (row 0, the base model before any training) is not part of the strict matrix
    format; when given it goes to a sidecar ``<stem>.zero_shot.csv`` (same header, one row
    labelled ``zero_shot``), read back with read_zero_shot_csv.
    """
    names = [str(n) for n in task_names]
    m = _as_matrix(R)
    if len(names) != m.shape[0]:
        raise ValueError(f"{len(names)} task names for a {m.shape[0]} x {m.shape[0]} matrix")
    if len(set(names)) != len(names) or any(not n.strip() for n in names):
        raise ValueError(f"task names must be unique and non-empty, got {names}")
    _write_rows(path, names, [(n, row) for n, row in zip(names, m)])
    if zero_shot is not None:
        z = np.array(zero_shot, dtype=np.float64)
        if z.shape != (len(names),) or not np.isfinite(z).all():
            raise ValueError(f"zero_shot must be {len(names)} finite scores, got shape {z.shape}")
        _write_rows(zero_shot_path(path), names, [("zero_shot", z)])


def zero_shot_path(path: str | os.PathLike) -> Path:
    """The sidecar file write_matrix_csv uses for the zero-shot row: ``<stem>.zero_shot.csv``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.zero_shot.csv")


def read_zero_shot_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a zero-shot sidecar (header + one ``zero_shot`` row) -> (task_names, scores)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if len(rows) != 2 or rows[0][:1] != [AFTER_COLUMN] or len(rows[1]) != len(rows[0]):
        raise MatrixFormatError(f"{path}: expected a header and one zero_shot row")
    names = [c.strip() for c in rows[0][1:]]
    return names, np.array([_parse_cell(c, "zero_shot", n) for c, n in zip(rows[1][1:], names)])


def _write_rows(
    path: str | os.PathLike, names: list[str], rows: list[tuple[str, np.ndarray]]
) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([AFTER_COLUMN, *names])
        for label, row in rows:
            w.writerow([label, *(repr(float(v)) for v in row)])  # repr: exact float round trip


# --------------------------------------------------------------------------- reporting

def metrics_command(path: str | os.PathLike, protocol: str = "mtil") -> dict[str, float]:
    """Read an accuracy-matrix CSV and return the protocol's metrics rounded to 4 decimals."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    _, R = read_matrix_csv(path)
    try:
        return {k: round(v, 4) for k, v in PROTOCOLS[protocol](R).items()}
    except ValueError as err:
        raise MatrixFormatError(f"{path}: {err}") from None


def _format_cell(value: Cell) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        mean, std = value
        return f"{float(mean):.2f} ± {float(std):.2f}"
    if isinstance(value, str):  # preformatted (e.g. parameter counts)
        return value
    return f"{float(value):.2f}"


def format_metrics_table(
    rows: Mapping[str, Mapping[str, Cell]], metric_names: Sequence[str]
) -> str:
    """Markdown table, one row per method and one column per metric, values to 2 decimals.

    A (mean, std) tuple prints as ``mean ± std``; a missing metric or None prints as ``-``.
    """
    lines = [
        "| method | " + " | ".join(metric_names) + " |",
        "|---|" + "---:|" * len(metric_names),
    ]
    for method, values in rows.items():
        cells = [_format_cell(values.get(name)) for name in metric_names]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
