"""Input-pipeline benchmarks for images read from disk (``continual-lora bench --data``).

* :func:`throughput`: decoded + preprocessed images per second, by number of DataLoader workers, for
  CLIP's evaluation and training preprocessing at a resolution: what sizes ``train.num_workers``
  for a GPU (a ViT-B/16 step at batch 32 wants 32 images per step time).
* :func:`memory`: peak resident memory of a zero-shot evaluation pass and a few training steps on a
  generated on-disk dataset of N JPEG images with a small CLIP at that resolution: it must not grow
  with N (images are read per batch, never held).

Both generate their dataset (an image-folder tree of smooth random JPEGs, 10 classes) unless given one.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contract import index_stream
from ..kinds.images import FileSource, Preprocess, loader


def make_folder_dataset(root: Path, images: int, side: int = 256, classes: int = 10, test_share: float = 0.2) -> Path:
    """An image-folder tree ``root/{train,test}/c<k>/<i>.jpg`` of ``images`` smooth random JPEGs (about
    5 kB each, ``side`` px); kept when it already holds that many."""
    from PIL import Image

    marker = root / f".made-v2-{images}-{side}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(images):
        split = "test" if (i // classes) % round(1 / test_share) == 0 else "train"  # every class in both
        folder = root / split / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((side, side), Image.BILINEAR).save(folder / f"{i}.jpg", quality=85)
    marker.touch()
    return root


def _files(root: Path) -> FileSource:
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    return FileSource(root, paths)


def throughput(images: int = 1000, size: int = 224, workers: tuple[int, ...] = (0, 1, 2), batch_size: int = 32,
               data_dir: str | None = None) -> dict[str, Any]:
    """Images per second (total and per worker) for evaluation and training preprocessing."""
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder_dataset(Path(data_dir or tmp), images)
        source, pre = _files(root), Preprocess(size=size)
        rows = []
        for count in workers:
            for mode in ("evaluation", "training"):
                stream = index_stream(len(source), batch_size, torch.Generator().manual_seed(0))
                batches = max(1, min(len(source), images) // batch_size)
                items = ([(int(i), k) for k, i in enumerate(next(stream).tolist())] for _ in range(batches))
                start = time.perf_counter()
                seen = sum(len(b) for b in loader(source, pre, items, mode == "training", count))
                seconds = time.perf_counter() - start
                rows.append({"workers": count, "mode": mode, "images": seen, "seconds": round(seconds, 3),
                             "images_per_s": round(seen / seconds, 1),
                             "per_worker": round(seen / seconds / max(1, count), 1)})
    return {"size": size, "batch_size": batch_size, "cpu_threads": torch.get_num_threads(), "rows": rows}


def memory(images: int, size: int = 224, steps: int = 20, batch_size: int = 32, workers: int = 2,
           data_dir: str | None = None) -> dict[str, Any]:
    """Peak RSS (MiB) of a zero-shot evaluation pass over the test split and ``steps`` training steps
    on a generated dataset of ``images`` JPEGs, with a small CLIP taking ``size`` px (patch 32): of
    this process, and of the largest DataLoader worker."""
    from transformers import CLIPConfig, CLIPModel

    from ..continual import ContinualTrainer, TrainConfig
    from ..data.folders import folder_task
    from ..kinds.clip import ClipClassification
    from ..methods import build_method
    from ..models.clip import random_clip_config

    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder_dataset(Path(data_dir or tmp), images)
        generated = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        task = folder_task("disk", root=str(root))
        config, tokenizer = random_clip_config("tiny")
        vision = {**config.vision_config.to_dict(), "image_size": size, "patch_size": 32}
        model = CLIPModel(CLIPConfig(text_config=config.text_config.to_dict(), vision_config=vision,
                                     projection_dim=config.projection_dim)).eval()
        kind = ClipClassification(tokenizer, [task], preprocess=Preprocess(size=size), num_workers=workers)
        train = TrainConfig(iterations=steps, batch_size=batch_size, progress=False)
        start = time.perf_counter()
        state = ContinualTrainer(model, build_method("seq_lora", rank=4, targets=["q_proj", "v_proj"]), kind, [task],
                                 train).run()
        seconds = time.perf_counter() - start
    return {"images": images, "train_images": len(task.train_labels), "test_images": len(task.test_labels),
            "size": size, "steps": steps, "workers": workers, "seconds": round(seconds, 1),
            "zero_shot": state.zero_shot, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_rss_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "rss_after_generating_mib": round(generated)}


def format_throughput(result: dict[str, Any]) -> str:
    lines = [f"decode + CLIP preprocessing at {result['size']} px, batches of {result['batch_size']}",
             f"{'workers':>8} {'mode':<11}{'images/s':>10}{'per worker':>12}"]
    lines += [f"{r['workers']:>8} {r['mode']:<11}{r['images_per_s']:>10.1f}{r['per_worker']:>12.1f}" for r in result["rows"]]
    return "\n".join(lines)

