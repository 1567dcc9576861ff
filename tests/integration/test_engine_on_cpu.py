"""TransformersEngine on the real SmolLM2-135M checkpoint (CPU, fp32).

Greedy outputs of the engine (micro-batched, prefix KV reused) must equal greedy
outputs of plain unbatched `model.generate` on the same prompts, token for token.
"""

import asyncio

import pytest
import torch

from bt_ray.config import InferenceConfig
from bt_ray.errors import AdapterError, EngineError, RequestError
from bt_ray.inference.chat import prompt_ids
from bt_ray.inference.engine import GenerationRequest, SamplingParams

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, stop=())

def messages(task: str, demos: int, question: str) -> tuple[dict[str, str], ...]:
    """A DSPy-like prompt: instructions, `demos` question/answer turns, then the question."""
    system = (f"You answer questions about {task}. Read the question, think about the facts you know, "
              "and answer in one short sentence. Do not add anything after the answer.")
    turns = [{"role": "system", "content": system}]
    for i in range(demos):
        turns += [{"role": "user", "content": f"Example question {i} about {task}?"},
                  {"role": "assistant", "content": f"Example answer {i} about {task}."}]
    return tuple(turns + [{"role": "user", "content": question}])


PROMPTS = [
    messages("geography", 2, "What is the capital of France?"),
    messages("geography", 2, "Which river flows through Cairo, the largest city of Egypt?"),
    messages("geography", 2, "Name a mountain."),
    messages("chemistry", 3, "What is water made of?"),
    messages("chemistry", 3, "Why does iron rust when it is left outside in the rain for a long time?"),
    # One message: no shared prefix. The short one is left-padded the most in its batch.
    ({"role": "user", "content": "Say hello."},),
    ({"role": "user", "content": "In a long and friendly paragraph, explain to a child why the sky looks "
                                 "blue by day, why it turns red and orange at sunset, and why it is dark at night."},),
]


@pytest.fixture(scope="module")
def engine(model_dir):
    from bt_ray.inference.transformers_engine import TransformersEngine

    # float32: greedy outputs must match plain generate exactly, whatever "auto" picks.
    config = InferenceConfig(max_batch_size=8, batch_wait_ms=50, prefix_cache_tokens=4096)
    return TransformersEngine(model_dir, config, dtype="float32")


@pytest.fixture(scope="module")
def plain_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def reference(model, tokenizer, prompt, max_tokens=GREEDY.max_tokens) -> str:
    """Greedy output of plain, unbatched `generate`."""
    ids = torch.tensor([prompt_ids(tokenizer, prompt)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(engine, requests):
    async def gather():
        return await asyncio.gather(*(engine.generate(r) for r in requests), return_exceptions=True)
    return asyncio.run(gather())


def test_batched_prefix_reuse_matches_plain_generate(engine, plain_model):
    expected = [reference(plain_model, engine.tokenizer, p) for p in PROMPTS]
    requests = [GenerationRequest(p, GREEDY, request_id=str(i)) for i, p in enumerate(PROMPTS)]
    first = run(engine, requests)
    assert [r.text for r in first] == expected
    assert [r.request_id for r in first] == [str(i) for i in range(len(PROMPTS))]
    assert engine.counters.batches == 1  # all seven ran together
    # Each prefix is computed once per batch: its first row pays for it, the others reuse it.
    assert [r.cached_prompt_tokens > 0 for r in first] == [False, True, True, False, True, False, False]
    # Second round: every prefix comes from the cache, and reusing it changed nothing.
    snapshot = {key: [k.clone() for k in kv.keys] for key, (kv, _) in engine.prefixes._entries.items()}
    second = run(engine, requests)
    assert [r.text for r in second] == expected
    assert all(r.cached_prompt_tokens > 0 for r in second[:5])
    assert all(r.cached_prompt_tokens == 0 for r in second[5:])
    assert [r.prompt_tokens for r in second] == [len(prompt_ids(engine.tokenizer, p)) for p in PROMPTS]
    for key, keys in snapshot.items():  # batches copy cached KV, never write into it
        assert all(torch.equal(a, b) for a, b in zip(keys, engine.prefixes._entries[key][0].keys))


def test_stop_string_truncates_and_max_tokens_gives_length(engine, plain_model):
    prompt = PROMPTS[0]
    full = reference(plain_model, engine.tokenizer, prompt, max_tokens=20)
    stop = full.split()[2]  # a word in the middle of the greedy answer
    stopped, capped = run(engine, [
        GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=20, stop=(stop,))),
        GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=3, stop=())),
    ])
    assert stopped.finish_reason == "stop" and stopped.text == full[: full.index(stop)]
    assert capped.finish_reason == "length" and capped.completion_tokens == 3
    assert full.startswith(capped.text)


