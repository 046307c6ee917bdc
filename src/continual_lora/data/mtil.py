"""The MTIL protocol's 11 datasets as continual tasks, read from their torchvision layouts under one root.

    datasets     aircraft, caltech101, cifar100, dtd, eurosat, flowers, food, mnist, oxford_pet,
                 stanford_cars, sun397 (order I; order II: ORDERS["II"])
    splits       official train / test, except caltech101, eurosat and sun397: an 80/20 random split
                 with seed 42 of the sorted file list (train = int(0.8 n), as ZSCL's split_dataset;
                 the releases split SUN397 in file-system order, so theirs differs between machines)
    names        the protocol's lists for caltech101, eurosat and flowers; the dataset's own metadata
                 for the others (underscores as spaces); data/mtil_prompts.json
    templates    the protocol's per-dataset lists: training captions use the first, evaluation the
                 ensemble of all
    shots        k: the first k images per class of one seeded shuffled pass; None: full-shot

Each resolved split can be written as a manifest (``<split_dir>/<dataset>.json``: relative path and
label of every sample, with a SHA-256 of its content); a manifest found there is read instead of
the directory listing, so two machines can share one split. :func:`check` counts a root without
reading images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..kinds.images import FileImageTask, FileSource
from ..storage import atomic_write, cache_dir
from .domains import balanced_subset, domain_seed, first_k_per_class
from .mtil_readers import LAYOUTS, READERS, DataLayoutError, Listing, Split

DATASETS: tuple[str, ...] = ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist",
                             "oxford_pet", "stanford_cars", "sun397")
ORDERS: dict[str, tuple[str, ...]] = {
    "I": DATASETS,
    "II": ("stanford_cars", "food", "mnist", "oxford_pet", "flowers", "sun397", "aircraft", "caltech101", "dtd",
           "eurosat", "cifar100"),
}
RANDOM_SPLIT = ("caltech101", "eurosat", "sun397")  # no official test split: 80/20, seed 42
SPLIT_SEED = 42
MANIFEST_VERSION = 1


@cache
def prompts() -> dict[str, dict[str, list[str]]]:
    """Per dataset: ``templates`` (and ``class_names`` where the protocol has its own list)."""
    return json.loads((Path(__file__).with_name("mtil_prompts.json")).read_text(encoding="utf-8"))["datasets"]


@dataclass
class Dataset:
    """One dataset, split as the protocol splits it."""

    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    train: Split
    test: Split


def random_split(split: Split, seed: int = SPLIT_SEED) -> tuple[Split, Split]:
    """80/20 as ``torch.utils.data.random_split(ds, [int(0.8 n), n - int(0.8 n)], manual_seed(seed))``."""
    n = len(split.labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train, test = perm[: int(0.8 * n)].tolist(), perm[int(0.8 * n):].tolist()
    return (Split(split.source.subset(train), split.labels[train]),
            Split(split.source.subset(test), split.labels[test]))


def _names(name: str, listing: Listing) -> tuple[str, ...]:
    own = prompts()[name].get("class_names")
    if own is not None:
        if len(own) != len(listing.class_names):
            raise DataLayoutError(f"{name}: the data has {len(listing.class_names)} classes, the protocol's list "
                                  f"{len(own)}; expected under the root: {LAYOUTS[name]}")
        return tuple(own)
    return tuple(c.replace("_", " ") for c in listing.class_names)


def default_split_dir(root: str | Path) -> Path:
    """Where the manifests of a root's splits are kept when ``split_dir`` is not given."""
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "mtil-splits" / key


def read_dataset(name: str, root: str | Path, split_dir: str | Path | None = None) -> Dataset:
    """Dataset ``name`` under ``root``, split by the protocol, or by its manifest in ``split_dir``
    (default: :func:`default_split_dir`), which is written on the first read."""
    if name not in READERS:
        raise DataLayoutError(f"unknown MTIL dataset {name!r}; known: {list(DATASETS)}")
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"the MTIL root {root} is not a directory (benchmark.root)")
    manifest = Path(split_dir if split_dir is not None else default_split_dir(root)) / f"{name}.json"
    if manifest.is_file():
        return _from_manifest(name, root, manifest)
    try:
        listing = READERS[name](root)
    except DataLayoutError:
        raise
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:  # files there, content not as expected
        raise DataLayoutError(f"{name}: the files under {root} are not in the layout this reader expects "
                              f"({type(err).__name__}: {err}); docs/benchmarks.md lists each dataset's tree") from None
    if "all" in listing.splits:
        train, test = random_split(listing.splits["all"])
    else:
        train, test = listing.splits["train"], listing.splits["test"]
    dataset = Dataset(name, _names(name, listing), tuple(prompts()[name]["templates"]), train, test)
    write_manifest(root, dataset, manifest)
    return dataset


