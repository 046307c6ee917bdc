"""Readers of the 11 MTIL datasets in the on-disk layouts torchvision's dataset classes read (so data
downloaded with torchvision, or for ZSCL / MoE-Adapters / DAC, works unchanged). No torchvision:
the files are read directly (``scipy.io`` for .mat files; the CIFAR batches through a restricted
unpickler that admits only numpy arrays, lists, dicts, bytes and numbers).

Each reader takes the root and returns a :class:`Listing`: the class names (from the dataset's own
metadata; the MTIL lists replace them in :mod:`.mtil` where the protocol has its own) and, per split,
an image source with its labels. Datasets without an official test split (Caltech101, EuroSAT,
SUN397) return one ``all`` split, which :mod:`.mtil` cuts 80/20. A missing or malformed file raises
:class:`DataLayoutError` naming the dataset, the file and the layout expected.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..kinds.images import ArraySource, FileSource, ImageSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# what each dataset looks like under the root (error messages and docs/benchmarks.md)
LAYOUTS: dict[str, str] = {
    "aircraft": "fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt, images_variant_train.txt, images_variant_test.txt}",
    "caltech101": "caltech101/101_ObjectCategories/<category>/image_0001.jpg ...",
    "cifar100": "cifar-100-python/{train, test, meta}",
    "dtd": "dtd/dtd/{images/<class>/<name>.jpg, labels/train1.txt, labels/test1.txt}",
    "eurosat": "eurosat/2750/<Class>/<name>.jpg",
    "flowers": "flowers-102/{jpg/image_00001.jpg ..., imagelabels.mat, setid.mat}",
    "food": "food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json}",
    "mnist": "MNIST/raw/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte}"
             " (or the same with .gz)",
    "oxford_pet": "oxford-iiit-pet/{images/<Breed_id>.jpg, annotations/trainval.txt, annotations/test.txt}",
    "stanford_cars": "stanford_cars/{cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
                     "cars_test_annos_withlabels.mat}",
    "sun397": "SUN397/{ClassName.txt, <letter>/<class>[/<subclass>]/sun_<id>.jpg}",
}


class DataLayoutError(UserError):
    """A dataset's files are missing or not in the layout the reader expects."""


@dataclass
class Split:
    source: ImageSource
    labels: torch.Tensor  # (N,) int64


@dataclass
class Listing:
    """A dataset as read from disk: class names and its splits (``train`` / ``test``, or ``all``)."""

    class_names: list[str]
    splits: dict[str, Split]


def _missing(name: str, path: Path, what: str = "is missing") -> DataLayoutError:
    return DataLayoutError(f"{name}: {path} {what}; expected under the root: {LAYOUTS[name]} (docs/benchmarks.md)")


def _need(name: str, path: Path, directory: bool = False) -> Path:
    if not (path.is_dir() if directory else path.is_file()):
        raise _missing(name, path)
    return path


