"""Users' own image datasets as continual tasks: an image-folder tree or a manifest per task.

    tree       <root>/train/<class>/<image>, <root>/test/<class>/<image>   (the folder names are the labels)
    manifest   a CSV with a header ``path,label,split`` or a JSONL file of {"path", "label", "split"}
               objects; ``split`` is train or test; paths relative to the manifest's folder (or absolute)

Classes are the sorted distinct labels; their prompt names are the labels with underscores as
spaces, or come from a class-name file (one ``label<TAB>name`` or ``label,name`` per line).
Templates: a list, or a file with one template (containing ``{}``) per line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from ..errors import UserError
from ..kinds.images import FileImageTask, FileSource
from .mtil_readers import IMAGE_SUFFIXES

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class FolderLayoutError(UserError):
    """A task folder or manifest is missing or malformed; names the file and the layout expected."""


def _tree(name: str, root: Path) -> dict[str, list[tuple[str, str]]]:
    """split -> [(path relative to root, label)] of an image-folder tree."""
    splits = {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise FolderLayoutError(f"task {name!r}: {folder} is missing; expected {root}/train/<class>/<image> and "
                                    f"{root}/test/<class>/<image>")
        splits[split] = [(f"{split}/{c.name}/{f.name}", c.name) for c in sorted(folder.iterdir()) if c.is_dir()
                         for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return splits


def _manifest(name: str, path: Path) -> dict[str, list[tuple[str, str]]]:
    """split -> [(path, label)] of a CSV or JSONL manifest."""
    if not path.is_file():
        raise FolderLayoutError(f"task {name!r}: the manifest {path} is missing")
    try:
        text = path.read_text(encoding="utf-8")
        rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                else list(csv.DictReader(text.splitlines())))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise FolderLayoutError(f"task {name!r}: {path} is not a UTF-8 CSV / JSONL manifest ({err})") from None
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not {"path", "label", "split"} <= set(row) or row["split"] not in splits:
            raise FolderLayoutError(f"task {name!r}: {path} entry {i} needs path, label and split (train or test), "
                                    f"got {row!r}")
        splits[row["split"]].append((str(row["path"]), str(row["label"])))
    return splits


def _class_names(name: str, labels: list[str], path: str | None) -> tuple[str, ...]:
    if path is None:
        return tuple(label.replace("_", " ") for label in labels)
    names: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, sep, text = line.partition("\t") if "\t" in line else line.partition(",")
            if not sep:
                raise FolderLayoutError(f"task {name!r}: {path}: expected 'label<TAB>name' lines, got {line!r}")
            names[label.strip()] = text.strip()
    missing = [label for label in labels if label not in names]
    if missing:
        raise FolderLayoutError(f"task {name!r}: {path} names no class for the labels {missing[:5]}")
    return tuple(names[label] for label in labels)


def folder_task(name: str, root: str | None = None, manifest: str | None = None, class_names: str | None = None,
                templates: tuple[str, ...] | str = DEFAULT_TEMPLATES) -> FileImageTask:
    """One user task from an image-folder tree (``root``) or a manifest (see the module docstring)."""
    if (root is None) == (manifest is None):
        raise FolderLayoutError(f"task {name!r}: give either root (an image-folder tree) or manifest, not both")
    base = Path(root) if root is not None else Path(str(manifest)).parent
    splits = _tree(name, base) if root is not None else _manifest(name, Path(str(manifest)))
    labels = sorted({label for pairs in splits.values() for _, label in pairs})
    for split, pairs in splits.items():
        if not pairs:
            raise FolderLayoutError(f"task {name!r}: no {split} images in {root or manifest}")
        if not (base / pairs[0][0]).is_file():
            raise FolderLayoutError(f"task {name!r}: {base / pairs[0][0]} is missing")
    if isinstance(templates, str):
        templates = tuple(t for t in Path(templates).read_text(encoding="utf-8").splitlines() if t.strip())
    if not templates or not all("{}" in t for t in templates):
        raise FolderLayoutError(f"task {name!r}: every template must contain {{}} (the class name), got {templates}")
    index = {label: i for i, label in enumerate(labels)}

    def split(pairs: list[tuple[str, str]]) -> tuple[FileSource, torch.Tensor]:
        return FileSource(base, [p for p, _ in pairs]), torch.tensor([index[c] for _, c in pairs], dtype=torch.long)

    (train_source, train_labels), (test_source, test_labels) = split(splits["train"]), split(splits["test"])
    return FileImageTask(name, _class_names(name, labels, class_names), tuple(templates), train_source, train_labels,
                         test_source, test_labels)