def test_concurrent_callers_each_get_their_own_answer(engine, plain_model):
    prompts = [({"role": "user", "content": f"Write the number {i} in words."},) for i in range(24)]
    before = engine.counters.batches
    results = run(engine, [GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=6, stop=()),
                                             request_id=f"r{i}") for i, p in enumerate(prompts)])
    assert [r.request_id for r in results] == [f"r{i}" for i in range(24)]
    assert engine.counters.batches - before <= 4  # batches of up to 8, not one request at a time
    for i in (0, 7, 23):
        assert results[i].text == reference(plain_model, engine.tokenizer, prompts[i], max_tokens=6)


def test_sampling_is_reproducible_per_seed(engine):
    warm = SamplingParams(temperature=1.0, max_tokens=8, stop=(), seed=1)
    a, b, c = run(engine, [GenerationRequest(PROMPTS[2], warm), GenerationRequest(PROMPTS[2], warm),
                           GenerationRequest(PROMPTS[2], SamplingParams(temperature=1.0, max_tokens=8, stop=(),
                                                                        seed=2))])
    assert a.text == b.text and a.text != c.text


def test_bad_request_fails_alone(engine, plain_model):
    bad = GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=0), request_id="bad")
    good = GenerationRequest(PROMPTS[1], GREEDY, request_id="good")
    failed, ok = run(engine, [bad, good])
    assert isinstance(failed, RequestError) and "max_tokens" in str(failed)  # its example fails, not the phase
    assert ok.text == reference(plain_model, engine.tokenizer, PROMPTS[1])


@pytest.fixture(scope="module")
def lora_dir(model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # Random, non-zero LoRA weights; alpha 64 (scale 8) so that greedy answers visibly change.
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    lora = get_peft_model(model, config)
    path = tmp_path_factory.mktemp("lora")
    lora.save_pretrained(path)
    return str(path)


def test_adapters_change_outputs_and_base_stays_base(engine, plain_model, lora_dir):
    base = [reference(plain_model, engine.tokenizer, p) for p in PROMPTS[:2]]
    asyncio.run(engine.load_adapter("run-v1", lora_dir))
    with_adapter = run(engine, [GenerationRequest(p, GREEDY, adapter="run-v1") for p in PROMPTS[:2]])
    assert [r.text for r in with_adapter] != base
    assert all(r.adapter == "run-v1" for r in with_adapter)
    assert [r.text for r in run(engine, [GenerationRequest(p, GREEDY) for p in PROMPTS[:2]])] == base
    assert any(key[0] == "run-v1" for key in engine.prefixes._entries)  # prefix KV is kept per adapter

    with pytest.raises(AdapterError, match="already used"):
        asyncio.run(engine.load_adapter("run-v1", lora_dir))
    unknown, fine = run(engine, [GenerationRequest(PROMPTS[0], GREEDY, adapter="run-v9"),
                                 GenerationRequest(PROMPTS[0], GREEDY, adapter="run-v1")])
    assert isinstance(unknown, AdapterError) and "run-v9" in str(unknown) and "run-v1" in str(unknown)
    assert fine.text == with_adapter[0].text

    asyncio.run(engine.unload_adapter("run-v1"))
    assert not any(key[0] == "run-v1" for key in engine.prefixes._entries)
    (gone,) = run(engine, [GenerationRequest(PROMPTS[0], GREEDY, adapter="run-v1")])
    assert isinstance(gone, AdapterError)
    assert [r.text for r in run(engine, [GenerationRequest(p, GREEDY) for p in PROMPTS[:2]])] == base


def test_sleep_frees_the_prefix_cache_and_wake_restores(engine):
    asyncio.run(engine.sleep())
    assert len(engine.prefixes) == 0
    (asleep,) = run(engine, [GenerationRequest(PROMPTS[3], GREEDY)])
    assert isinstance(asleep, EngineError)
    asyncio.run(engine.wake())
    (awake,) = run(engine, [GenerationRequest(PROMPTS[3], GREEDY)])
    health = asyncio.run(engine.health())
    assert awake.finish_reason in ("stop", "length")
    assert health["engine"] == "transformers" and health["dtype"] == "float32" and health["device"] == "cpu"
    assert health["requests"] > 0 and health["mean_batch_size"] > 1 and health["cached_prompt_tokens"] > 0


def test_a_failed_step_reaches_every_caller_of_its_batch_and_the_engine_goes_on(engine, monkeypatch):
    from bt_ray.inference import generation

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    for name in ("step", "join"):  # a failed decode step, a failed prefill
        with monkeypatch.context() as patch:
            patch.setattr(generation.Batch, name, broken)
            failed = run(engine, [GenerationRequest(p, GREEDY) for p in PROMPTS[:3]])
        assert all(isinstance(f, EngineError) and "simulated" in str(f) and "batch" in str(f) for f in failed)
        assert engine._batch is None and not engine._jobs
        (ok,) = run(engine, [GenerationRequest(PROMPTS[0], GREEDY)])
        assert ok.finish_reason in ("stop", "length")


async def after_steps(engine, steps: int) -> None:
    target = engine.counters.decode_steps + steps
    while engine.counters.decode_steps < target:
        await asyncio.sleep(0.005)


def staggered(engine, waves):
    """Submit waves of requests, each `steps` decode steps after the one before, while they decode."""
    async def submit():
        tasks = []
        for steps, requests in waves:
            await after_steps(engine, steps)
            tasks += [asyncio.ensure_future(engine.generate(r)) for r in requests]
        return await asyncio.gather(*tasks, return_exceptions=True)
    return asyncio.run(submit())


LONG = messages("history", 4, "Who built the pyramids of Giza, and how long did it take?")  # wider than PROMPTS


def test_rows_joining_a_running_batch_match_plain_generate(engine, plain_model, monkeypatch):
    from bt_ray.inference import generation

    # Wave 2 (prefixed, wider than the batch so far: the cache is re-laid out) joins after 3 steps;
    # wave 3 after 30 more, into slots compacted after rows finished, right-aligned with zero pads.
    # PROMPTS[6] rambles to max_tokens. Little room per layout, so the cache grows many times.
    monkeypatch.setattr(generation, "MIN_ROOM", 4)
    waves = [(0, [(PROMPTS[6], 40), (PROMPTS[5], 8), (PROMPTS[2], 16), (PROMPTS[0], 30)]),
             (3, [(LONG, 24), (PROMPTS[4], 12), (PROMPTS[3], 20)]),
             (30, [(PROMPTS[6], 50), (({"role": "user", "content": "Name three colours."},), 12), (PROMPTS[4], 30)])]
    requests = [[GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=n, stop=()), request_id=f"{w}.{i}")
                 for i, (p, n) in enumerate(wave)] for w, (_, wave) in enumerate(waves)]
    batch_before, joins_before = engine._batch_id, engine.counters.batches
    results = staggered(engine, [(steps, r) for (steps, _), r in zip(waves, requests)])
    flat = [r for wave in requests for r in wave]
    assert [r.request_id for r in results] == [r.request_id for r in flat]
    expected = [reference(plain_model, engine.tokenizer, r.messages, r.sampling.max_tokens) for r in flat]
    assert [r.text for r in results] == expected
    assert engine._batch_id - batch_before == 1  # one running batch: the later waves joined it
    assert engine.counters.batches - joins_before >= 3
    assert [r.prompt_tokens for r in results] == [len(prompt_ids(engine.tokenizer, r.messages)) for r in flat]
    assert results[0].finish_reason == "length" and results[0].completion_tokens == 40


