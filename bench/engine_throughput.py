"""Throughput of the transformers engine on DSPy-like calls, against plain `generate`.

Each request is what DSPy's ChatAdapter sends for an Iris chain-of-thought program
with 3 demos: a ~710-token prefix (instructions + demos) shared by all requests and
a ~110-token last user message that differs per request. Runs, on the same requests:

  (a) plain `model.generate`, one request at a time (the baseline)
  (b) the engine with max_batch_size=1 (prefix KV reuse only)
  (c) the engine with batching + prefix reuse, for each --batch-sizes value

With --mixed, the real length mix of DSPy calls instead: a third of the requests only
stop at the completion marker, which this prompt's model never writes, so they run to
max_tokens (as about a third of real answers do); the rest stop at their first
sentence. Static batching (a batch runs to its last row) against continuous batching
(requests join the running batch between steps), at the largest --batch-sizes value,
with the requests sent all at once and in --waves waves --wave-gap-s apart.

    python bench/engine_throughput.py                       # 32 requests, fp32 (auto on CPU)
    python bench/engine_throughput.py --dtype bfloat16 --batch-sizes 1,8,16
    python bench/engine_throughput.py --mixed --requests 64 --max-tokens 128 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from dataclasses import replace

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


def mixed_requests(n: int, max_tokens: int, temperature: float) -> list[GenerationRequest]:
    """Every third request rambles to max_tokens; the others stop at the end of their first sentence."""
    short = SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=(" cm.", COMPLETION_MARKER))
    long = replace(short, stop=(COMPLETION_MARKER,))
    return [replace(r, sampling=long) if i % 3 == 2 else r for i, r in enumerate(dspy_requests(n, short))]


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


def run_in_waves(engine: TransformersEngine, requests: list[GenerationRequest], waves: int, gap_s: float) -> int:
    """`waves` equal waves of requests, `gap_s` apart, all awaited together. Returns generated tokens."""
    size = -(-len(requests) // waves)

    async def in_waves():
        tasks = []
        for start in range(0, len(requests), size):
            if start:
                await asyncio.sleep(gap_s)
            tasks += [asyncio.ensure_future(engine.generate(r)) for r in requests[start: start + size]]
        return await asyncio.gather(*tasks)

    engine.prefixes.clear()
    return sum(r.completion_tokens for r in asyncio.run(in_waves()))


def run_closed_loop(engine: TransformersEngine, requests: list[GenerationRequest], callers: int) -> int:
    """`callers` callers, each sending its next request once its last one is answered (DSPy's threads)."""
    async def caller(todo) -> int:
        return sum([(await engine.generate(r)).completion_tokens for r in todo])

    async def all_callers():
        return sum(await asyncio.gather(*(caller(requests[i::callers]) for i in range(callers))))

    engine.prefixes.clear()
    return asyncio.run(all_callers())


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
    parser.add_argument("--mixed", action="store_true", help="real length mix: static vs continuous batching")
    parser.add_argument("--waves", type=int, default=4, help="--mixed: requests arrive in this many waves...")
    parser.add_argument("--wave-gap-s", type=float, default=1.0, help="...this many seconds apart")
    parser.add_argument("--callers", type=int, default=0,
                        help="--mixed: also this many closed-loop callers (each sends its next request when its "
                             "last one is answered, like DSPy's threads)")
    args = parser.parse_args()

    lines, baselines = mixed_lines(args) if args.mixed else throughput_lines(args)
    runs: dict[str, list] = {label: [] for label in lines}
    for _ in range(args.rounds):
        for label, (n, fn, _) in lines.items():
            runs[label].append((n, *timed(fn)))
    report(runs, {label: engine for label, (_, _, engine) in lines.items()}, baselines)


def make_engine(args: argparse.Namespace, batch_size: int, continuous: bool = True) -> TransformersEngine:
    config = InferenceConfig(max_batch_size=batch_size, batch_wait_ms=5.0, torch_threads=args.threads,
                             continuous_batching=continuous)
    engine = TransformersEngine(MODEL_DIR, config, dtype=args.dtype)
    run_engine(engine, [GenerationRequest(({"role": "user", "content": "Hi"},), SamplingParams(max_tokens=4))])
    engine.counters = Counters()  # count the measured runs only
    return engine


def describe(args: argparse.Namespace, engine: TransformersEngine, requests: list[GenerationRequest]) -> str:
    full = prompt_ids(engine.tokenizer, requests[0].messages)
    return (f"prompt {len(full)} tokens (shared prefix {len(prefix_ids(engine.tokenizer, requests[0].messages, full))})"
            f", max_tokens {args.max_tokens}, temperature {args.temperature}, {engine.dtype}, "
            f"{torch.get_num_threads()} threads, {args.rounds} round(s)")


def throughput_lines(args: argparse.Namespace) -> tuple[dict, dict]:
    """(a) plain generate, (b) engine at batch 1, (c) engine per batch size; every ratio is against (a)."""
    sampling = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, stop=(COMPLETION_MARKER,))
    requests = dspy_requests(args.requests, sampling)
    base = requests[: args.baseline_requests or len(requests)]
    engines = {batch_size: make_engine(args, batch_size) for batch_size in map(int, args.batch_sizes.split(","))}
    first = next(iter(engines.values()))  # the baseline runs on its model: same weights, dtype and threads
    print(f"{len(requests)} requests ({len(base)} for the baseline): {describe(args, first, requests)}")

    # The baseline runs on the engines' torch thread too: a second thread doing torch work
    # slows every thread of the process (see torch_thread), which would flatter the engine.
    def plain(some: list[GenerationRequest]) -> int:
        return run_on_torch_thread(run_plain, first.model, first.tokenizer, some)

    plain(requests[:1])  # warm-up
    lines = {"(a) plain generate, sequential": (len(base), lambda: plain(base), None)}
    for batch_size, engine in engines.items():
        label = "(b) engine, batch 1 (prefix reuse)" if batch_size == 1 else f"(c) engine, max batch {batch_size}"
        lines[label] = (len(requests), lambda engine=engine: run_engine(engine, requests), engine)
    return lines, {label: next(iter(lines)) for label in lines}


