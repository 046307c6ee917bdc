"""The instruction-tuning task kind: LLaVA-style next-token training and greedy-decoding evaluation.

Plugs :class:`~.instruct_data.InstructTask` into the trainer's :class:`~continual_lora.contract.TaskKind`
(``protocol = "cvit"``: AP / MAP / BWT from the accuracy matrix).

Encoding of one conversation, with the language model's own chat template::

    text  = template(system?, user_1, assistant_1, ..., user_n, assistant_n)
    ids   = tokens of text, each "<image>" replaced by ``image_tokens`` copies of the image token id
    labels= ids on the assistant replies (answer + end-of-turn token), -100 everywhere else

The template is rendered turn by turn; the assistant span of turn k is the text that
``template(..., assistant_k)`` adds to ``template(..., user_k, add_generation_prompt=True)``
(trailing whitespace after it is context, not target). The number of image tokens follows the
LLaVA config: ``(image_size / patch_size)^2``, plus one for ``vision_feature_select_strategy="full"``.

Evaluation: the prompt of the last turn (left-padded batches), greedy decoding of at most
``max_new_tokens`` (default by answer format: letter 4, short 10, sentence 32), scored by the
task's scorer (:mod:`.scorers`). Each evaluation's instruction-following rate (MIF) and a few
sample answers are logged on the kind; :meth:`extra_results` adds them to a run's results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import Gather, Routing, TaskKind, no_gather
from .instruct_data import IMAGE_PLACEHOLDER, InstructSample, InstructTask
from .scorers import FORMATS, SCORERS, instruction_following_rate

IGNORE_INDEX = -100
DEFAULT_NEW_TOKENS = {"letter": 4, "short": 10, "sentence": 32}


def image_token_count(config: Any) -> int:
    """Image tokens per image for a LLaVA config (one image, no tiling)."""
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n + 1 if config.vision_feature_select_strategy == "full" else n


class InstructionTuning(TaskKind):
    """Task kind for LLaVA-style models on :class:`InstructTask` streams."""

    protocol = "cvit"
    routing_modes = ("prototype",)  # confidence routing needs class scores; answers are free text

    def __init__(self, tokenizer: Any, image_token_id: int, image_tokens: int, image_size: int,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 device: str = "cpu", max_length: int | None = None, max_new_tokens: int | None = None,
                 eval_batch_size: int = 32, system_prompt: str | None = None, chat_template: str | None = None,
                 evaluate_future: bool = True, examples: int = 3) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens
        self.image_size = image_size
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
        self.device = device
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.eval_batch_size = eval_batch_size
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.evaluate_future = evaluate_future  # read by the trainer: False skips tasks not trained yet
        self.examples = examples
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self.log: list[dict[str, Any]] = []  # one entry per evaluate() call
        # encode() of evaluation prompts, scored again after every task; training samples are not kept
        # (a CVIT epoch sees each once, and with image tokens expanded they would fill host memory)
        self._prompts: dict[tuple[Any, ...], tuple[list[int], list[int]]] = {}

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, **kwargs: Any) -> "InstructionTuning":
        config = model.config
        return cls(tokenizer, config.image_token_id, image_token_count(config), config.vision_config.image_size,
                   **kwargs)

    # --- encoding ---------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        kw = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kw)

    def _tokens(self, text: str) -> list[int]:
        """Token ids of ``text``; each "<image>" becomes ``image_tokens`` image-token ids."""
        out: list[int] = []
        for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                out += [self.image_token_id] * self.image_tokens
            if part:
                out += self.tokenizer(part, add_special_tokens=False)["input_ids"]
        return out

    def encode(self, sample: InstructSample, with_answer: bool = True) -> tuple[list[int], list[int]]:
        """(input ids, labels) of ``sample``; without the answer: the prompt of its last turn."""
        key = (sample.id, sample.turns)
        if not with_answer and key in self._prompts:
            return self._prompts[key]
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        ids: list[int] = []
        labels: list[int] = []
        done = ""  # text already tokenized
        for k, (human, gpt) in enumerate(sample.turns):
            messages.append({"role": "user", "content": human})
            prompt = self._render(messages, generation_prompt=True)
            if not prompt.startswith(done):
                raise ValueError("the chat template does not render conversations prefix by prefix")
            piece = self._tokens(prompt[len(done):])
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
            if k == len(sample.turns) - 1 and not with_answer:
                break
            messages.append({"role": "assistant", "content": gpt})
            full = self._render(messages, generation_prompt=False)
            if not full.startswith(prompt):
                raise ValueError("the chat template's assistant turn does not extend its generation prompt")
            reply = full[len(prompt):]
            target, tail = reply.rstrip(), reply[len(reply.rstrip()):]
            answer = self._tokens(target)
            rest = self._tokens(tail) if tail else []
            ids += answer + rest
            labels += answer + [IGNORE_INDEX] * len(rest)
            done = full
        if ids.count(self.image_token_id) != self.image_tokens * (sample.image is not None):
            raise ValueError(f"sample {sample.id}: expected one {IMAGE_PLACEHOLDER} for its image, found "
                             f"{ids.count(self.image_token_id) // max(1, self.image_tokens)}")
        if self.max_length is not None and len(ids) > self.max_length:
            if self.image_token_id in ids[self.max_length:]:
                raise ValueError(f"sample {sample.id}: max_length {self.max_length} would cut its image tokens")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not with_answer:
            self._prompts[key] = (ids, labels)
        return ids, labels

    def _pixels(self, task: InstructTask, samples: Sequence[InstructSample]) -> torch.Tensor:
        images = torch.stack([task.image(s, self.image_size) for s in samples])  # (B, 3, S, S) in [0, 1]
        return ((images - self.mean) / self.std).to(self.device)

    def _pad(self, rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if left:
                out[i, width - len(r):] = torch.tensor(r)
            else:
                out[i, : len(r)] = torch.tensor(r)
        return out

    # --- TaskKind -----------------------------------------------------------------------------
    def num_train(self, task: InstructTask) -> int:
        return len(task.train)

    def num_test(self, task: InstructTask) -> int:
        return len(task.test)

    def train_batch(self, task: InstructTask, indices: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
        samples = [task.train[i] for i in indices.tolist()]
        encoded = [self.encode(s) for s in samples]
        ids = self._pad([e[0] for e in encoded], self.pad_id, left=False)  # (B, L)
        labels = self._pad([e[1] for e in encoded], IGNORE_INDEX, left=False)  # (B, L)
        mask = self._pad([[1] * len(e[0]) for e in encoded], 0, left=False)  # (B, L)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "labels": labels.to(self.device), "pixel_values": self._pixels(task, samples)}

    def plain_batch(self, task: InstructTask, indices: torch.Tensor) -> dict[str, Any]:
        """LLaVA's stage-1 "plain" format, no chat template: image tokens, newline, the answer
        (a caption) and end-of-sequence; the loss covers the caption and the end token only."""
        samples = [task.train[i] for i in indices.tolist()]
        head = [self.image_token_id] * self.image_tokens + self._tokens("\n")
        eos = self.tokenizer.eos_token_id
        rows = [head + self._tokens(s.answer) + [eos] for s in samples]
        labels = [[IGNORE_INDEX] * len(head) + r[len(head):] for r in rows]
        return {"input_ids": self._pad(rows, self.pad_id, left=False).to(self.device),
                "attention_mask": self._pad([[1] * len(r) for r in rows], 0, left=False).to(self.device),
                "labels": self._pad(labels, IGNORE_INDEX, left=False).to(self.device),
                "pixel_values": self._pixels(task, samples)}

    def loss(self, model: nn.Module, batch: dict[str, Any], gather: Gather = no_gather) -> torch.Tensor:
        """Mean next-token cross-entropy over the assistant tokens of the batch (the model's own
        ``.loss`` in one process).

        Data-parallel: each rank's per-sample NLL sums and token counts are gathered
        (``gather``), so every rank computes the token mean of the GLOBAL batch. The mean of
        per-rank token means would weight a token by 1 / (its rank's token count).
        """
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
        # token t predicts token t + 1: shift the labels, not the logits (no copy of the (B, T, V) tensor)
        target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)  # (B, T)
        # (rows, V) layout: the (B, V, T) one is about 10x less accurate on CPU (7e-5 vs 7e-6 per token)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)  # 0 where ignored
        sums = gather(nll.sum(dim=1))  # (B_global,)
        counts = gather((target != IGNORE_INDEX).sum(dim=1))  # (B_global,)
        return sums.sum() / counts.sum().clamp_min(1)

    @torch.no_grad()
    def generate(self, model: nn.Module, task: InstructTask, samples: Sequence[InstructSample],
                 routing: Routing | None = None) -> list[str]:
        """Greedy answers to the last turn of each sample; with ``routing``, each sample's answer is
        generated through the adapter its router picks from the sample's image (one mixed batch)."""
        fmt_tokens = DEFAULT_NEW_TOKENS.get(task.answer_format, 32)
        max_new = self.max_new_tokens if self.max_new_tokens is not None else fmt_tokens
        eos = [t for t in {self.tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
               if isinstance(t, int)]
        answers: list[str] = []
        for start in range(0, len(samples), self.eval_batch_size):
            chunk = samples[start : start + self.eval_batch_size]
            prompts = [self.encode(s, with_answer=False)[0] for s in chunk]
            ids = self._pad(prompts, self.pad_id, left=True).to(self.device)
            mask = self._pad([[1] * len(p) for p in prompts], 0, left=True).to(self.device)
            pixels = self._pixels(task, chunk)
            select = contextlib.nullcontext()
            if routing is not None:
                with routing.base():
                    index = routing.assign(self._vision_features(model, pixels))
                routing.record(task.name, index.cpu())
                select = routing.per_sample(index)
            with select:
                out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=max_new,
                                     do_sample=False, num_beams=1, pad_token_id=self.pad_id, eos_token_id=eos or None)
            new = out[:, ids.shape[1]:]
            answers += [a.strip() for a in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return answers

    def _vision_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) unit pooled features of the vision tower (its [CLS] after the last layer norm)."""
        tower = model.model.vision_tower if hasattr(getattr(model, "model", None), "vision_tower") else model.vision_tower
        return F.normalize(tower(pixel_values=pixels.to(tower.dtype)).pooler_output.float(), dim=-1)

    @torch.no_grad()
    def route_features(self, model: nn.Module, task: InstructTask, limit: int | None = None) -> torch.Tensor:
        """(N, D) vision-tower features of ``task``'s training images (at most ``limit``, the first of a
        fixed permutation), in eval mode."""
        n = len(task.train)
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].tolist() if limit and limit < n \
            else list(range(n))
        samples = [task.train[i] for i in keep]
        was_training = model.training
        model.eval()
        try:
            return torch.cat([self._vision_features(model, self._pixels(task, samples[s : s + self.eval_batch_size]))
                              for s in range(0, len(samples), self.eval_batch_size)])
        finally:
            model.train(was_training)

    def evaluate(self, model: nn.Module, task: InstructTask, xtail: bool = False,
                 routing: Routing | None = None) -> float:
        """Score (percent) of greedy answers on ``task.test``; logs MIF and a few examples."""
        if xtail:
            raise ValueError("X-TAIL (task-agnostic class union) is not defined for instruction tasks")
        if task.scorer not in SCORERS:
            raise ValueError(f"task {task.name!r}: unknown scorer {task.scorer!r}; known: {sorted(SCORERS)}")
        if task.answer_format not in FORMATS:
            raise ValueError(f"task {task.name!r}: unknown answer format {task.answer_format!r}; known: {FORMATS}")
        was_training = model.training
        model.eval()
        answers = self.generate(model, task, task.test, routing)
        model.train(was_training)
        refs = [s.targets for s in task.test]
        score = float(SCORERS[task.scorer](answers, refs))
        mif = instruction_following_rate(answers, task.answer_format)
        self.log.append({"task": task.name, "score": round(score, 3), "mif": round(mif, 3),
                         "examples": [{"answer": a, "reference": list(r)} for a, r in zip(answers, refs)][: self.examples]})
        return score

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this kind: the evaluation log (MIF, examples), so that a resumed
        run reports the zero-shot MIF and the whole log, not only what ran after the restart."""
        return {"log": list(self.log)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.log = list(state.get("log", []))

    def extra_results(self, results: dict[str, Any]) -> dict[str, Any]:
        """``results`` with MIF added: ``metrics.mif`` = mean over tasks of their last-logged MIF
        (after the last task, when the run is finished), plus the per-task values and the log."""
        final: dict[str, float] = {}
        first: dict[str, float] = {}
        for entry in self.log:
            final[entry["task"]] = entry["mif"]
            first.setdefault(entry["task"], entry["mif"])
        out = dict(results)
        if final and "metrics" in out:
            out["metrics"] = {**out["metrics"], "mif": sum(final.values()) / len(final)}
        out["mif"] = {"final": final, "zero_shot": first}
        out["eval_log"] = list(self.log)
        return out
