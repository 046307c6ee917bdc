"""A torchrun worker for tests/test_distributed.py: the synthetic stream of tests/conftest.py
through the trainer's API: stopped right after the first task's checkpoint, then resumed from it
by fresh models and methods. Rank 0 prints the accuracy matrix as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import (  # noqa: E402
    METHOD_ARGS,
    TASKS,
    TRAIN,
    continual_trainer,
    make_tiny_clip,
    stream_tokenizer,
)

from continual_lora.continual import ContinualTrainer, TrainConfig  # noqa: E402
from continual_lora.kinds.clip import ClipClassification  # noqa: E402
from continual_lora.methods import build_method  # noqa: E402
from continual_lora.runtime import process_rank  # noqa: E402


def trainer(checkpoint_dir: str | None, method: str, stop_after: int | None = None,
            train: TrainConfig = TRAIN) -> ContinualTrainer:
    """A fresh trainer of ``method`` on the stream (every rank stops at the same boundary, after the
    checkpoint)."""
    tokenizer = stream_tokenizer()
    return continual_trainer(make_tiny_clip(tokenizer=tokenizer), build_method(method, **METHOD_ARGS[method]),
                             ClipClassification(tokenizer, TASKS), TASKS, train, tmp=checkpoint_dir,
                             stop_after=stop_after)


if __name__ == "__main__":
    directory, method = sys.argv[1:3]
    try:
        trainer(directory, method, stop_after=1).run()
    except KeyboardInterrupt:
        pass  # a run killed right after its first checkpoint; fresh models and methods resume it
    state = trainer(directory, method).run(resume=True)
    if process_rank() == 0:
        print("RESULT " + json.dumps({"matrix": state.matrix, "losses": state.train_losses}))
