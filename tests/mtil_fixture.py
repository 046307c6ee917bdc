"""A tiny MTIL root in every dataset's exact torchvision layout: generated images and metadata files
(.txt, .json, .mat, IDX, CIFAR pickles), a few images per class. ``COUNTS`` says what each holds."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

# dataset -> (classes, train images, test images) of the fixture; 80/20 datasets: (classes, all, None)
COUNTS = {
    "aircraft": (3, 6, 3), "caltech101": (101, 202, None), "cifar100": (4, 8, 4), "dtd": (3, 6, 3),
    "eurosat": (10, 30, None), "flowers": (102, 102, 102), "food": (3, 6, 3), "mnist": (10, 20, 10),
    "oxford_pet": (3, 6, 3), "stanford_cars": (3, 6, 3), "sun397": (3, 10, None),
}


def _image(path: Path, seed: int, size: int = 20) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(path)


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mtil_root(root: Path, gzip_mnist: bool = False) -> Path:
    """Write the fixture under ``root`` (see COUNTS) and return it."""
    seed = iter(range(10**6))
    # aircraft: variants.txt + images_variant_<split>.txt ("<id> <variant with spaces>")
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, per in (("train", 2), ("test", 1)):
        lines = []
        for c, v in enumerate(variants):
            for k in range(per):
                image = f"{c}{k}{split[:2]}0001"
                _image(data / "images" / f"{image}.jpg", next(seed))
                lines.append(f"{image} {v}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    # caltech101: 101 categories + BACKGROUND_Google, image_%04d.jpg
    top = root / "caltech101" / "101_ObjectCategories"
    for c in range(101):
        for k in range(1, 3):
            _image(top / f"cat{c:03d}" / f"image_{k:04d}.jpg", next(seed), size=8)
    _image(top / "BACKGROUND_Google" / "image_0001.jpg", next(seed), size=8)
    # cifar100: python pickles (data rows of 3072 uint8, fine_labels), meta fine_label_names ("sunflower" is
    # also a Caltech101 and a Flowers class, as in the real datasets: X-TAIL merges it)
    top = root / "cifar-100-python"
    top.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, per in (("train", 2), ("test", 1)):
        labels = [c for c in range(4) for _ in range(per)]
        batch = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "fine_labels": labels,
                 "filenames": [f"img{i}.png".encode() for i in range(len(labels))]}
        (top / split).write_bytes(pickle.dumps(batch, protocol=2))
    (top / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "aquarium_fish", "baby", "sunflower"]},
                                            protocol=2))
    # dtd: dtd/dtd/images/<cls>/<name>.jpg, labels/{train1,test1}.txt
    top = root / "dtd" / "dtd"
    for split, per in (("train", 2), ("test", 1)):
        lines = []
        for c in ("banded", "blotchy", "zigzagged"):
            for k in range(per):
                name = f"{c}_{split}{k}.jpg"
                _image(top / "images" / c / name, next(seed))
                lines.append(f"{c}/{name}")
        (top / "labels").mkdir(parents=True, exist_ok=True)
        (top / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    # eurosat: eurosat/2750/<Class>/*.jpg
    for c in ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
              "Residential", "River", "SeaLake"):
        for k in range(3):
            _image(root / "eurosat" / "2750" / c / f"{c}_{k + 1}.jpg", next(seed), size=8)
    # flowers: jpg/image_%05d.jpg, imagelabels.mat (1-based labels), setid.mat (trnid, valid, tstid)
    top = root / "flowers-102"
    labels = []
    for i in range(1, 205):
        _image(top / "jpg" / f"image_{i:05d}.jpg", next(seed), size=8)
        labels.append((i - 1) % 102 + 1)
    savemat(top / "imagelabels.mat", {"labels": np.array([labels])})
    savemat(top / "setid.mat", {"trnid": np.arange(1, 103)[None], "valid": np.array([[103]]),
                                "tstid": np.arange(103, 205)[None]})
    # food: images/<cls>/<id>.jpg, meta/{train,test}.json
    top = root / "food-101"
    for split, per in (("train", 2), ("test", 1)):
        meta = {}
        for c in ("apple_pie", "baby_back_ribs", "waffles"):
            meta[c] = [f"{c}/{split}{k}" for k in range(per)]
            for entry in meta[c]:
                _image(top / "images" / f"{entry}.jpg", next(seed))
        (top / "meta").mkdir(parents=True, exist_ok=True)
        (top / "meta" / f"{split}.json").write_text(json.dumps(meta))
    # mnist: MNIST/raw/*-ubyte (IDX)
    raw = root / "MNIST" / "raw"
    for stem, per in (("train", 2), ("t10k", 1)):
        labels = np.array([c for c in range(10) for _ in range(per)], dtype=np.uint8)
        images = np.random.default_rng(2).integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        _idx(raw / f"{stem}-images-idx3-ubyte", images)
        _idx(raw / f"{stem}-labels-idx1-ubyte", labels)
        if gzip_mnist:
            for name in (f"{stem}-images-idx3-ubyte", f"{stem}-labels-idx1-ubyte"):
                (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
                (raw / name).unlink()
    # oxford pet: images/<Breed_id>.jpg, annotations/{trainval,test}.txt ("id class species breed")
    top = root / "oxford-iiit-pet"
    (top / "annotations").mkdir(parents=True)
    for split, per in (("trainval", 2), ("test", 1)):
        lines = []
        for c, breed in enumerate(("Abyssinian", "american_bulldog", "yorkshire_terrier")):
            for k in range(per):
                image = f"{breed}_{split}{k}"
                _image(top / "images" / f"{image}.jpg", next(seed))
                lines.append(f"{image} {c + 1} 1 1")
        (top / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    # stanford cars: cars_{train,test}/, devkit/{cars_meta,cars_train_annos}.mat, cars_test_annos_withlabels.mat
    top = root / "stanford_cars"
    (top / "devkit").mkdir(parents=True)
    savemat(top / "devkit" / "cars_meta.mat",
            {"class_names": np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Volvo XC90 SUV 2007"]],
                                     dtype=object)})
    for split, mat, per in (("train", top / "devkit" / "cars_train_annos.mat", 2),
                            ("test", top / "cars_test_annos_withlabels.mat", 1)):
        records = []
        for c in range(3):
            for k in range(per):
                fname = f"{c}{k}{split}.jpg"
                _image(top / f"cars_{split}" / fname, next(seed))
                records.append((1, 1, 9, 9, c + 1, fname))
        annos = np.array(records, dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
                                         ("class", "O"), ("fname", "O")])
        savemat(mat, {"annotations": annos[None]})
    # sun397: ClassName.txt ("/a/abbey"), <letter>/<class>[/<sub>]/sun_*.jpg
    top = root / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bus_interior"]
    top.mkdir(parents=True)
    (top / "ClassName.txt").write_text("\n".join(classes) + "\n")
    for c, count in zip(classes, (4, 3, 3)):
        for k in range(count):
            _image(top / c.strip("/") / f"sun_{c.strip('/').replace('/', '')}{k}.jpg", next(seed), size=8)
    return root
