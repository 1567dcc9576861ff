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


def test_select_rows_keeps_their_tokens_and_room_to_grow():
    cache = batch_cache([prefix(2, 1.0), prefix(2, 2.0), prefix(2, 3.0)], width=2, capacity=4, num_layers=1)
    cache.update(torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 1, 4), torch.zeros(3, 3, 1, 4), 0)
    cache.batch_select_indices(torch.tensor([0, 2]))
    keys = cache.layers[0].keys
    assert keys.shape == (2, 3, 3, 4)
    assert keys[0, 0, 0, 0] == 1.0 and keys[1, 0, 0, 0] == 3.0 and keys[1, 0, 2, 0] == 2.0
    cache.update(torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4), 0)
    assert cache.get_seq_length() == 4


def test_without_prefixes_the_first_update_allocates():
    cache = batch_cache([None, None], width=0, capacity=6, num_layers=1)
    assert cache.get_seq_length() == 0
    keys, _ = cache.update(torch.ones(2, 3, 4, 8), torch.ones(2, 3, 4, 8), 0)
    assert keys.shape == (2, 3, 4, 8) and cache.get_seq_length() == 4
