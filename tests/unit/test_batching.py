"""Pure logic of the batching engine: queue grouping and joining, prefix LRU accounting, sampling, stop strings."""

import torch

from bt_ray.inference.batching import Pending, RequestQueue
from bt_ray.inference.engine import GenerationRequest, SamplingParams
from bt_ray.inference.prefix_cache import PrefixCache
from bt_ray.inference.sampling import make_generator, next_tokens, request_seed, sample, stop_index


class FakeFuture:
    def __init__(self, done=False):
        self._done = done

    def done(self):
        return self._done


def pending(prefix: str, last: str, adapter=None, done=False) -> Pending:
    messages = ({"role": "system", "content": prefix}, {"role": "user", "content": last})
    return Pending(GenerationRequest(messages, adapter=adapter, request_id=f"{adapter}:{prefix}:{last}"),
                   FakeFuture(done))


def ids(batch):
    return [p.request.request_id for p in batch]


def test_batch_takes_oldest_adapter_only():
    queue = RequestQueue()
    for item in [pending("A", "1", "v1"), pending("A", "2"), pending("A", "3", "v1"), pending("A", "4")]:
        queue.put(item)
    assert ids(queue.next_batch(8)) == ["v1:A:1", "v1:A:3"]
    assert ids(queue.next_batch(8)) == ["None:A:2", "None:A:4"]
    assert len(queue) == 0 and queue.next_batch(8) == []


def test_batch_prefers_whole_prefix_groups_oldest_first():
    queue = RequestQueue()
    for prefix, last in [("A", "1"), ("B", "1"), ("A", "2"), ("C", "1"), ("B", "2"), ("A", "3")]:
        queue.put(pending(prefix, last))
    assert ids(queue.next_batch(4)) == ["None:A:1", "None:A:2", "None:A:3", "None:B:1"]
    assert ids(queue.next_batch(4)) == ["None:C:1", "None:B:2"]  # C:1 is now the oldest


def test_batch_respects_max_size_and_drops_cancelled():
    queue = RequestQueue()
    queue.put(pending("A", "gone", done=True))
    for i in range(5):
        queue.put(pending("A", str(i)))
    assert ids(queue.next_batch(2)) == ["None:A:0", "None:A:1"]
    assert len(queue) == 3


def test_joiners_take_the_running_adapter_until_another_adapter_waits():
    queue = RequestQueue()
    for item in [pending("A", "1", "v1"), pending("B", "1", "v1"), pending("A", "2", "v1")]:
        queue.put(item)
    assert ids(queue.joiners("v1", 2)) == ["v1:A:1", "v1:A:2"]  # whole prefix groups first
    assert queue.joiners("v1", 0) == []  # the batch is full
    queue.put(pending("A", "3"))  # the base model's request waits: the v1 batch drains, none join it
    queue.put(pending("A", "4", "v1"))
    assert queue.joiners("v1", 8) == [] and len(queue) == 3
    assert ids(queue.next_batch(8)) == ["v1:B:1", "v1:A:4"]  # v1:B:1 is older than None:A:3
    assert queue.joiners("v1", 8) == []
    assert ids(queue.next_batch(8)) == ["None:A:3"]


def test_prefix_cache_lru_and_token_budget():
    cache = PrefixCache(max_tokens=10)
    assert cache.put((None, (1, 2, 3, 4)), "a", 4)
    assert cache.put((None, (5, 6, 7, 8)), "b", 4)
    assert cache.get((None, (1, 2, 3, 4))) == "a"  # now "b" is least recently used
    assert cache.put(("v1", (9, 9, 9)), "c", 3)
    assert (None, (5, 6, 7, 8)) not in cache and cache.tokens == 7
    assert cache.get((None, (5, 6, 7, 8))) is None
    assert not cache.put((None, tuple(range(11))), "too big", 11)
    assert cache.stats() == {"entries": 2, "tokens": 7, "hits": 1, "misses": 1, "evictions": 1}


def test_prefix_cache_replaces_same_key_and_evicts_adapter():
    cache = PrefixCache(max_tokens=100)
    cache.put(("v1", (1,)), "x", 5)
    cache.put(("v1", (1,)), "y", 6)
    cache.put(("v2", (1,)), "z", 7)
    cache.put((None, (1,)), "w", 8)
    assert cache.tokens == 21 and cache.get(("v1", (1,))) == "y"
    assert cache.evict_adapter("v1") == 1
    assert cache.tokens == 15 and len(cache) == 2
    cache.clear()
    assert cache.tokens == 0 and len(cache) == 0


def test_seed_from_prompt_is_stable_and_explicit_seed_wins():
    assert request_seed(SamplingParams(), [1, 2, 3]) == request_seed(SamplingParams(), [1, 2, 3])
    assert request_seed(SamplingParams(), [1, 2, 3]) != request_seed(SamplingParams(), [1, 2, 4])
    assert request_seed(SamplingParams(seed=7), [1, 2, 3]) == 7


def test_sampling_is_greedy_at_zero_and_reproducible_per_row():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0.0)
    hot = SamplingParams(temperature=1.0)
    first = next_tokens(logits.clone(), [greedy, hot, hot], [make_generator(s, "cpu") for s in (0, 1, 2)])
    again = next_tokens(logits.clone(), [greedy, hot, hot], [make_generator(s, "cpu") for s in (0, 1, 2)])
    assert torch.equal(first, again)
    assert first[0] == logits[0].argmax()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    generator = make_generator(0, "cpu")
    drawn = {int(sample(logits, 1.0, 0.8, generator)) for _ in range(200)}
    assert drawn == {0, 1}


def test_sample_follows_the_distribution_and_never_draws_zero_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))
    generator = make_generator(0, "cpu")
    counts = torch.bincount(torch.stack([sample(logits, 1.0, 1.0, generator) for _ in range(3000)]), minlength=4)
    assert counts[3] == 0
    assert torch.allclose(counts[:3] / 3000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_stop_index_finds_earliest_stop():
    assert stop_index("answer\n\n[[ ## completed ## ]]", ("[[ ## completed ## ]]",)) == 8
    assert stop_index("a STOP b END", ("END", "STOP")) == 2
    assert stop_index("nothing here", ("END",)) is None
    assert stop_index("text", ()) is None
