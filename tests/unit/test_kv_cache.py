"""The batch KV cache of the transformers engine, without a model."""

import torch

from bt_ray.inference.kv_cache import PrefixKV, batch_cache


def prefix(length: int, value: float, layers: int = 2) -> PrefixKV:
    kv = tuple(torch.full((1, 3, length, 4), value + layer) for layer in range(layers))
    return PrefixKV(kv, tuple(-t for t in kv))


def test_prefixes_are_right_aligned_with_zero_pads():
    a, b = prefix(5, 1.0), prefix(2, 10.0)
    cache = batch_cache([a, None, b], width=5, capacity=9, num_layers=2)
    assert cache.get_seq_length() == 5
    keys = cache.layers[1].keys
    assert keys.shape == (3, 3, 5, 4)
    assert torch.equal(keys[0], a.keys[1][0])
    assert torch.count_nonzero(keys[1]) == 0  # no prefix: all pads
    assert torch.count_nonzero(keys[2, :, :3]) == 0 and torch.equal(keys[2, :, 3:], b.keys[1][0])
    assert torch.equal(cache.layers[1].values[2, :, 3:], b.values[1][0])


def test_update_appends_in_place_and_never_touches_the_prefix():
    a = prefix(4, 1.0)
    before = a.keys[0].clone()
    cache = batch_cache([a, a], width=4, capacity=7, num_layers=2)
    for step in range(3):
        new = torch.full((2, 3, 1, 4), 100.0 + step)
        keys, values = cache.update(new, -new, 0)
        assert keys.shape == (2, 3, 5 + step, 4) and torch.equal(keys[:, :, -1:], new)
    assert torch.equal(a.keys[0], before)


def test_joining_rows_are_right_aligned_in_free_slots_with_zero_pads():
    cache = batch_cache([prefix(4, 1.0), prefix(4, 2.0)], width=4, capacity=6, num_layers=1)
    layer = cache.layers[0]
    joiner = torch.full((1, 3, 2, 4), 7.0)
    layer.write_rows(torch.tensor([0]), joiner, -joiner)
    keys = layer._key_buf[:, :, :4]
    assert torch.count_nonzero(keys[0, :, :2]) == 0 and torch.equal(keys[0, :, 2:], joiner[0])
    assert torch.equal(layer._value_buf[0, :, 2:4], -joiner[0])
    assert torch.equal(keys[1], prefix(4, 2.0).keys[0][0])  # other slots untouched


def test_move_rows_copies_only_the_moved_slots():
    cache = batch_cache([prefix(2, 1.0), prefix(2, 2.0), prefix(2, 3.0)], width=2, capacity=4, num_layers=1)
    layer = cache.layers[0]
    layer.move_rows(torch.tensor([2]), torch.tensor([0]))
    keys, _ = cache.update(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4), 0)  # a step over slots 0..1
    assert keys.shape == (2, 3, 3, 4)
    assert keys[0, 0, 0, 0] == 3.0 and keys[1, 0, 0, 0] == 2.0


def test_relayout_keeps_rows_drops_leading_columns_shifts_and_grows():
    cache = batch_cache([prefix(3, 1.0), prefix(3, 2.0), prefix(3, 3.0)], width=3, capacity=4, num_layers=1)
    cache.update(torch.full((3, 3, 1, 4), 9.0), torch.zeros(3, 3, 1, 4), 0)  # full: 4 of 4 columns
    layer = cache.layers[0]
    # Keep slots 2 and 0, drop column 0, shift right by 2, room for 5 more columns and 4 slots.
    layer.relayout(torch.tensor([2, 0]), start=1, shift=2, capacity=10, slot_capacity=4)
    assert (layer.capacity, layer.slot_capacity, cache.get_seq_length()) == (10, 4, 5)
    keys = layer.keys
    assert keys.shape == (2, 3, 5, 4)
    assert torch.count_nonzero(keys[:, :, :2]) == 0
    assert torch.all(keys[0, 0, 2:4] == 3.0) and torch.all(keys[1, 0, 2:4] == 1.0) and torch.all(keys[:, :, 4] == 9.0)
    keys, _ = cache.update(torch.ones(4, 3, 5, 4), torch.ones(4, 3, 5, 4), 0)
    assert keys.shape == (4, 3, 10, 4)


def test_without_prefixes_the_first_update_allocates():
    cache = batch_cache([None, None], width=0, capacity=6, num_layers=1)
    assert cache.get_seq_length() == 0
    keys, _ = cache.update(torch.ones(2, 3, 4, 8), torch.ones(2, 3, 4, 8), 0)
    assert keys.shape == (2, 3, 4, 8) and cache.get_seq_length() == 4
