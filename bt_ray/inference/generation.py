"""One batch through the model: prefill the suffixes over cached prefixes, then decode.

Plain functions over a causal LM, a tokenizer and a list of `Row`s; the engine
decides which rows run together and where their prefix KV comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bt_ray.inference.engine import SamplingParams
from bt_ray.inference.kv_cache import PrefixKV, batch_cache
from bt_ray.inference.sampling import next_tokens, stop_index

# Drop finished rows from the batch cache once they are this share of it: each drop
# copies the live rows' KV, so doing it for every single finished row costs more than
# it saves.
COMPACT_FRACTION = 0.25


@dataclass
class Row:
    """One request inside a batch: its prompt, its prefix KV, and what it generated so far."""

    prompt: list[int]
    prefix: PrefixKV | None  # KV of prompt[:prefix_len], or None
    sampling: SamplingParams
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # set once finished
    finish_reason: str | None = None

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.length

    def add(self, token: int, stop_ids: frozenset[int], tokenizer: Any) -> None:
        """Append a generated token; set finish_reason when the completion ends."""
        self.tokens.append(token)
        if token in stop_ids:
            self.finish_reason = "stop"
            return
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = stop_index(text, self.sampling.stop)
        if cut is not None:
            self.text, self.finish_reason = text[:cut], "stop"
        elif len(self.tokens) >= self.sampling.max_tokens:
            self.text, self.finish_reason = text, "length"

    def finish_text(self, tokenizer: Any) -> None:
        if self.text is None:  # rows stopped by an end-of-turn token have not decoded yet
            self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)


def generate_rows(model: Any, tokenizer: Any, rows: list[Row], pad_id: int, stop_ids: frozenset[int]) -> None:
    """Run `rows` to completion as one batch; results are left on the rows."""
    cache, mask, positions, logits = prefill(model, rows, pad_id)
    live = list(range(len(rows)))  # batch slot j holds rows[live[j]]
    while True:
        tokens = next_tokens(logits, [rows[i].sampling for i in live], [rows[i].generator for i in live])
        for slot, i in enumerate(live):
            if rows[i].finish_reason is None:
                rows[i].add(int(tokens[slot]), stop_ids, tokenizer)
        keep = [slot for slot, i in enumerate(live) if rows[i].finish_reason is None]
        if not keep:
            break
        if len(live) - len(keep) >= max(1, COMPACT_FRACTION * len(live)):
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, positions, tokens = mask[index], positions[index], tokens[index]
            live = [live[slot] for slot in keep]
        filled = cache.get_seq_length()
        mask[:, filled] = 1
        out = model(input_ids=tokens[:, None], attention_mask=mask[:, : filled + 1],
                    position_ids=positions[:, None], cache=cache, use_cache=True)
        positions = positions + 1
        logits = out.logits[:, -1]
    for row in rows:
        row.finish_text(tokenizer)


def prefill(model: Any, rows: list[Row], pad_id: int):
    """Run every row's suffix over its cached prefix in one forward pass.

    Returns (cache, attention mask [rows, capacity], next position per row, last logits).
    """
    device = model.device
    width = max(row.prefix_len for row in rows)
    suffixes = [row.prompt[row.prefix_len:] for row in rows]
    suffix_width = max(len(s) for s in suffixes)
    capacity = width + suffix_width + max(row.sampling.max_tokens for row in rows)
    cache = batch_cache([row.prefix for row in rows], width, capacity, model.config.num_hidden_layers)

    input_ids = torch.full((len(rows), suffix_width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), suffix_width), dtype=torch.long)
    mask = torch.zeros((len(rows), capacity), dtype=torch.long)
    for i, (row, suffix) in enumerate(zip(rows, suffixes)):
        n, start = len(suffix), row.prefix_len
        input_ids[i, suffix_width - n:] = torch.tensor(suffix)
        positions[i, suffix_width - n:] = torch.arange(start, start + n)
        mask[i, width - start: width] = 1
        mask[i, width + suffix_width - n: width + suffix_width] = 1
    input_ids, positions, mask = input_ids.to(device), positions.to(device), mask.to(device)
    out = model(input_ids=input_ids, attention_mask=mask[:, : width + suffix_width], position_ids=positions,
                cache=cache, use_cache=True, logits_to_keep=1)
    next_positions = torch.tensor([len(row.prompt) for row in rows], device=device)
    return cache, mask, next_positions, out.logits[:, -1]


def compute_prefix(model: Any, ids: list[int]) -> PrefixKV:
    """KV of one prompt prefix (batch 1); no logits are needed beyond the last position."""
    input_ids = torch.tensor([ids], device=model.device)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    return PrefixKV.from_cache(out.cache)
