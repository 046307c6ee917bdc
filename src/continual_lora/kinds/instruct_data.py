"""Instruction-tuning data: samples, tasks and the LLaVA-format JSON loader.

LLaVA format (the CVIT / SMoLoRA benchmark's ``Instructions_Single/<Task>/*.json``)::

    [{"id": "000001",
      "image": "COCO2014/train2014/000001.jpg",            # relative to an image root
      "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?\\nAnswer ..."},
                        {"from": "gpt",   "value": "yes"}]},
     ...]

A ``.jsonl`` file holds one such object per line. Turns alternate human / gpt (``user`` /
``assistant`` are accepted too), starting with human. ``<image>`` marks where the image's tokens
go; a record with an image but no marker gets ``"<image>\\n"`` in front of its first human turn
(as LLaVA's own loader does). Optional ``"answers": [...]`` (e.g. VQA's ten human answers) are the
references the last answer is scored against; without it the last gpt turn is the reference. A
test record may end with a human turn if it carries ``answers``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_PLACEHOLDER = "<image>"
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


@dataclass(frozen=True)
class InstructSample:
    """One conversation about (at most) one image."""

    id: str
    turns: tuple[tuple[str, str], ...]  # (human, gpt) pairs; the last gpt may be "" for test-only records
    image: str | int | None = None  # path under the task's image root, or row of ``task.images``
    references: tuple[str, ...] = ()  # what the last answer is scored against (empty: the last gpt turn)

    @property
    def answer(self) -> str:
        return self.turns[-1][1]

    @property
    def targets(self) -> tuple[str, ...]:
        return self.references or (self.answer,)


@dataclass
class InstructTask:
    """A named instruction task: train / test conversations plus how answers are scored."""

    name: str  # task id (letters, digits, '_' or '-'): the adapter key of task-id methods
    train: list[InstructSample]
    test: list[InstructSample]
    scorer: str = "exact"  # key of kinds.scorers.SCORERS
    answer_format: str = "short"  # instruction-following format for MIF (kinds.scorers.FORMATS)
    image_root: Path | None = None  # where ``sample.image`` paths live
    images: torch.Tensor | None = None  # (N, 3, S, S) float in [0, 1], indexed by int ``sample.image``
    meta: dict[str, Any] = field(default_factory=dict)  # free-form description (source, sizes)

    def image(self, sample: InstructSample, size: int) -> torch.Tensor:
        """(3, size, size) float32 in [0, 1]; paths are read with PIL and resized to a square."""
        if isinstance(sample.image, int):
            if self.images is None:
                raise ValueError(f"task {self.name!r}: sample {sample.id} indexes images, but the task has none")
            x = self.images[sample.image].float()
        elif isinstance(sample.image, str):
            x = read_image(self.image_root, sample.image, self.name)
        else:
            raise ValueError(f"task {self.name!r}: sample {sample.id} has no image (text-only samples are "
                             "not supported by the instruction kind)")
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        return x.clamp(0, 1)


def read_image(root: Path | None, relpath: str, task: str) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from ``root / relpath``; a missing file names itself and the task."""
    path = Path(root or ".") / relpath
    if not path.is_file():
        raise FileNotFoundError(f"task {task!r}: image file {path} does not exist")
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def _records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records, got {type(data).__name__}")
    return data


def _turns(record: dict[str, Any], where: str, has_image: bool, answers: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list")
    roles, values = [], []
    for k, turn in enumerate(conv):
        role, value = turn.get("from"), turn.get("value")
        expected = _HUMAN if k % 2 == 0 else _GPT
        if role not in expected or not isinstance(value, str):
            raise ValueError(f"{where}: turn {k} must be {{'from': {expected[0]!r}, 'value': str}}, got {turn!r}")
        roles.append(role)
        values.append(value)
    if len(values) % 2:  # ends with a human turn: a test question scored against "answers"
        if not answers:
            raise ValueError(f"{where}: the conversation ends with a human turn but the record has no 'answers'")
        values.append("")
    if has_image and IMAGE_PLACEHOLDER not in values[0]:
        values[0] = f"{IMAGE_PLACEHOLDER}\n{values[0]}"
    if not has_image:
        values = [v.replace(IMAGE_PLACEHOLDER, "").strip() for v in values]
    return tuple(zip(values[0::2], values[1::2]))


def read_llava_json(path: str | Path, task: str, image_root: str | Path | None = None,
                    check_images: bool = True) -> list[InstructSample]:
    """LLaVA-format records of ``path`` (.json list or .jsonl) as samples of ``task``.

    With ``check_images`` every referenced image must exist under ``image_root`` (checked up front,
    so a missing file stops the run before training); the error names the file and the task.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task {task!r}: instruction file {path} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    samples = []
    for i, record in enumerate(_records(path)):
        rid = str(record.get("id", i))
        where = f"{path} record {i} (id {rid})"
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: 'image' must be a relative path string, got {image!r}")
        if image is not None and check_images and not (root / image).is_file():
            raise FileNotFoundError(f"task {task!r}: image file {root / image} does not exist ({where})")
        answers = record.get("answers", ())
        if isinstance(answers, str):
            answers = (answers,)
        answers = tuple(str(a) for a in answers)
        samples.append(InstructSample(rid, _turns(record, where, image is not None, answers), image, answers))
    return samples


def load_instruct_task(name: str, train_json: str | Path | None, test_json: str | Path, image_root: str | Path,
                       scorer: str, answer_format: str, max_train: int | None = None,
                       max_test: int | None = None, seed: int = 0) -> InstructTask:
    """A task from LLaVA-format train / test files; optional seeded caps on both splits."""
    train = read_llava_json(train_json, name, image_root) if train_json is not None else []
    test = read_llava_json(test_json, name, image_root)
    g = torch.Generator().manual_seed(seed)

    def cap(samples: list[InstructSample], n: int | None) -> list[InstructSample]:
        if n is None or len(samples) <= n:
            return samples
        return [samples[i] for i in sorted(torch.randperm(len(samples), generator=g)[:n].tolist())]

    return InstructTask(name, cap(train, max_train), cap(test, max_test), scorer=scorer,
                        answer_format=answer_format, image_root=Path(image_root),
                        meta={"train_json": str(train_json), "test_json": str(test_json)})


def write_llava_json(path: str | Path, samples: Sequence[InstructSample]) -> None:
    """Write samples (with path images) in LLaVA format, e.g. to export an embedded task."""
    records = []
    for s in samples:
        conv = []
        for human, gpt in s.turns:
            conv += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
        record: dict[str, Any] = {"id": s.id, "conversations": conv}
        if s.image is not None:
            record["image"] = s.image
        if s.references:
            record["answers"] = list(s.references)
        records.append(record)
    Path(path).write_text(json.dumps(records, indent=1))