def test_static_batching_keeps_later_requests_waiting(engine, plain_model):
    engine.config.continuous_batching = False
    try:
        first = [GenerationRequest(PROMPTS[6], SamplingParams(temperature=0.0, max_tokens=16, stop=()))]
        later = [GenerationRequest(PROMPTS[1], GREEDY)]
        batch_before = engine._batch_id
        results = staggered(engine, [(0, first), (3, later)])
    finally:
        engine.config.continuous_batching = True
    assert engine._batch_id - batch_before == 2
    assert results[1].text == reference(plain_model, engine.tokenizer, PROMPTS[1])


def test_adapter_load_between_steps_leaves_a_running_base_batch_alone(engine, plain_model, lora_dir):
    ramble = SamplingParams(temperature=0.0, max_tokens=24, stop=())
    async def load_while_decoding():
        task = asyncio.gather(*(engine.generate(GenerationRequest(p, ramble)) for p in PROMPTS[5:7]))
        await after_steps(engine, 2)
        await engine.load_adapter("run-v2", lora_dir)
        assert engine._jobs  # loaded between two steps of the running batch
        return await task
    results = asyncio.run(load_while_decoding())
    assert [r.text for r in results] == [reference(plain_model, engine.tokenizer, p, 24) for p in PROMPTS[5:7]]
    asyncio.run(engine.unload_adapter("run-v2"))


def test_sleep_between_steps_fails_the_running_rows_and_nobody_hangs(engine):
    async def sleep_while_decoding():
        task = asyncio.gather(*(engine.generate(GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=40,
                                                                                    stop=()))) for p in PROMPTS[5:7]),
                              return_exceptions=True)
        await after_steps(engine, 2)
        await engine.sleep()
        return await asyncio.wait_for(task, 60)
    failed = asyncio.run(sleep_while_decoding())
    asyncio.run(engine.wake())
    assert all(isinstance(f, EngineError) and "sleep" in str(f) for f in failed)
    (ok,) = run(engine, [GenerationRequest(PROMPTS[0], GREEDY)])
    assert ok.finish_reason in ("stop", "length")
