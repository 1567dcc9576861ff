"""PromptRenderer: the vLLM replica's prompt ids, rendered in chunks on worker threads, equal
chat.prompt_ids token for token; a request waits for its own chunk only; a bad conversation fails
only its own request."""

import asyncio
import threading

import pytest

from bt_ray.inference import chat
from bt_ray.inference.renderer import PromptRenderer

CONVERSATIONS = [
    [{"role": "user", "content": "Which species? petal 5.1 cm"}],
    [{"role": "system", "content": "Classify the iris."}, {"role": "user", "content": "petal 1.4, sepal 5.1"}],
    [{"role": "system", "content": "Answer in fields."}, {"role": "user", "content": "demo question"},
     {"role": "assistant", "content": "[[ ## answer ## ]]\nsetosa"}, {"role": "user", "content": "Ünïcödé — 文字 🙂"}],
    [{"role": "system", "content": "x " * 600}, {"role": "user", "content": "long shared instructions"}],
]


def test_batch_ids_equal_one_by_one(tokenizer):
    assert chat.prompt_ids_batch(tokenizer, CONVERSATIONS) == [chat.prompt_ids(tokenizer, c) for c in CONVERSATIONS]
    assert chat.prompt_ids_batch(tokenizer, CONVERSATIONS[:1]) == [chat.prompt_ids(tokenizer, CONVERSATIONS[0])]
    assert chat.prompt_ids_batch(tokenizer, []) == []


def test_requests_sent_together_are_rendered_in_chunks_with_their_own_ids(tokenizer):
    renderer = PromptRenderer(tokenizer, chunk=8)
    conversations = [CONVERSATIONS[i % 4][:-1] + [{"role": "user", "content": f"request {i}"}] for i in range(64)]

    async def main():
        return await asyncio.gather(*(renderer.ids(c) for c in conversations))

    try:
        ids = asyncio.run(main())
        assert ids == [chat.prompt_ids(tokenizer, c) for c in conversations]
        assert renderer.batches == 8  # 64 requests sent in one turn of the loop: 8 chunks of 8
        assert asyncio.run(main()) == ids  # a second event loop (a new asyncio.run) is served too
        assert renderer.batches == 16
    finally:
        renderer.close()


class RecordingTokenizer:
    """FAKE tokenizer (no model): ids are the characters' code points; 'bad' content raises; records
    which thread rendered."""

    def __init__(self):
        self.threads = set()
        self.release = threading.Event()  # 'wait' content blocks its chunk until this is set

    def apply_chat_template(self, conversation, add_generation_prompt=True, tokenize=True):
        self.threads.add(threading.get_ident())
        batch = conversation if isinstance(conversation[0], list) else [conversation]
        if any(m["content"] == "wait" for c in batch for m in c):
            assert self.release.wait(10), "the test never released the blocked chunk"
        if any(m["content"] == "bad" for c in batch for m in c):
            raise ValueError("template cannot render 'bad'")
        ids = [[ord(ch) for m in c for ch in m["content"]] for c in batch]
        return ids if batch is conversation else ids[0]


def test_rendering_runs_off_the_event_loop_and_a_bad_conversation_fails_alone():
    fake = RecordingTokenizer()
    renderer = PromptRenderer(fake)
    good = [[{"role": "user", "content": "ab"}], [{"role": "user", "content": "c"}]]
    bad = [{"role": "user", "content": "bad"}]

    async def main():
        return await asyncio.gather(renderer.ids(good[0]), renderer.ids(bad), renderer.ids(good[1]),
                                    return_exceptions=True)

    try:
        first, failed, last = asyncio.run(main())
    finally:
        renderer.close()
    assert (first, last) == ([97, 98], [99])
    assert isinstance(failed, ValueError) and "bad" in str(failed)
    assert threading.get_ident() not in fake.threads and len(fake.threads) == 1


def test_a_cancelled_request_leaves_the_others_their_ids(tokenizer):
    renderer = PromptRenderer(tokenizer)

    async def main():
        cancelled = asyncio.ensure_future(renderer.ids(CONVERSATIONS[0]))
        others = [asyncio.ensure_future(renderer.ids(c)) for c in CONVERSATIONS[1:]]
        await asyncio.sleep(0)
        cancelled.cancel()
        return await asyncio.gather(*others), cancelled

    try:
        ids, cancelled = asyncio.run(main())
    finally:
        renderer.close()
    assert cancelled.cancelled()
    assert ids == [chat.prompt_ids(tokenizer, c) for c in CONVERSATIONS[1:]]


def test_a_request_waits_for_its_own_chunk_not_for_the_whole_wave():
    fake = RecordingTokenizer()
    renderer = PromptRenderer(fake, chunk=2, threads=2)
    blocked = [[{"role": "user", "content": "wait"}], [{"role": "user", "content": "z"}]]
    first = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]

    async def main():
        late = [asyncio.ensure_future(renderer.ids(c)) for c in blocked]  # chunk 1: blocked in its thread
        early = await asyncio.gather(*(renderer.ids(c) for c in first))  # chunk 2: answered meanwhile
        still_waiting = not any(f.done() for f in late)
        fake.release.set()
        return early, still_waiting, await asyncio.gather(*late)

    try:
        early, still_waiting, late = asyncio.run(main())
    finally:
        fake.release.set()
        renderer.close()
    assert early == [[97], [98]] and still_waiting and late == [[119, 97, 105, 116], [122]]


def test_after_close_a_request_fails_instead_of_waiting(tokenizer):
    renderer = PromptRenderer(tokenizer)
    renderer.close()
    with pytest.raises(RuntimeError):
        asyncio.run(renderer.ids(CONVERSATIONS[0]))
