"""A torchrun worker for tests/test_distributed.py: the synthetic stream of tests/test_engine.py
through the trainer's API: stopped right after the first task's checkpoint, then resumed from it
by fresh models and methods. Rank 0 prints the accuracy matrix as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine import METHOD_ARGS, TASKS, tiny_clip  # noqa: E402

from continual_lora.continual.clip_kind import ClipClassification  # noqa: E402
from continual_lora.continual.clip_task import WordTokenizer  # noqa: E402
from continual_lora.continual.distributed import process_rank  # noqa: E402
from continual_lora.continual.engine import ContinualTrainer, TrainConfig  # noqa: E402
from continual_lora.methods import build_method  # noqa: E402

TRAIN = TrainConfig(iterations=6, batch_size=8, lr=5e-3, progress=False)


def trainer(checkpoint_dir: str | None, method: str, stop_after: int | None = None,
            train: TrainConfig = TRAIN) -> ContinualTrainer:
    texts = [t.format(c) for task in TASKS for c in task.class_names for t in task.templates]
    tokenizer = WordTokenizer.from_texts(texts, context_length=16)

    def stop(state) -> None:
        if stop_after is not None and state.completed == stop_after:
            raise KeyboardInterrupt  # every rank stops at the same boundary, after the checkpoint

    return ContinualTrainer(tiny_clip(tokenizer), build_method(method, **METHOD_ARGS[method]),
                            ClipClassification(tokenizer, TASKS), TASKS, train, checkpoint_dir=checkpoint_dir,
                            on_task_end=stop)


if __name__ == "__main__":
    directory, method = sys.argv[1:3]
    try:
        trainer(directory, method, stop_after=1).run()
    except KeyboardInterrupt:
        pass  # a run killed right after its first checkpoint; fresh models and methods resume it
    state = trainer(directory, method).run(resume=True)
    if process_rank() == 0:
        print("RESULT " + json.dumps({"matrix": state.matrix, "losses": state.train_losses}))