# --- manifests ------------------------------------------------------------------------------------------
def _split_entry(root: Path, split: Split) -> dict[str, Any]:
    """A split as manifest data: where its images are (a folder, or an array file, relative to the root)
    and each sample's path in that folder (or row ``#i`` of the array) with its label."""
    source = split.source
    labels = split.labels.tolist()
    if isinstance(source, FileSource):
        return {"folder": source.root.relative_to(root).as_posix(),
                "samples": [[path, int(label)] for path, label in zip(source.paths, labels)]}
    return {"array": source.origin, "samples": [[f"#{row}", int(label)] for row, label in zip(source.rows, labels)]}  # type: ignore[attr-defined]


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(root: Path, dataset: Dataset, path: Path) -> None:
    """The split of ``dataset`` as JSON (class names, then per split where the images are and every
    sample with its label), with the SHA-256 of that content; written atomically."""
    body = {"version": MANIFEST_VERSION, "dataset": dataset.name, "class_names": list(dataset.class_names),
            "train": _split_entry(root, dataset.train), "test": _split_entry(root, dataset.test)}
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**body, "sha256": _digest(body)})
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), mode=0o644)


def _from_manifest(name: str, root: Path, path: Path) -> Dataset:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        body = {k: v for k, v in data.items() if k != "sha256"}
        ok = data.get("sha256") == _digest(body) and data.get("dataset") == name
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise DataLayoutError(f"{name}: the split manifest {path} is corrupt or belongs to another dataset "
                              "(its SHA-256 does not match); delete it to split the data again")
    arrays = None
    splits = []
    for key in ("train", "test"):
        entry = data[key]
        labels = torch.tensor([int(label) for _, label in entry["samples"]], dtype=torch.long)
        if "array" in entry:  # rows of an array file (MNIST, CIFAR100): open the file, keep the listed rows
            arrays = arrays or {s.source.origin: s.source for s in READERS[name](root).splits.values()}  # type: ignore[attr-defined]
            source = arrays[entry["array"]].subset([int(p[1:]) for p, _ in entry["samples"]])
        else:
            source = FileSource(root / entry["folder"], [p for p, _ in entry["samples"]])
            if len(source) and not (source.root / source.paths[0]).is_file():
                raise DataLayoutError(f"{name}: {source.root / source.paths[0]} (listed in the split manifest {path}) "
                                      f"is missing; expected under the root: {LAYOUTS[name]}")
        splits.append(Split(source, labels))
    return Dataset(name, tuple(data["class_names"]), tuple(prompts()[name]["templates"]), *splits)


# --- tasks ------------------------------------------------------------------------------------------------
def mtil_tasks(root: str | Path, datasets: tuple[str, ...] | list[str], shots: int | None = 5, seed: int = 0,
               max_test_per_task: int | None = None, split_dir: str | Path | None = None) -> list[FileImageTask]:
    """The MTIL stream over ``datasets`` (in that order): ``shots`` per class for training (None:
    full-shot), the whole test split (or a class-balanced, fixed-seed subset of ``max_test_per_task``)."""
    tasks = []
    for name in datasets:
        data = read_dataset(name, root, split_dir)
        train, test = data.train, data.test
        if shots is not None:
            keep = first_k_per_class(train.labels, shots, torch.Generator().manual_seed(domain_seed(name, seed)))
            keep = keep.sort().values.tolist()
            train = Split(train.source.subset(keep), train.labels[keep])
        if max_test_per_task is not None:
            keep = balanced_subset(test.labels, max_test_per_task,
                                   torch.Generator().manual_seed(domain_seed(name, SPLIT_SEED))).tolist()
            test = Split(test.source.subset(keep), test.labels[keep])
        tasks.append(FileImageTask(name, data.class_names, data.templates, train.source, train.labels, test.source,
                                   test.labels))
    return tasks


def check(root: str | Path, datasets: tuple[str, ...] | list[str] = DATASETS) -> dict[str, Any]:
    """``{"datasets": {name: {"classes", "train", "test", "ok"}}, "missing": [...], "errors": {name: message}}``
    for a root, with the protocol's split sizes (no image is decoded; each split's first file is
    checked to exist)."""
    report: dict[str, Any] = {"datasets": {}, "missing": [], "errors": {}}
    for name in datasets:
        try:
            data = read_dataset(name, root)
            report["datasets"][name] = {"classes": len(data.class_names), "train": len(data.train.labels),
                                        "test": len(data.test.labels), "ok": True}
        except DataLayoutError as err:
            report["datasets"][name] = {"classes": 0, "train": 0, "test": 0, "ok": False}
            report["missing"].append(name)
            report["errors"][name] = str(err)
    return report