def mixed_lines(args: argparse.Namespace) -> tuple[dict, dict]:
    """Static and continuous batching, all at once and in waves; each continuous line is against its static one."""
    batch_size = max(map(int, args.batch_sizes.split(",")))
    requests = mixed_requests(args.requests, args.max_tokens, args.temperature)
    arrivals = {"all at once": run_engine,
                f"{args.waves} waves {args.wave_gap_s:g}s apart": lambda engine, requests: run_in_waves(
                    engine, requests, args.waves, args.wave_gap_s)}
    if args.callers:
        arrivals[f"{args.callers} callers, closed loop"] = lambda engine, requests: run_closed_loop(
            engine, requests, args.callers)
    lines, baselines = {}, {}
    for arrival, send in arrivals.items():
        for mode in ("static", "continuous"):
            engine = make_engine(args, batch_size, continuous=mode == "continuous")
            label = f"{mode}, {arrival}"
            lines[label] = (len(requests), lambda engine=engine, send=send: send(engine, requests), engine)
            baselines[label] = f"static, {arrival}"
    print(f"{len(requests)} requests, every third rambling to max_tokens, max batch {batch_size}: "
          f"{describe(args, engine, requests)}")
    return lines, baselines


def report(runs: dict[str, list], engines: dict, baselines: dict[str, str]) -> None:
    print(f"\n{'run':36} {'req/s':>7} {'gen tok/s':>10} {'x base':>6} {'mean batch':>11} {'cached prompt':>14} "
          f"{'other load':>11}")
    for label, measured in runs.items():
        base = runs[baselines[label]]
        rps = [n / seconds for n, seconds, _, _ in measured]
        ratios = [r / (bn / bs) for r, (bn, bs, _, _) in zip(rps, base)]  # vs the baseline of the same round
        tok_s = [tokens / seconds for _, seconds, tokens, _ in measured]
        others = max(o for *_, o in measured)
        c = engines[label].counters if engines[label] else Counters(decode_steps=1, decoded_rows=1)
        print(f"{label:36} {statistics.median(rps):7.3f} {statistics.median(tok_s):10.1f} "
              f"{statistics.median(ratios):6.2f} {c.decoded_rows / max(1, c.decode_steps):11.1f} "
              f"{c.cached_prompt_tokens / max(1, c.prompt_tokens):14.0%} {others:6.2f} cores")
    bases = sorted(set(baselines.values()))
    print(f"(x base: against {bases[0] if len(bases) == 1 else 'the static line with the same arrivals'}, within each round; mean batch: rows per "
          "decode step)")


if __name__ == "__main__":
    main()
