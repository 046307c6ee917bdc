"""Images read on demand: CLIP's preprocessing, tasks whose images stay on disk, and the loader that
decodes a task's batches in ``torch.utils.data.DataLoader`` workers.

A :class:`FileImageTask` holds an :class:`ImageSource` per split (image files under a root, or an
indexable uint8 array such as MNIST's idx file mapped from disk) and the labels, never decoded
images, so memory does not grow with the dataset. Preprocessing is CLIP's (:class:`Preprocess`)::

    evaluation  resize the shorter side to `resize` px (bicubic), centre crop `size` x `size`
    training    random resized crop (area scale in [0.9, 1.0], aspect ratio in [3/4, 4/3]) to
                `size` x `size`, bicubic: the CLIP fine-tuning releases' augmentation
    output      float32 (3, size, size) in [0, 1]; the model's mean / std are applied by the
                CLIP functions (folded into the patch embedding for transformers checkpoints)

Training batches are the index stream of the contract, drawn in the main process, with one
augmentation seed per sample: what a batch holds does not depend on ``num_workers``.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..contract import index_stream


@dataclass(frozen=True)
class Preprocess:
    """CLIP's image preprocessing at one resolution (see the module docstring)."""

    size: int = 224  # side of the square the model takes
    resize: int | None = None  # shorter side before the evaluation centre crop (None: = size)
    train_scale: tuple[float, float] = (0.9, 1.0)  # area fraction of the training crop
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio of the training crop

    @classmethod
    def from_processor(cls, path: str | Path | None, size: int) -> Preprocess:
        """The settings of a model directory's ``preprocessor_config.json`` (CLIPImageProcessor:
        ``size.shortest_edge``, ``crop_size``), or CLIP's defaults at ``size`` without one."""
        if path is None or not Path(path).is_file():
            return cls(size=size)
        spec = json.loads(Path(path).read_text())
        crop = spec.get("crop_size", size)
        crop = crop.get("height", size) if isinstance(crop, dict) else int(crop)
        short = spec.get("size", crop)
        short = short.get("shortest_edge", crop) if isinstance(short, dict) else int(short)
        return cls(size=int(crop), resize=int(short))

    def evaluation(self, image: Any) -> torch.Tensor:
        """A PIL image -> (3, size, size) float32 in [0, 1]: shorter side resized, centre crop."""
        from PIL import Image

        short = self.resize or self.size
        w, h = image.size  # the shorter side becomes `short`, the longer one is truncated as transformers' and torchvision's
        image = image.resize((short, int(short * h / w)) if w <= h else (int(short * w / h), short), Image.BICUBIC)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return _tensor(image.crop((left, top, left + self.size, top + self.size)))

    def training(self, image: Any, rng: random.Random) -> torch.Tensor:
        """A PIL image -> (3, size, size): a random resized crop (torchvision's sampling: ten tries
        for a box of the drawn area and ratio inside the image, else the whole image's centre)."""
        from PIL import Image

        w, h = image.size
        box = None
        for _ in range(10):
            area = w * h * rng.uniform(*self.train_scale)
            ratio = math.exp(rng.uniform(math.log(self.train_ratio[0]), math.log(self.train_ratio[1])))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                box = (left, top, left + cw, top + ch)
                break
        if box is None:  # no try fitted: the centred crop of the image's shape clamped to the ratio range
            ratio = w / h
            if ratio < self.train_ratio[0]:
                cw, ch = w, round(w / self.train_ratio[0])
            elif ratio > self.train_ratio[1]:
                cw, ch = round(h * self.train_ratio[1]), h
            else:
                cw, ch = w, h
            box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        return _tensor(image.resize((self.size, self.size), Image.BICUBIC, box=box))


def _tensor(image: Any) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 in [0, 1] (numpy arithmetic: no intra-op threads per image)."""
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(pixels))


class ImageSource:
    """An indexable set of images (``len``, ``image(i)`` -> RGB PIL image, ``subset``)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int) -> Any:
        raise NotImplementedError

    def subset(self, keep: Sequence[int]) -> ImageSource:
        raise NotImplementedError


