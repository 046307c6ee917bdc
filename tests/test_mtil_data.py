"""MTIL / X-TAIL on real datasets and users' own folders, read from disk: the 11 readers on a fixture in
every dataset's exact layout (tests/mtil_fixture.py), the protocol's splits, manifests, errors,
`data check`, streaming (no dataset held as a tensor; batches independent of the worker count) and
an end-to-end run with resume."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from mtil_fixture import COUNTS, make_mtil_root

from continual_lora.cli import main
from continual_lora.data import mtil
from continual_lora.data.folders import FolderLayoutError, folder_task
from continual_lora.data.mtil_readers import DataLayoutError
from continual_lora.kinds.images import ArraySource, FileImageTask, FileSource, Preprocess, training_batches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_mtil_root(tmp_path_factory.mktemp("mtil"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTINUAL_LORA_CACHE", str(tmp_path / "cache"))  # split manifests go here


@pytest.mark.parametrize("name", mtil.DATASETS)
def test_every_dataset_reads_with_its_classes_and_the_protocols_split(root, name) -> None:
    data = mtil.read_dataset(name, root)
    classes, train, test = COUNTS[name]
    assert len(data.class_names) == classes and len(set(data.class_names)) == classes
    if test is None:  # 80/20, train = int(0.8 n) as ZSCL's split_dataset
        assert len(data.train.labels) == int(0.8 * train) and len(data.test.labels) == train - int(0.8 * train)
    else:
        assert (len(data.train.labels), len(data.test.labels)) == (train, test)
    assert data.templates == tuple(mtil.prompts()[name]["templates"]) and all("{}" in t for t in data.templates)
    labels = torch.cat([data.train.labels, data.test.labels])
    assert int(labels.min()) >= 0 and int(labels.max()) < classes
    image = data.test.source.image(0)
    assert image.mode == "RGB" and min(image.size) > 0


def test_class_names_follow_the_protocol(root) -> None:
    names = {n: mtil.read_dataset(n, root).class_names for n in mtil.DATASETS}
    assert names["caltech101"][:2] == ("off-center face", "centered face")  # the protocol's own lists
    assert names["eurosat"][0] == "annual crop land" and names["flowers"][0] == "pink primrose"
    assert names["mnist"][:2] == ("0 - zero", "1 - one") and names["cifar100"][1] == "aquarium fish"
    assert names["oxford_pet"] == ("Abyssinian", "American Bulldog", "Yorkshire Terrier")
    assert names["sun397"] == ("abbey", "apartment building/outdoor", "bus interior")
    assert names["aircraft"] == ("707-320", "A300B4", "Cessna 172") and names["food"][0] == "apple pie"
    assert names["stanford_cars"][0] == "AM General Hummer SUV 2000"


@pytest.mark.parametrize("name", mtil.RANDOM_SPLIT)
def test_random_splits_are_torchs_random_split_of_the_sorted_files_whatever_the_listing_order(
        root, name, monkeypatch, tmp_path) -> None:
    data = mtil.read_dataset(name, root, split_dir=tmp_path / "a")
    real_iterdir, real_rglob = Path.iterdir, Path.rglob

    def shuffled(generator):
        items = list(generator)
        random.Random(7).shuffle(items)
        return iter(items)

    monkeypatch.setattr(Path, "iterdir", lambda self: shuffled(real_iterdir(self)))
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: shuffled(real_rglob(self, pattern)))
    again = mtil.read_dataset(name, root, split_dir=tmp_path / "b")  # no manifest: listed and split again
    assert again.train.source.paths == data.train.source.paths and torch.equal(again.train.labels, data.train.labels)
    monkeypatch.undo()
    everything = sorted(data.train.source.paths + data.test.source.paths)
    train, _ = torch.utils.data.random_split(everything, [int(0.8 * len(everything)),
                                                          len(everything) - int(0.8 * len(everything))],
                                             generator=torch.Generator().manual_seed(42))
    assert [everything[i] for i in train.indices] == data.train.source.paths  # the releases' split rule


def test_split_manifests_round_trip_and_refuse_corruption(root, tmp_path, monkeypatch) -> None:
    first = {n: mtil.read_dataset(n, root, split_dir=tmp_path) for n in ("dtd", "mnist", "sun397")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dtd.json", "mnist.json", "sun397.json"]
    monkeypatch.setitem(mtil.READERS, "dtd", lambda _: pytest.fail("the manifest should be read, not the listing"))
    again = mtil.read_dataset("dtd", root, split_dir=tmp_path)
    assert again.train.source.paths == first["dtd"].train.source.paths and again.class_names == first["dtd"].class_names
    mnist = mtil.read_dataset("mnist", root, split_dir=tmp_path)
    assert mnist.test.source.rows == first["mnist"].test.source.rows
    manifest = json.loads((tmp_path / "sun397.json").read_text())
    manifest["train"]["samples"][0][1] = 2  # relabel one image
    (tmp_path / "sun397.json").write_text(json.dumps(manifest))
    with pytest.raises(DataLayoutError, match="sun397: the split manifest .* SHA-256 does not match"):
        mtil.read_dataset("sun397", root, split_dir=tmp_path)


BREAKS = {  # dataset -> the file to remove (relative to the root) and a word of the layout in the message
    "aircraft": "fgvc-aircraft-2013b/data/images_variant_test.txt", "caltech101": "caltech101/101_ObjectCategories",
    "cifar100": "cifar-100-python/meta", "dtd": "dtd/dtd/labels/train1.txt", "eurosat": "eurosat/2750",
    "flowers": "flowers-102/setid.mat", "food": "food-101/meta/test.json", "mnist": "MNIST/raw/t10k-labels-idx1-ubyte",
    "oxford_pet": "oxford-iiit-pet/annotations/test.txt", "stanford_cars": "stanford_cars/cars_test_annos_withlabels.mat",
    "sun397": "SUN397/ClassName.txt",
}


@pytest.mark.parametrize("name", mtil.DATASETS)
def test_a_missing_file_names_the_dataset_the_file_and_the_layout(tmp_path, name) -> None:
    import shutil

    broken = make_mtil_root(tmp_path / "root")
    target = broken / BREAKS[name]
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DataLayoutError) as info:
        mtil.read_dataset(name, broken)
    message = str(info.value)
    assert message.startswith(f"{name}: ") and str(target) in message and "expected under the root" in message
    assert "\n" not in message


def test_a_malicious_cifar_pickle_is_refused(tmp_path) -> None:
    broken = make_mtil_root(tmp_path / "root")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (broken / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"fine_label_names": Evil()}, protocol=2))
    with pytest.raises(DataLayoutError, match=r"print is not allowed in a CIFAR batch"):
        mtil.read_dataset("cifar100", broken)


def test_gzipped_mnist_reads_too(tmp_path) -> None:
    data = mtil.read_dataset("mnist", make_mtil_root(tmp_path / "root", gzip_mnist=True))
    assert len(data.train.labels) == 20 and np.asarray(data.train.source.image(3)).shape == (28, 28, 3)


def test_data_check_prints_a_table_and_json_and_exits_2_when_something_is_missing(root, tmp_path, capsys) -> None:
    assert main(["data", "check", "mtil", "--root", str(root)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["missing"] == [] and list(report["datasets"]) == list(mtil.DATASETS)
    assert report["datasets"]["caltech101"] == {"classes": 101, "train": 161, "test": 41, "ok": True}
    assert report["datasets"]["flowers"] == {"classes": 102, "train": 102, "test": 102, "ok": True}
    assert out[0].split() == ["dataset", "classes", "train", "test", "status"]
    partial = make_mtil_root(tmp_path / "partial")
    (partial / "food-101" / "meta" / "train.json").unlink()
    assert main(["data", "check", "mtil", "--root", str(partial)]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["missing"] == ["food"]
    assert captured.err.count("error: ") == 1 and "food: " in captured.err and "meta/train.json" in captured.err
    # files that are there but hold something else: still one line per dataset, no traceback
    broken = make_mtil_root(tmp_path / "broken")
    (broken / "oxford-iiit-pet" / "annotations" / "test.txt").write_text("Abyssinian_1\n")  # no class column
    (broken / "food-101" / "meta" / "train.json").write_text('{"not_a_class": 1}')
    assert main(["data", "check", "mtil", "--root", str(broken)]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["missing"] == ["food", "oxford_pet"]
    assert captured.err.count("error: ") == 2 and "Traceback" not in captured.err
    assert "oxford_pet: the files under" in captured.err and "IndexError" in captured.err


# --- streaming -----------------------------------------------------------------------------------------------
def test_tasks_hold_paths_or_mapped_arrays_never_decoded_images(root) -> None:
    tasks = mtil.mtil_tasks(root, ["dtd", "mnist", "cifar100"], shots=None)
    for task in tasks:
        assert isinstance(task, FileImageTask)
        tensors = [v for v in vars(task).values() if isinstance(v, torch.Tensor)]
        assert all(not t.is_floating_point() and t.dim() == 1 for t in tensors)  # labels only
        assert isinstance(task.train_source, (FileSource, ArraySource))
    assert isinstance(tasks[1].train_source.array, np.memmap)  # MNIST: mapped from its IDX file


def test_xtail_label_space_over_the_11_datasets_and_rails_10(root) -> None:
    from continual_lora.benchmarks.mtil import MtilConfig
    from continual_lora.config import from_dict
    from continual_lora.kinds.clip import xtail_label_space

    tasks = mtil.mtil_tasks(root, list(mtil.DATASETS), shots=1)
    names, index = xtail_label_space(tasks)
    every = [n for task in tasks for n in task.class_names]
    assert len(every) == sum(c for c, _, _ in COUNTS.values())
    # as in the real datasets, "lotus" is a Caltech101 and a Flowers class, "sunflower" one of those and CIFAR100's
    assert len(names) == len(set(every)) == len(every) - 3
    for task, idx in zip(tasks, index):
        assert [names[i] for i in idx] == list(task.class_names)
    by_name = {t.name: i for i, t in enumerate(tasks)}
    sunflower = names.index("sunflower")
    assert all(sunflower in index[by_name[d]] for d in ("caltech101", "cifar100", "flowers"))
    rail = from_dict(MtilConfig, {"datasets": [d for d in mtil.DATASETS if d != "cifar100"], "xtail": True})
    assert rail.stream() == [d for d in mtil.ORDERS["I"] if d != "cifar100"]
    rail_names, _ = xtail_label_space([tasks[by_name[d]] for d in rail.stream()])
    assert len(rail_names) == len(names) - 3 and "sunflower" in rail_names  # apple, aquarium fish, baby leave


def test_k_shot_keeps_k_per_class_or_all_a_class_has(root) -> None:
    (task,) = mtil.mtil_tasks(root, ["eurosat"], shots=2)
    available = torch.bincount(mtil.read_dataset("eurosat", root).train.labels, minlength=10)
    assert torch.bincount(task.train_labels, minlength=10).tolist() == available.clamp(max=2).tolist()
    (task,) = mtil.mtil_tasks(root, ["aircraft"], shots=1)
    assert torch.bincount(task.train_labels).tolist() == [1, 1, 1] and len(task.test_labels) == 3


def test_training_batches_do_not_depend_on_the_number_of_workers(root) -> None:
    (task,) = mtil.mtil_tasks(root, ["dtd"], shots=None)
    pre = Preprocess(size=16)

    def first(workers: int, rows=None) -> list:
        out = training_batches(task, pre, 4, torch.Generator().manual_seed(3), rows, num_workers=workers)
        return [next(out) for _ in range(3)]

    serial, parallel = first(0), first(2)
    for (a, ia), (b, ib) in zip(serial, parallel):
        assert torch.equal(a, b) and torch.equal(ia, ib) and a.shape == (4, 3, 16, 16)
    half = first(0, rows=slice(2, 4))  # a data-parallel rank decodes its own rows of the same global batch
    assert torch.equal(half[0][0], serial[0][0][2:4]) and torch.equal(half[0][1], serial[0][1])


def test_clip_preprocessing() -> None:
    from PIL import Image

    wide = Image.fromarray((np.arange(40 * 60 * 3) % 251).astype(np.uint8).reshape(40, 60, 3))
    pre = Preprocess(size=32)
    x = pre.evaluation(wide)  # shorter side 40 -> 32, then the centre 32 x 32
    assert x.shape == (3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    square = Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3))
    a, b = pre.training(square, random.Random(1)), pre.training(square, random.Random(1))
    assert torch.equal(a, b) and not torch.equal(a, pre.training(square, random.Random(2)))
    # a 1.5:1 image fits no crop of ratio <= 4/3 at 90 % of its area: the clamped centre crop, every time
    assert torch.equal(pre.training(wide, random.Random(1)), pre.training(wide, random.Random(2)))
    spec = Path(__file__).parent / "_pre.json"
    try:
        spec.write_text(json.dumps({"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}}))
        assert Preprocess.from_processor(spec, 32) == Preprocess(size=224, resize=256)
    finally:
        spec.unlink()
    assert Preprocess.from_processor(None, 32) == Preprocess(size=32)


def test_evaluation_preprocessing_equals_transformers_clip_image_processor() -> None:
    """Shorter side to the size (bicubic; the longer side truncated, as transformers and torchvision do),
    centre crop: the pixels CLIPImageProcessor gives, bit for bit (before normalisation)."""
    import warnings

    from PIL import Image
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers notes that torchvision is absent (deliberately)
        hf = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                do_normalize=False)
    for w, h in [(500, 375), (375, 500), (333, 250), (640, 427), (224, 224)]:  # 500 x 375: long side 298, not 299
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = torch.tensor(hf(image, return_tensors="np")["pixel_values"][0])
        assert torch.equal(Preprocess(size=224).evaluation(image), expected), (w, h)


# --- users' own folders ----------------------------------------------------------------------------------------
def test_folder_tasks_from_a_tree_a_csv_and_a_jsonl(tmp_path) -> None:
    from mtil_fixture import _image

    for split, per in (("train", 3), ("test", 2)):
        for c in ("red_car", "blue_car"):
            for k in range(per):
                _image(tmp_path / "tree" / split / c / f"{k}.png", k)
    tree = folder_task("cars", root=str(tmp_path / "tree"))
    assert tree.class_names == ("blue car", "red car") and len(tree.train_labels) == 6 and len(tree.test_labels) == 4
    rows = ["path,label,split"] + [f"tree/{s}/{c}/{k}.png,{c},{s}" for s, per in (("train", 3), ("test", 2))
                                   for c in ("red_car", "blue_car") for k in range(per)]
    (tmp_path / "cars.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "names.tsv").write_text("red_car\ta red car\nblue_car\ta blue car\n")
    csv_task = folder_task("cars", manifest=str(tmp_path / "cars.csv"), class_names=str(tmp_path / "names.tsv"),
                           templates=("a photo of {}.",))
    assert csv_task.class_names == ("a blue car", "a red car") and torch.equal(csv_task.train_labels.sort().values,
                                                                                tree.train_labels.sort().values)
    (tmp_path / "cars.jsonl").write_text("\n".join(json.dumps({"path": r.split(",")[0], "label": r.split(",")[1],
                                                                  "split": r.split(",")[2]}) for r in rows[1:]))
    assert len(folder_task("cars", manifest=str(tmp_path / "cars.jsonl")).test_labels) == 4
    with pytest.raises(FolderLayoutError, match="test is missing"):
        (tmp_path / "half" / "train" / "a").mkdir(parents=True)
        folder_task("half", root=str(tmp_path / "half"))
    with pytest.raises(FolderLayoutError, match="must contain"):
        folder_task("cars", root=str(tmp_path / "tree"), templates=("no slot",))


# --- end to end ------------------------------------------------------------------------------------------------
RUN = """name: real
model: {source: random, clip_config: tiny}
benchmark: {name: mtil, root: ROOT, datasets: [dtd, mnist, cifar100], shots: 2, xtail: true}
train: {iterations: 2, batch_size: 4, progress: false, num_workers: WORKERS}
methods: [{name: seq_lora, rank: 2, targets: [q_proj, v_proj]}]
"""


def test_a_run_on_the_mtil_root_resumes_and_does_not_depend_on_workers(root, tmp_path, capsys, monkeypatch) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(RUN.replace("ROOT", str(root)).replace("WORKERS", "0"))
    assert main(["run", str(config), f"output_dir={tmp_path}/full"]) == 0
    full = json.loads((tmp_path / "full" / "real" / "seq_lora" / "results.json").read_text())
    assert full["finished"] and full["tasks"] == ["cifar100", "dtd", "mnist"]  # order I: alphabetical
    assert full["xtail"]["metrics"] and len(full["xtail"]["matrix"]) == 3

    from continual_lora.app import runner

    real = runner.write_results

    def killed(run_dir, results):  # the process dies right after the second task's checkpoint
        if len(results["matrix"]) == 2:
            raise KeyboardInterrupt
        real(run_dir, results)

    monkeypatch.setattr(runner, "write_results", killed)
    assert main(["run", str(config), f"output_dir={tmp_path}/cut", "train.num_workers=2"]) == 130
    monkeypatch.setattr(runner, "write_results", real)
    assert main(["run", str(config), f"output_dir={tmp_path}/cut", "--resume"]) == 0
    resumed = json.loads((tmp_path / "cut" / "real" / "seq_lora" / "results.json").read_text())
    assert resumed["matrix"] == full["matrix"] and resumed["train_losses"] == full["train_losses"]
    assert resumed["xtail"]["matrix"] == full["xtail"]["matrix"]
