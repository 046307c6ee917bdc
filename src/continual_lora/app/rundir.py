"""A method's run directory ``<output_dir>/<name>/<label>/``: its lock, how a run takes it over
(fresh, resumed, or replacing a finished one) and the files a run leaves there.

* One run at a time: a lock file ``<output_dir>/<name>/.<label>.lock`` (created with
  O_CREAT | O_EXCL, holding the PID, host and start time) refuses a second run on the same
  directory; a lock whose process is gone (same host, PID not alive) is stale and replaced.
* ``--overwrite`` moves the old directory aside (``.<label>.replaced``) and deletes it only once
  the new run has written its first checkpoint; a run that fails before that puts it back.
* ``results.json`` is written last and atomically, after ``accuracy_matrix.csv`` and the plots,
  so a run killed while writing them is not marked finished; ``--resume`` on a finished run
  writes them again and trains nothing. No file holds NaN or Infinity.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from .. import metrics
from ..errors import RunDirError
from ..storage import atomic_write
from . import plots

RESULTS = "results.json"


def finite_json(data: Any) -> Any:
    """``data`` with every non-finite float replaced by None (JSON has no NaN / Infinity)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """The ``results.json`` of a run directory; a missing or corrupt one is a one-line error."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory (give run directories: runs/<name>/<method>)")
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no {RESULTS} (not a run directory, or its first task has not finished)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path} is unreadable or corrupt ({err}); `continual-lora run <config> --resume` "
                          "writes it again from the run's checkpoint") from None
    if not isinstance(results, dict) or "tasks" not in results:
        raise RunDirError(f"{path} is not a continual-lora results file")
    return results


def finished_results(run_dir: Path) -> dict[str, Any] | None:
    """The results of a finished run in ``run_dir``, or None."""
    if not (run_dir / RESULTS).is_file():
        return None
    results = load_results(run_dir)
    return results if results.get("finished") else None


def write_artefacts(run_dir: Path, results: dict[str, Any]) -> None:
    """The accuracy-matrix CSV (+ zero-shot sidecar) and the plots of a finished run."""
    metrics.write_matrix_csv(run_dir / "accuracy_matrix.csv", results["tasks"], results["matrix"],
                             zero_shot=results["zero_shot"])
    plots.accuracy_heatmap(results, run_dir / "accuracy_matrix.png")
    plots.task_curves(results, run_dir / "curves.png")


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """The artefacts of a finished run first, then ``results.json`` (atomically, finite JSON) last."""
    if results["finished"]:
        write_artefacts(run_dir, results)
    text = json.dumps(finite_json(results), indent=1, allow_nan=False)
    atomic_write(run_dir / RESULTS, lambda tmp: Path(tmp).write_text(text), mode=0o644)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunDirectory:
    """One method's run directory, held by this process from :meth:`acquire` to :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = path.parent / f".{path.name}.lock"
        self.replaced: Path | None = None  # the previous run, moved aside by --overwrite
        self._locked = False

    # --- the lock ------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock; a live holder is an error, a dead one's lock is removed."""
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or holder["host"] != record["host"] or _alive(int(holder["pid"])):
                    who = (f"PID {holder['pid']} on {holder['host']} (since {holder['started']})" if holder
                           else "another process")
                    raise RunDirError(f"{self.path} is in use by {who}: wait for that run to end, or delete "
                                      f"{self.lock} if it is no longer running") from None
                self.lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self._locked = True
            return
        raise RunDirError(f"could not take the lock {self.lock}: another run keeps recreating it")

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.lock.read_text())
            return holder if {"pid", "host", "started"} <= set(holder) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._locked:
            self.lock.unlink(missing_ok=True)
            self._locked = False

    # --- taking the directory over --------------------------------------------------------------
    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber a finished or partial run unless asked to; ``overwrite`` moves it aside."""
        if overwrite and self.path.exists():
            self.replaced = self.path.parent / f".{self.path.name}.replaced"
            shutil.rmtree(self.replaced, ignore_errors=True)  # left by a run that was killed
            os.replace(self.path, self.replaced)
        elif finished_results(self.path) is not None:
            raise RunDirError(f"{self.path} already holds a finished run; pass --overwrite to replace it, "
                              "--resume to write its plots again, or pick another name")
        elif self.path.exists() and any(self.path.iterdir()) and not resume:
            raise RunDirError(f"{self.path} holds a partial run; pass --resume to continue it or --overwrite")
        self.path.mkdir(parents=True, exist_ok=True)

    def started(self) -> None:
        """The new run has written its first checkpoint: the run it replaces goes for good."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def abandon(self) -> None:
        """The new run failed before its first checkpoint: put the replaced run back."""
        if self.replaced is not None and self.replaced.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            os.replace(self.replaced, self.path)
            self.replaced = None

