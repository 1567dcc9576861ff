"""Chat examples -> token ids, batches and the per-worker step plan of a LoRA run.

Tokenization goes through `bt_ray.inference.chat.training_ids` and nothing else,
so the prompt a model is trained on is, token for token, the prompt it sees at
inference; labels are -100 on the prompt, so the loss covers the assistant's
answer and its end-of-turn only. No DSPy here: the trace -> messages step lives
in `bt_ray/phases/finetune.py`.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

from bt_ray.inference import chat

logger = logging.getLogger(__name__)

IGNORE = -100  # label of a token the loss skips (prompt and padding)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass(frozen=True)
class TrainData:
    examples: list[TokenizedExample]
    dropped: int  # longer than max_seq_len

    def trained_tokens(self, epochs: int) -> int:
        """Tokens the loss is computed on (assistant tokens) over all epochs."""
        return epochs * sum(ex.trained_tokens for ex in self.examples)

    def total_tokens(self, epochs: int) -> int:
        """Tokens run through the model (prompt + answer, no padding) over all epochs."""
        return epochs * sum(len(ex.input_ids) for ex in self.examples)


def messages_of(example: Any) -> list[dict[str, str]]:
    """The role/content messages of one example: a message list, or a dict with "messages" (DSPy's format).

    Other keys (metadata) are dropped, so the chat template renders exactly what inference renders.
    """
    messages = example["messages"] if isinstance(example, dict) else example
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize(tokenizer: Any, examples: Sequence[Any], max_seq_len: int) -> TrainData:
    """Tokenize chat examples; drop (and count) those longer than `max_seq_len` tokens."""
    kept, too_long = [], []
    for example in examples:
        input_ids, labels = chat.training_ids(tokenizer, messages_of(example))
        if len(input_ids) > max_seq_len:
            too_long.append(len(input_ids))
            continue
        kept.append(TokenizedExample(input_ids, labels))
    if too_long:
        logger.warning("dropped %d of %d training examples longer than train.max_seq_len=%d tokens "
                       "(longest %d); raise train.max_seq_len to keep them", len(too_long), len(examples),
                       max_seq_len, max(too_long))
    return TrainData(kept, len(too_long))


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad a micro-batch: input_ids with `pad_id`, labels with IGNORE, attention_mask 0 on padding."""
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; cannot pad training batches")
    return int(pad)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def plan_epoch(num_examples: int, *, epoch: int, seed: int, batch_size: int, num_workers: int,
               micro_batch_size: int) -> list[list[list[int]]]:
    """The optimizer steps of one epoch: `plan[step][rank]` is that worker's micro-batches (example indices).

    Examples are shuffled per epoch (seeded), cut into global batches of `batch_size`, and each
    batch is dealt rank-strided to the workers. Every worker gets the same number of micro-batches
    in a step (DDP needs every rank in every backward); in a short last batch some are empty lists,
    which the trainer runs with zero weight.
    """
    order = list(range(num_examples))
    random.Random(f"bt-ray-{seed}-{epoch}").shuffle(order)
    plan = []
    for start in range(0, num_examples, batch_size):
        batch = order[start:start + batch_size]
        shards = [batch[rank::num_workers] for rank in range(num_workers)]
        micro_steps = math.ceil(max(len(s) for s in shards) / micro_batch_size)
        plan.append([[shard[i * micro_batch_size:(i + 1) * micro_batch_size] for i in range(micro_steps)]
                     for shard in shards])
    return plan