def _lines(name: str, path: Path) -> list[str]:
    try:
        return [line.strip() for line in _need(name, path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise _missing(name, path, "is not a UTF-8 text file") from None


def _labels(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _files(name: str, root: Path, pairs: list[tuple[str, int]], check: bool = True) -> Split:
    """A file split from (path relative to ``root``, label) pairs; ``check``: the first file must exist."""
    if check and pairs and not (root / pairs[0][0]).is_file():
        raise _missing(name, root / pairs[0][0])
    return Split(FileSource(root, [p for p, _ in pairs]), _labels([label for _, label in pairs]))


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _loadmat(name: str, path: Path) -> dict[str, Any]:
    from scipy.io import loadmat

    try:
        return loadmat(str(_need(name, path)), squeeze_me=True)
    except (ValueError, OSError, TypeError) as err:
        raise _missing(name, path, f"is not a readable .mat file ({err})") from None


# --- the readers --------------------------------------------------------------------------------------
def read_aircraft(root: Path) -> Listing:
    data = root / "fgvc-aircraft-2013b" / "data"
    classes = _lines("aircraft", data / "variants.txt")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "test"):
        pairs = []
        for line in _lines("aircraft", data / f"images_variant_{split}.txt"):
            image, _, variant = line.partition(" ")
            if variant not in index:
                raise _missing("aircraft", data / f"images_variant_{split}.txt", f"names a variant {variant!r} that "
                               "variants.txt does not list")
            pairs.append((f"images/{image}.jpg", index[variant]))
        splits[split] = _files("aircraft", data, pairs)
    return Listing(classes, splits)


def read_caltech101(root: Path) -> Listing:
    top = _need("caltech101", root / "caltech101" / "101_ObjectCategories", directory=True)
    classes = sorted(p.name for p in top.iterdir() if p.is_dir() and p.name != "BACKGROUND_Google")
    pairs = [(f"{c}/{f.name}", i) for i, c in enumerate(classes) for f in _images_in(top / c)]
    return Listing(classes, {"all": _files("caltech101", top, pairs)})


class _Restricted(pickle.Unpickler):
    """Unpickles only numpy arrays / dtypes and plain containers (the CIFAR python batches)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")


def _cifar_batch(path: Path) -> dict[str, Any]:
    try:
        with open(_need("cifar100", path), "rb") as f:
            data = _Restricted(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise _missing("cifar100", path, f"is not a CIFAR python batch ({err})") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()}


def read_cifar100(root: Path) -> Listing:
    top = root / "cifar-100-python"
    classes = [str(c) for c in _cifar_batch(top / "meta")["fine_label_names"]]
    splits = {}
    for split in ("train", "test"):
        batch = _cifar_batch(top / split)
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
        splits[split] = Split(ArraySource(np.ascontiguousarray(images), origin=f"cifar-100-python/{split}"),
                              _labels([int(v) for v in batch["fine_labels"]]))
    return Listing(classes, splits)


def read_dtd(root: Path) -> Listing:
    top = root / "dtd" / "dtd"
    _need("dtd", top / "images", directory=True)
    entries = {split: _lines("dtd", top / "labels" / f"{split}1.txt") for split in ("train", "test")}
    classes = sorted({line.split("/")[0] for lines in entries.values() for line in lines})
    index = {c: i for i, c in enumerate(classes)}
    return Listing(classes, {split: _files("dtd", top / "images", [(line, index[line.split("/")[0]]) for line in lines])
                             for split, lines in entries.items()})


def read_eurosat(root: Path) -> Listing:
    top = _need("eurosat", root / "eurosat" / "2750", directory=True)
    classes = sorted(p.name for p in top.iterdir() if p.is_dir())
    pairs = [(f"{c}/{f.name}", i) for i, c in enumerate(classes) for f in _images_in(top / c)]
    return Listing(classes, {"all": _files("eurosat", top, pairs)})


def read_flowers(root: Path) -> Listing:
    top = root / "flowers-102"
    _need("flowers", top / "jpg", directory=True)
    labels = [int(v) - 1 for v in np.atleast_1d(_loadmat("flowers", top / "imagelabels.mat")["labels"]).tolist()]
    ids = _loadmat("flowers", top / "setid.mat")
    splits = {}
    for split, key in (("train", "trnid"), ("test", "tstid")):
        if key not in ids:
            raise _missing("flowers", top / "setid.mat", f"has no {key!r} entry")
        image_ids = [int(v) for v in np.atleast_1d(ids[key]).tolist()]
        splits[split] = _files("flowers", top / "jpg", [(f"image_{i:05d}.jpg", labels[i - 1]) for i in image_ids])
    return Listing([str(i) for i in range(max(labels) + 1)], splits)


def read_food(root: Path) -> Listing:
    top = root / "food-101"
    metas = {}
    for split in ("train", "test"):
        path = _need("food", top / "meta" / f"{split}.json")
        try:
            metas[split] = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _missing("food", path, f"is not JSON ({err})") from None
    classes = sorted(metas["train"])
    index = {c: i for i, c in enumerate(classes)}
    return Listing(classes, {split: _files("food", top / "images", [(f"{p}.jpg", index[c]) for c in sorted(meta)
                                                                    for p in meta[c]])
                             for split, meta in metas.items()})


def _idx(name: str, path: Path) -> np.ndarray:
    """An IDX array (the MNIST format), memory-mapped when uncompressed, read into memory when gzipped."""
    def shape_of(head: bytes) -> tuple[int, ...]:
        return tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(head[3]))

    try:
        if path.is_file():
            with open(path, "rb") as f:
                head = f.read(4)
                head += f.read(4 * head[3])
            return np.memmap(path, dtype=np.uint8, mode="r", offset=len(head), shape=shape_of(head))
        gz = path.with_name(path.name + ".gz")
        if not gz.is_file():
            raise _missing(name, path, "is missing (and so is the .gz)")
        with gzip.open(gz) as f:
            data = f.read()
        shape = shape_of(data[: 4 + 4 * data[3]])
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(shape)
    except (IndexError, ValueError, OSError) as err:
        raise _missing(name, path, f"is not an IDX file ({err})") from None


MNIST_CLASSES = ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
                 "8 - eight", "9 - nine")  # torchvision's MNIST.classes, which the MTIL releases prompt with


def read_mnist(root: Path) -> Listing:
    raw = root / "MNIST" / "raw"
    splits = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images = _idx("mnist", raw / f"{stem}-images-idx3-ubyte")
        labels = _idx("mnist", raw / f"{stem}-labels-idx1-ubyte")
        if len(images) != len(labels):
            raise _missing("mnist", raw / f"{stem}-labels-idx1-ubyte", "does not match the image count")
        splits[split] = Split(ArraySource(images, origin=f"MNIST/raw/{stem}-images-idx3-ubyte"),
                              torch.from_numpy(np.asarray(labels, dtype=np.int64).copy()))
    return Listing(list(MNIST_CLASSES), splits)


def read_oxford_pet(root: Path) -> Listing:
    top = root / "oxford-iiit-pet"
    rows = {split: [line.split() for line in _lines("oxford_pet", top / "annotations" / f"{split}.txt")]
            for split in ("trainval", "test")}
    breeds = {int(r[1]) - 1: r[0].rsplit("_", 1)[0] for lines in rows.values() for r in lines}
    classes = [" ".join(part.title() for part in breeds[i].split("_")) for i in sorted(breeds)]
    splits = {name: _files("oxford_pet", top / "images", [(f"{r[0]}.jpg", int(r[1]) - 1) for r in rows[split]])
              for name, split in (("train", "trainval"), ("test", "test"))}
    return Listing(classes, splits)


def read_stanford_cars(root: Path) -> Listing:
    top = root / "stanford_cars"
    classes = [str(c) for c in np.atleast_1d(_loadmat("stanford_cars", top / "devkit" / "cars_meta.mat")["class_names"])]
    splits = {}
    for split, mat, folder in (("train", top / "devkit" / "cars_train_annos.mat", "cars_train"),
                               ("test", top / "cars_test_annos_withlabels.mat", "cars_test")):
        annos = np.atleast_1d(_loadmat("stanford_cars", mat)["annotations"])
        try:
            pairs = [(str(a["fname"]), int(a["class"]) - 1) for a in annos]
        except (ValueError, IndexError, KeyError):
            raise _missing("stanford_cars", mat, "has no annotations with 'fname' and 'class'") from None
        _need("stanford_cars", top / folder, directory=True)
        splits[split] = _files("stanford_cars", top / folder, pairs)
    return Listing(classes, splits)


def read_sun397(root: Path) -> Listing:
    top = root / "SUN397"
    classes = [line[3:] for line in _lines("sun397", top / "ClassName.txt")]  # "/a/abbey" -> "abbey"
    index = {c: i for i, c in enumerate(classes)}
    pairs = []
    for path in sorted(top.rglob("sun_*.jpg")):  # sorted: the releases' file-system order differs between machines
        rel = path.relative_to(top)
        label = index.get("/".join(rel.parts[1:-1]))
        if label is None:
            raise _missing("sun397", path, "is in a folder that ClassName.txt does not list")
        pairs.append((rel.as_posix(), label))
    if not pairs:
        raise _missing("sun397", top / "a", "has no sun_*.jpg images")
    return Listing(classes, {"all": _files("sun397", top, pairs, check=False)})


READERS: dict[str, Callable[[Path], Listing]] = {
    "aircraft": read_aircraft, "caltech101": read_caltech101, "cifar100": read_cifar100, "dtd": read_dtd,
    "eurosat": read_eurosat, "flowers": read_flowers, "food": read_food, "mnist": read_mnist,
    "oxford_pet": read_oxford_pet, "stanford_cars": read_stanford_cars, "sun397": read_sun397,
}
