"""A torchrun worker for tests/test_distributed.py: LiLoRA on the tiny LLaVA through two
instruction tasks whose answers differ in length (1 to 5 tokens), so that the two ranks' rows hold
different numbers of target tokens. Rank 0 prints the accuracy matrix and the losses as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_tiny_llava  # noqa: E402
from test_instruct import color_images, tiny_tokenizer  # noqa: E402

from continual_lora.models.llava_mini import LLAVA_TARGETS  # noqa: E402
from continual_lora.runtime import process_rank  # noqa: E402
from continual_lora.continual import ContinualTrainer, RunState, TrainConfig  # noqa: E402
from continual_lora.kinds.instruct_data import InstructSample, InstructTask  # noqa: E402
from continual_lora.kinds.instruct import InstructionTuning  # noqa: E402
from continual_lora.methods import build_method  # noqa: E402

ANSWERS = ("red", "it is green", "the color is blue .")  # 1, 3 and 5 words
QUESTION = "<image>\nWhat color is it ?"


def ragged_task(name: str, seed: int) -> InstructTask:
    samples = [InstructSample(f"{name}-{k}", ((QUESTION, ANSWERS[k % 3]),), image=k) for k in range(16)]
    return InstructTask(name, samples[:12], samples[12:], scorer="exact", answer_format="sentence",
                        images=color_images(16, seed))


def run() -> RunState:
    tasks = [ragged_task("first", 1), ragged_task("second", 2)]
    tokenizer = tiny_tokenizer([QUESTION, *ANSWERS, "system user assistant"])
    model = make_tiny_llava()
    kind = InstructionTuning.for_model(model, tokenizer, eval_batch_size=4, max_new_tokens=5)
    method = build_method("lilora", rank=4, alpha=8.0, inner_rank=2, dropout=0.0, targets=LLAVA_TARGETS)
    config = TrainConfig(iterations=3, batch_size=4, lr=1e-2, progress=False)
    return ContinualTrainer(model, method, kind, tasks, config).run()


if __name__ == "__main__":
    state = run()
    if process_rank() == 0:
        print("RESULT " + json.dumps({"matrix": state.matrix, "losses": state.train_losses}))
