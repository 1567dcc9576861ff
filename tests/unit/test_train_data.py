"""bt_ray.train.data with the real SmolLM2 tokenizer (no Ray, no model weights).

`tokenizer` is the shared fixture in tests/conftest.py (converts the shipped model once).
"""

import pytest

from bt_ray.inference import chat
from bt_ray.train.data import IGNORE, TokenizedExample, collate, messages_of, pad_id_of, plan_epoch, tokenize

def conversation(answer="[[ ## answer ## ]]\nsetosa\n\n[[ ## completed ## ]]", question="petal length 1.4"):
    return [{"role": "system", "content": "Classify the iris."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


def test_labels_mask_the_prompt_and_cover_the_answer_and_end_of_turn(tokenizer):
    messages = conversation()
    data = tokenize(tokenizer, [messages], max_seq_len=512)
    (ex,) = data.examples
    prompt = chat.prompt_ids(tokenizer, messages[:-1])
    assert ex.input_ids[:len(prompt)] == prompt
    assert ex.labels[:len(prompt)] == [IGNORE] * len(prompt)
    answer = [t for t in ex.labels if t != IGNORE]
    assert answer == ex.input_ids[len(prompt):]
    text = tokenizer.decode(answer)
    assert text.startswith(messages[-1]["content"])
    assert "<|im_end|>" in text  # the model learns to stop
    assert ex.trained_tokens == len(answer)


def test_metadata_is_dropped_and_dspy_dicts_are_accepted(tokenizer):
    plain = conversation()
    with_meta = [dict(m, predictor="classify") for m in plain]
    assert messages_of({"messages": with_meta}) == plain
    a, b = tokenize(tokenizer, [plain, {"messages": with_meta}], max_seq_len=512).examples
    assert a == b


def test_too_long_examples_are_dropped_and_counted(tokenizer, caplog):
    short = conversation()
    long = conversation(question="sepal " * 400)
    data = tokenize(tokenizer, [short, long, long], max_seq_len=128)
    assert len(data.examples) == 1 and data.dropped == 2
    assert "dropped 2 of 3" in caplog.text and "train.max_seq_len" in caplog.text


def test_token_counts(tokenizer):
    data = tokenize(tokenizer, [conversation(), conversation("versicolor")], max_seq_len=512)
    per_epoch = sum(ex.trained_tokens for ex in data.examples)
    assert data.trained_tokens(epochs=3) == 3 * per_epoch
    assert data.total_tokens(epochs=2) == 2 * sum(len(ex.input_ids) for ex in data.examples)
    assert data.total_tokens(1) > data.trained_tokens(1) > 0


def test_collate_right_pads(tokenizer):
    pad = pad_id_of(tokenizer)
    a, b = TokenizedExample([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), TokenizedExample([5, 9], [IGNORE, 9])
    batch = collate([a, b], pad)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, pad, pad]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 9, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_plan_covers_every_example_once_per_epoch_with_equal_micro_steps():
    for n, workers, micro in [(8, 1, 1), (8, 2, 1), (11, 2, 1), (13, 4, 2), (3, 2, 1)]:
        plan = plan_epoch(n, epoch=0, seed=0, batch_size=8, num_workers=workers, micro_batch_size=micro)
        assert len(plan) == -(-n // 8)
        seen = [i for step in plan for shard in step for mb in shard for i in mb]
        assert sorted(seen) == list(range(n))
        for step in plan:
            assert len(step) == workers
            assert len({len(shard) for shard in step}) == 1  # same number of backward passes on every rank
            assert all(len(mb) <= micro for shard in step for mb in shard)
        full = plan[0]
        if n >= 8:  # micro_batch_size x accumulation x workers == batch_size
            assert micro * len(full[0]) * workers == 8


def test_plan_is_seeded_and_reshuffled_each_epoch():
    kw = dict(seed=1, batch_size=4, num_workers=2, micro_batch_size=1)
    assert plan_epoch(16, epoch=0, **kw) == plan_epoch(16, epoch=0, **kw)
    assert plan_epoch(16, epoch=0, **kw) != plan_epoch(16, epoch=1, **kw)
