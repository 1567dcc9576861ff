"""A running batch: rows join between decode steps, decode together, and leave when they finish.

Plain code over a causal LM, a tokenizer and `Row`s; the engine decides which rows
run together (one adapter per batch) and where their prefix KV comes from.

Continuous (iteration-level) batching: a batch is not decoded until its last row is
done while new requests wait. Between steps, new rows are prefilled in a batch of
their own (suffixes over their cached prefixes) and their KV is copied into free slots
of the running batch, right-aligned like every other row (kv_cache.py), so the batch
stays full while there is work. Static batching is the same object with no joins
after the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from bt_ray.inference.engine import SamplingParams
from bt_ray.inference.kv_cache import PrefixKV, batch_cache
from bt_ray.inference.sampling import next_tokens, stop_index

# Free slots of finished rows are compacted away once they are this share of the batch:
# a free slot costs a row's share of every step until a new row takes it, and compacting
# copies the KV of the rows it moves.
COMPACT_FRACTION = 0.25
# Fewest columns of room a re-laid-out batch cache gets for coming tokens: every
# re-layout copies the whole cache, so growing a few columns at a time would copy often.
MIN_ROOM = 64


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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def next_position(self) -> int:
        """Position of the newest token, the one the next decode step feeds in."""
        return len(self.prompt) + len(self.tokens) - 1

    @property
    def remaining(self) -> int:
        return self.sampling.max_tokens - len(self.tokens)

    def add(self, token: int, stop_ids: frozenset[int], tokenizer: Any) -> None:
        """Append a generated token; set finish_reason when the completion ends."""
        self.tokens.append(token)
        if token in stop_ids:
            self.finish_reason = "stop"
            return
        # All of it, each step: quadratic, but 128 tokens decode in ~30 us (a decode step: ~100 ms).
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = stop_index(text, self.sampling.stop)
        if cut is not None:
            self.text, self.finish_reason = text[:cut], "stop"
        elif len(self.tokens) >= self.sampling.max_tokens:
            self.text, self.finish_reason = text, "length"

    def finish_text(self, tokenizer: Any) -> None:
        if self.text is None:  # rows stopped by an end-of-turn token have not decoded yet
            self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)


class Batch:
    """The rows decoding together, one cache slot each.

    `slots[s]` is the row in slot s of the cache and mask, or None once that row finished
    (its slot is reused by a joining row or compacted away). Every step feeds every slot.
    """

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, stop_ids: frozenset[int], max_rows: int):
        self.model, self.tokenizer, self.pad_id, self.stop_ids = model, tokenizer, pad_id, stop_ids
        self.max_rows = max_rows
        self.slots: list[Row | None] = []
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None  # [slot capacity, column capacity]; 1 = attend

    @property
    def rows(self) -> list[Row]:
        return [row for row in self.slots if row is not None]

    def join(self, rows: list[Row]) -> list[Row]:
        """Prefill `rows`, choose their first tokens, and give each unfinished one a slot.

        Returns the rows that are already finished (their first token ended them).
        """
        first = self.cache is None
        room = max(row.sampling.max_tokens for row in rows) if first else 0
        cache, mask, logits = prefill(self.model, rows, self.pad_id, room)
        finished = self._add(rows, logits)
        if first:  # the prefill cache becomes the batch cache: no copy
            self.cache, self.mask = cache, mask
            self.slots = [None if row.finished else row for row in rows]
        else:
            joining = [i for i, row in enumerate(rows) if not row.finished]
            if joining:
                self._splice(cache, mask, [rows[i] for i in joining], joining)
        return finished

    def step(self) -> list[Row]:
        """Decode one token for every row; returns the rows that finished with it."""
        self._compact()
        self._make_room(0, [])
        filled, slots, device = self.cache.get_seq_length(), len(self.slots), self.model.device
        tokens = torch.tensor([row.tokens[-1] if row else self.pad_id for row in self.slots], device=device)
        positions = torch.tensor([row.next_position if row else 0 for row in self.slots], device=device)
        self.mask[:slots, filled] = 1  # free slots keep attending too: their outputs stay finite
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask[:slots, : filled + 1],
                         position_ids=positions[:, None], cache=self.cache, use_cache=True)
        live = [s for s, row in enumerate(self.slots) if row is not None]
        finished = self._add([self.slots[s] for s in live], out.logits[live, -1])
        self.slots = [None if row is None or row.finished else row for row in self.slots]
        return finished

    def drop(self, row: Row) -> None:
        """Stop decoding `row` (its caller went away); its slot becomes free."""
        self.slots = [None if r is row else r for r in self.slots]

    def _add(self, rows: list[Row], logits: torch.Tensor) -> list[Row]:
        tokens = next_tokens(logits, [row.sampling for row in rows], [row.generator for row in rows])
        for row, token in zip(rows, tokens.tolist()):
            row.add(token, self.stop_ids, self.tokenizer)
            if row.finished:
                row.finish_text(self.tokenizer)
        return [row for row in rows if row.finished]

    def _splice(self, cache: Cache, mask: torch.Tensor, rows: list[Row], sources: list[int]) -> None:
        """Copy the KV of freshly prefilled rows (`sources` of `cache`) into free slots."""
        width = cache.get_seq_length()
        self._make_room(width, rows)
        free = [s for s, row in enumerate(self.slots) if row is None]
        free += range(len(self.slots), len(self.slots) + len(rows))
        slots = free[: len(rows)]
        self.slots += [None] * (slots[-1] + 1 - len(self.slots))
        index, source = torch.tensor(slots), torch.tensor(sources)
        for layer, joined in zip(self.cache.layers, cache.layers):
            layer.write_rows(index, joined.keys[source], joined.values[source])
        filled = self.cache.get_seq_length()
        self.mask[index, : filled - width] = 0
        self.mask[index, filled - width: filled] = mask[source, :width]
        for slot, row in zip(slots, rows):
            self.slots[slot] = row

    def _compact(self) -> None:
        """Move rows from the end into free slots and drop the free end, so steps skip finished rows."""
        while self.slots and self.slots[-1] is None:  # free: nothing to copy
            self.slots.pop()
        free = [s for s, row in enumerate(self.slots) if row is None]
        if len(free) < max(1, COMPACT_FRACTION * len(self.slots)):
            return
        keep = len(self.slots) - len(free)
        src = [s for s in range(keep, len(self.slots)) if self.slots[s] is not None]
        dst = free[: len(src)]
        filled, src_index, dst_index = self.cache.get_seq_length(), torch.tensor(src), torch.tensor(dst)
        for layer in self.cache.layers:
            layer.move_rows(src_index, dst_index)
        self.mask[dst_index, :filled] = self.mask[src_index, :filled]
        for s, d in zip(src, dst):
            self.slots[d] = self.slots[s]
        del self.slots[keep:]

    def _make_room(self, width: int, joining: list[Row]) -> None:
        """Re-lay the cache out if `joining` rows of `width` columns, or the next token, would not fit.

        The new layout keeps only live rows, drops leading columns no live row attends to
        (the batch would otherwise widen by a column per step for as long as it runs), shifts
        the rows right if a joiner is wider, and leaves room for the rows' remaining tokens.
        """
        filled, layer = self.cache.get_seq_length(), self.cache.layers[0]
        free = layer.slot_capacity - len(self.rows)
        if width <= filled and len(joining) <= free and filled < layer.capacity:
            return
        live = [s for s, row in enumerate(self.slots) if row is not None]
        index = torch.tensor(live, dtype=torch.long)
        start = int(self.mask[index, :filled].argmax(dim=1).min()) if live else filled  # first attended column
        shift = max(0, width - (filled - start))
        length = shift + filled - start
        room = max([MIN_ROOM] + [row.remaining + 1 for row in self.rows + joining])
        slot_capacity = min(self.max_rows, max(len(live) + len(joining), 2 * layer.slot_capacity))
        for layer in self.cache.layers:
            layer.relayout(index, start, shift, length + room, slot_capacity)
        mask = self.mask.new_zeros((slot_capacity, length + room))
        mask[: len(live), shift:length] = self.mask[index, start:filled]
        self.mask, self.slots = mask, [self.slots[s] for s in live]


def prefill(model: Any, rows: list[Row], pad_id: int, room: int):
    """Run every row's suffix over its cached prefix in one forward pass.

    Returns (cache with `room` free columns, attention mask [rows, capacity], last logits).
    """
    device = model.device
    width = max(row.prefix_len for row in rows)
    suffixes = [row.prompt[row.prefix_len:] for row in rows]
    suffix_width = max(len(s) for s in suffixes)
    capacity = width + suffix_width + room
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
    return cache, mask, out.logits[:, -1]


def compute_prefix(model: Any, ids: list[int]) -> PrefixKV:
    """KV of one prompt prefix (batch 1); no logits are needed beyond the last position."""
    input_ids = torch.tensor([ids], device=model.device)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    return PrefixKV.from_cache(out.cache)
