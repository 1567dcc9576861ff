"""Throughput of the transformers engine on DSPy-like calls, against plain `generate`.

Each request is what DSPy's ChatAdapter sends for an Iris chain-of-thought program
with 3 demos: a ~710-token prefix (instructions + demos) shared by all requests and
a ~110-token last user message that differs per request. Runs, on the same requests:

  (a) plain `model.generate`, one request at a time (the baseline)
  (b) the engine with max_batch_size=1 (prefix KV reuse only)
  (c) the engine with batching + prefix reuse, for each --batch-sizes value

    python bench/engine_throughput.py                       # 32 requests, fp32 (auto on CPU)
    python bench/engine_throughput.py --dtype bfloat16 --batch-sizes 1,8,16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
import torch  # noqa: E402

from bt_ray.config import InferenceConfig  # noqa: E402
from bt_ray.inference.chat import prefix_ids, prompt_ids  # noqa: E402
from bt_ray.inference.engine import COMPLETION_MARKER, GenerationRequest, SamplingParams  # noqa: E402
from bt_ray.inference.transformers_engine import Counters, TransformersEngine, run_on_torch_thread  # noqa: E402

MODEL_DIR = os.path.expanduser("~/.cache/bt-ray/models/SmolLM2-135M-Instruct")


class IrisCoT(dspy.Signature):
    """Given the petal and sepal dimensions in cm, predict the iris species. Think step by step about which
    measurements separate setosa, versicolor and virginica before answering."""

    petal_length: float = dspy.InputField()
    petal_width: float = dspy.InputField()
    sepal_length: float = dspy.InputField()
    sepal_width: float = dspy.InputField()
    reasoning: str = dspy.OutputField()
    answer: str = dspy.OutputField(desc="one of: setosa, versicolor, virginica")


def flower(rng: random.Random, labeled: bool) -> dspy.Example:
    x = dict(petal_length=round(rng.uniform(1, 7), 1), petal_width=round(rng.uniform(0.1, 2.5), 1),
             sepal_length=round(rng.uniform(4, 8), 1), sepal_width=round(rng.uniform(2, 4.5), 1))
    if labeled:
        x["reasoning"] = (f"The petal length is {x['petal_length']} cm and the petal width is {x['petal_width']} "
                          "cm. Small petals point to setosa, medium ones to versicolor and large ones to "
                          "virginica; the sepal measurements agree with this reading.")
        x["answer"] = rng.choice(["setosa", "versicolor", "virginica"])
    return dspy.Example(**x).with_inputs("petal_length", "petal_width", "sepal_length", "sepal_width")


def dspy_requests(n: int, sampling: SamplingParams) -> list[GenerationRequest]:
    rng = random.Random(0)
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    demos = [flower(rng, labeled=True) for _ in range(3)]
    return [GenerationRequest(tuple(adapter.format(IrisCoT, demos, flower(rng, False).inputs().toDict())),
                              sampling, request_id=str(i)) for i in range(n)]


def run_plain(model, tokenizer, requests: list[GenerationRequest]) -> int:
    """One `generate` call per request, same sampling and stop string. Returns generated tokens."""
    s = requests[0].sampling
    tokens = 0
    with torch.inference_mode():
        for request in requests:
            ids = torch.tensor([prompt_ids(tokenizer, request.messages)])
            torch.manual_seed(int(request.request_id))
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.max_tokens,
                                 do_sample=True, temperature=s.temperature, top_p=s.top_p,
                                 stop_strings=list(s.stop), tokenizer=tokenizer, pad_token_id=tokenizer.eos_token_id)
            tokens += out.shape[1] - ids.shape[1]
    return tokens


def run_engine(engine: TransformersEngine, requests: list[GenerationRequest]) -> int:
    """All requests at once, as concurrent DSPy threads would send them. Returns generated tokens."""
    async def all_at_once():
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    engine.prefixes.clear()  # every repeat pays for its prefix once, like a fresh candidate program
    return sum(r.completion_tokens for r in asyncio.run(all_at_once()))


def busy_cpu_seconds() -> float:
    """CPU seconds used by every process on this machine so far (Linux), 0 elsewhere."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def timed(fn) -> tuple[float, int, float]:
    """(seconds, generated tokens, cores that other processes used meanwhile)."""
    busy, own, start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    tokens = fn()
    seconds = time.perf_counter() - start
    others = max(0.0, (busy_cpu_seconds() - busy) - (time.process_time() - own)) / seconds
    return seconds, tokens, others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--baseline-requests", type=int, default=None, help="requests for (a); default: all")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU) | float32 | bfloat16")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every line this many times, interleaved; report medians (this machine's speed "
                             "drifts, so ratios are taken within a round)")
    args = parser.parse_args()

    sampling = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, stop=(COMPLETION_MARKER,))
    requests = dspy_requests(args.requests, sampling)
    base = requests[: args.baseline_requests or len(requests)]
    engines = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        config = InferenceConfig(max_batch_size=batch_size, batch_wait_ms=5.0, torch_threads=args.threads)
        engines[batch_size] = engine = TransformersEngine(MODEL_DIR, config, dtype=args.dtype)
        run_engine(engine, [GenerationRequest(({"role": "user", "content": "Hi"},), SamplingParams(max_tokens=4))])
        engine.counters = Counters()  # count the measured runs only
    first = next(iter(engines.values()))  # the baseline runs on its model: same weights, dtype and threads
    tok = first.tokenizer
    full = prompt_ids(tok, requests[0].messages)
    print(f"{len(requests)} requests ({len(base)} for the baseline): prompt {len(full)} tokens (shared prefix "
          f"{len(prefix_ids(tok, requests[0].messages, full))}), max_tokens {args.max_tokens}, temperature "
          f"{args.temperature}, {first.dtype}, {torch.get_num_threads()} threads, {args.rounds} round(s)")

    # The baseline runs on the engines' torch thread too: a second thread doing torch work
    # slows every thread of the process (see torch_thread), which would flatter the engine.
    def plain(some: list[GenerationRequest]) -> int:
        return run_on_torch_thread(run_plain, first.model, tok, some)

    plain(requests[:1])  # warm-up
    lines = {"(a) plain generate, sequential": (len(base), lambda: plain(base), None)}
    for batch_size, engine in engines.items():
        label = "(b) engine, batch 1 (prefix reuse)" if batch_size == 1 else f"(c) engine, max batch {batch_size}"
        lines[label] = (len(requests), lambda engine=engine: run_engine(engine, requests), engine)
    runs: dict[str, list] = {label: [] for label in lines}
    for _ in range(args.rounds):
        for label, (n, fn, _) in lines.items():
            runs[label].append((n, *timed(fn)))
    report(runs, {label: engine for label, (_, _, engine) in lines.items()})


def report(runs: dict[str, list], engines: dict) -> None:
    base = runs[next(iter(runs))]
    print(f"\n{'run':36} {'req/s':>7} {'gen tok/s':>10} {'x (a)':>6} {'mean batch':>11} {'cached prompt':>14} "
          f"{'other load':>11}")
    for label, measured in runs.items():
        rps = [n / seconds for n, seconds, _, _ in measured]
        ratios = [r / (bn / bs) for r, (bn, bs, _, _) in zip(rps, base)]  # vs the baseline of the same round
        tok_s = [tokens / seconds for _, seconds, tokens, _ in measured]
        others = max(o for *_, o in measured)
        c = engines[label].counters if engines[label] else Counters(requests=1, batches=1)
        print(f"{label:36} {statistics.median(rps):7.3f} {statistics.median(tok_s):10.1f} "
              f"{statistics.median(ratios):6.2f} {c.requests / max(1, c.batches):11.1f} "
              f"{c.cached_prompt_tokens / max(1, c.prompt_tokens):14.0%} {others:6.2f} cores")


if __name__ == "__main__":
    main()