class FileSource(ImageSource):
    """Image files: ``root / paths[i]``, decoded with PIL when asked for."""

    def __init__(self, root: str | Path, paths: Sequence[str]) -> None:
        self.root = Path(root)
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Any:
        from PIL import Image

        path = self.root / self.paths[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read image {path}: {err}") from None

    def subset(self, keep: Sequence[int]) -> FileSource:
        return FileSource(self.root, [self.paths[i] for i in keep])


class ArraySource(ImageSource):
    """uint8 images in an array (N, H, W) or (N, H, W, 3), e.g. memory-mapped from disk; ``rows`` selects;
    ``origin`` names where the array comes from (a file, relative to a dataset root)."""

    def __init__(self, array: np.ndarray, rows: Sequence[int] | None = None, origin: str = "") -> None:
        self.array = array
        self.rows = list(range(len(array))) if rows is None else list(rows)
        self.origin = origin

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> Any:
        from PIL import Image

        pixels = np.asarray(self.array[self.rows[i]], dtype=np.uint8)
        return Image.fromarray(pixels).convert("RGB")

    def subset(self, keep: Sequence[int]) -> ArraySource:
        return ArraySource(self.array, [self.rows[i] for i in keep], self.origin)


@dataclass(frozen=True)
class FileImageTask:
    """A classification task whose images are read on demand (see the module docstring)."""

    name: str
    class_names: tuple[str, ...]  # natural-language class names, used in prompts
    templates: tuple[str, ...]  # prompt templates with "{}" (evaluation: all; training: the first)
    train_source: ImageSource
    train_labels: torch.Tensor  # (N,) int64
    test_source: ImageSource
    test_labels: torch.Tensor  # (M,) int64

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def test_subset(self, keep: Sequence[int]) -> FileImageTask:
        """The task with only the test samples ``keep``."""
        return FileImageTask(self.name, self.class_names, self.templates, self.train_source, self.train_labels,
                             self.test_source.subset(keep), self.test_labels[torch.as_tensor(list(keep), dtype=torch.long)])


class _Decode(Dataset):
    """``dataset[(i, seed)]`` -> the preprocessed image i (training: augmented with ``seed``)."""

    def __init__(self, source: ImageSource, preprocess: Preprocess, train: bool) -> None:
        self.source, self.preprocess, self.train = source, preprocess, train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        i, seed = item
        image = self.source.image(i)
        return self.preprocess.training(image, random.Random(seed)) if self.train else self.preprocess.evaluation(image)


class _Items:
    """A batch sampler that replays a fixed iterable of item lists once (the DataLoader asks ``iter``)."""

    def __init__(self, items: Iterator[list[tuple[int, int]]]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.items


def loader(source: ImageSource, preprocess: Preprocess, items: Iterator[list[tuple[int, int]]], train: bool,
           num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of decoded images for the item lists ``items`` ((index, augmentation seed) pairs)."""
    return DataLoader(_Decode(source, preprocess, train), batch_sampler=_Items(items), num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False)


def training_batches(task: FileImageTask, preprocess: Preprocess, batch_size: int, generator: torch.Generator,
                     rows: slice | None, num_workers: int = 0,
                     pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(this process's decoded rows, the global batch's indices) for each step of the task's index
    stream. The stream and the augmentation seeds come from a generator seeded once from
    ``generator``, so prefetching in workers does not change what any batch holds."""
    own = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    pending: deque[torch.Tensor] = deque()

    def items() -> Iterator[list[tuple[int, int]]]:
        for indices in index_stream(len(task.train_labels), batch_size, own):
            seeds = torch.randint(2**31, (batch_size,), generator=own)
            pending.append(indices)
            keep = slice(None) if rows is None else rows
            yield list(zip(indices[keep].tolist(), seeds[keep].tolist()))

    for images in loader(task.train_source, preprocess, items(), True, num_workers, pin_memory):
        yield images, pending.popleft()


def evaluation_batches(source: ImageSource, labels: torch.Tensor, preprocess: Preprocess, batch_size: int,
                       num_workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of a test split in order, ``batch_size`` at a time."""
    n = len(source)
    items = ([(i, 0) for i in range(start, min(start + batch_size, n))] for start in range(0, n, batch_size))
    for start, images in zip(range(0, n, batch_size), loader(source, preprocess, items, False, num_workers, pin_memory)):
        yield images, labels[start : start + batch_size]
