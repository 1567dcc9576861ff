"""GPU serving throughput: raw vLLM vs a bt-ray replica actor + router vs a rank-32 q,k LoRA adapter.

Llama-3-8B's architecture (bench/models/llama-3-8b.json) with random weights (vLLM
load_format="dummy"): real shapes and real kernels, no download. Every arm gets the same
requests (a 600-token prefix shared by all, as a candidate program's instructions + demos,
then 100 tokens of its own), greedy, 128 new tokens, the same engine arguments
(bt_ray.inference.vllm_args.engine_kwargs; CUDA graphs up to --capture-size tokens per step, as
the GPU configs' engines) and --concurrency requests in flight:

  (a)  raw       vLLM AsyncLLM in this process, token-id prompts rendered before the clock starts
  (a+) queued    (a) with a quarter more requests in flight than vLLM runs at once, as (b+)
  (a2) rendered  (a) rendering each prompt as it is sent, with the replica's PromptRenderer
  (b)  bt-ray    the same through InferencePool -> Router -> ReplicaActor (Ray) -> VLLMEngine
  (b~) switch    (b) with the replica's GIL switch interval at 1 ms instead of Python's 5 ms (set
                 through Ray's __ray_call__, put back after), on requests of another system prompt
                 (as cold as (b)'s): do Ray's threads in the replica wait for a GIL held by vLLM's
                 output processing on the replica's event loop? (bench/pool_overhead.py --loop-load)
  (b+) queued    (b) with a quarter more requests in flight than vLLM runs at once (max_num_seqs =
                 --concurrency): requests waiting in vLLM's queue cover the path's time between a
                 request's answer and the next one's arrival. What inference.max_inflight above
                 replicas x max_batch_size would buy (the GPU configs set them equal). Compared with
                 (a+), not (a): both rerun the requests of the arm before, whose prompts are then all
                 in the prefix cache. Not the target's measure (that is b/a, at one concurrency)
  (c)  lora      (b) with a rank-32 q_proj,k_proj adapter active on every request

Prints generated tokens/s of each and the ratios b/a and c/b, measured in this run
(targets from issue 7: b/a >= 0.95, c/b >= 0.70), b/a2 (the actor and router alone: (a2)
does the replica's rendering in-process), b~/a, b+/a+, each arm's request latencies (p50, p90, max
seconds from being sent to the answer), where each request's share of the wall time went
(`per_request_s`, below), with --step-stats what the engine did per step (`engine_steps`: requests
running, generated tokens, ms, share of steps finishing a prefill, share run as a full CUDA graph, as
piecewise graphs or without graphs, tokens computed; bt_ray/inference/engine_steps.py)
and each engine's start-up seconds
(engine_start_s: AsyncLLM.from_engine_args for (a), InferencePool.start for (b) and (c)).
With --json the results file is rewritten as each arm finishes, so a run cut short keeps
the arms it completed; a ratio is added once both of its arms are in. Not a test: numbers
depend on the GPU.

    python bench/gpu_serving.py                              # 512 requests, 64 in flight
    python bench/gpu_serving.py --step-stats                 # + the engine's steps (vLLM stat logging on)
    python bench/gpu_serving.py --requests 512 --concurrency 128 --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                   "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
                   "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

from bt_ray.config import load_config  # noqa: E402
from bt_ray.inference.engine import GenerationRequest, SamplingParams  # noqa: E402
from bt_ray.inference.engine_steps import EngineSteps, step_summary  # noqa: E402
from bt_ray.synthetic import random_lora, read_config, words, write_config_only  # noqa: E402

ARCH = Path(__file__).resolve().parent / "models" / "llama-3-8b.json"
SAMPLING = SamplingParams(temperature=0.0, max_tokens=128, stop=())
RATIOS = {"bt_ray_vs_raw": ("bt_ray", "raw"), "lora_vs_base": ("lora", "bt_ray"),
          "bt_ray_vs_raw_rendered": ("bt_ray", "raw_rendered"), "raw_rendered_vs_raw": ("raw_rendered", "raw"),
          "bt_ray_queued_vs_raw_queued": ("bt_ray_queued", "raw_queued"),
          "bt_ray_switch_vs_raw": ("bt_ray_switch", "raw")}


SWITCH_INTERVAL_S = 0.001  # arm (b~)
# Largest engine step run as a CUDA graph, as the GPU configs' engines get it (max_batch_size 256: vLLM's
# default, 2 x max_num_seqs up to 512). At 64 in flight vLLM's default would be 128: a step of 63 decodes
# plus one new request's 100 uncached prompt tokens would then run without graphs. (a) sends each wave's
# requests together, so its steps are prefill-only or decode-only; requests that reach the engine a few
# steps apart, as through any serving path, make such mixed steps the common case.
CAPTURE_SIZE = 512


def queued(concurrency: int) -> int:
    """In flight for the (a+) and (b+) arms: a quarter more than vLLM runs at once (max_num_seqs)."""
    return concurrency + max(1, concurrency // 4)


def requests(n: int, prefix: int = 600, own: int = 100, system_first: int = 1000) -> list[GenerationRequest]:
    """DSPy-shaped calls: one shared system prompt (words from `system_first` on: another value, another
    program whose prompts share no cached block with these), then a user message of each request's own words."""
    system = {"role": "system", "content": words(range(system_first, system_first + prefix))}
    return [GenerationRequest((system, {"role": "user", "content": words(range(5000 + i * own, 5000 + (i + 1) * own))}),
                              SAMPLING, request_id=f"r{i}") for i in range(n)]


def run_config(model_dir: str, concurrency: int, max_model_len: int, eager: bool, step_stats: bool = False,
               capture_size: int = CAPTURE_SIZE):
    graphs = [] if eager or not capture_size else [f"inference.vllm.max_cudagraph_capture_size={capture_size}"]
    return load_config(None, [
        f"model.name={model_dir}", "placement.mode=split", "train.use_gpu=true", "inference.engine=vllm",
        "inference.replicas=1", "inference.gpus_per_replica=1", "inference.cpus_per_replica=2",
        # max_num_seqs = the requests in flight (full decode CUDA graphs are captured up to it)
        f"inference.max_batch_size={concurrency}", "inference.vllm.load_format=dummy",
        "inference.vllm.max_lora_rank=32", f"inference.vllm.max_model_len={max_model_len}",
        f"inference.vllm.enforce_eager={str(eager).lower()}", "inference.vllm.gpu_memory_utilization=0.85",
        f"inference.vllm.step_stats={str(step_stats).lower()}", "inference.request_timeout_s=900", *graphs])


# ---------------------------------------------------------------- (a) raw vLLM


def raw_vllm(config, model_dir: str, reqs: list[GenerationRequest], concurrency: int, warmup: int,
             on_arm: Callable[[str, dict], None] | None = None) -> tuple[dict, dict]:
    """(a), (a+) and (a2) on one engine; (a)'s dict has its start-up seconds. `on_arm("raw" | "raw_queued" |
    "raw_rendered", result)` is called as each arm finishes."""
    from bt_ray.inference.vllm_compat import engine_env

    engine_env()  # the replica's engine settings (sampler, spawn), before vLLM is imported

    from transformers import AutoTokenizer
    from vllm import AsyncEngineArgs
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from bt_ray.inference.chat import prompt_ids
    from bt_ray.inference.renderer import PromptRenderer
    from bt_ray.inference.vllm_args import engine_kwargs, sampling_kwargs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [prompt_ids(tokenizer, r.messages) for r in reqs]
    params = VSamplingParams(**sampling_kwargs(SAMPLING), output_kind=RequestOutputKind.FINAL_ONLY)
    steps = EngineSteps() if config.inference.vllm.step_stats else None
    start = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(config.inference, model_dir)),
                                    stat_loggers=None if steps is None else [steps])
    engine_start_s = time.perf_counter() - start

    renderer = PromptRenderer(tokenizer)
    report = on_arm or (lambda name, result: None)

    async def one(i: int, gate: asyncio.Semaphore, render: bool) -> tuple[int, float, float]:
        async with gate:
            sent = time.perf_counter()
            ids = await renderer.ids(reqs[i].messages) if render else prompts[i]
            rendered = time.perf_counter() - sent
            final = None
            async for out in llm.generate({"prompt_token_ids": ids}, params, f"raw-{i}-{time.time()}"):
                final = out
            return len(final.outputs[0].token_ids), time.perf_counter() - sent, rendered

    async def measure(indices, render: bool = False, in_flight: int = concurrency) -> dict:
        gate = asyncio.Semaphore(in_flight)
        before = None if steps is None else steps.snapshot()
        start = time.perf_counter()
        done = await asyncio.gather(*(one(i, gate, render) for i in indices))
        wall = time.perf_counter() - start
        latencies = [latency for _, latency, _ in done]
        return summary(sum(tokens for tokens, _, _ in done), wall, latencies, in_flight,
                       render_s=sum(r for _, _, r in done), inside_s=sum(latencies),
                       engine_steps=None if steps is None else step_summary(before, steps.snapshot()))

    async def main() -> tuple[dict, dict]:
        await measure(range(warmup))  # also computes the shared prefix once, as in the other arms
        raw = {**(await measure(range(len(reqs)))), "engine_start_s": round(engine_start_s, 1)}
        report("raw", raw)
        # (a+) reruns (a)'s requests, all cached now, as (b+) reruns (b)'s
        report("raw_queued", await measure(range(len(reqs)), in_flight=queued(concurrency)))
        await llm.reset_prefix_cache()  # (a2) starts from what (a) started from: the same requests, uncached
        await measure(range(warmup), render=True)
        rendered = await measure(range(len(reqs)), render=True)
        report("raw_rendered", rendered)
        return raw, rendered

    try:
        return asyncio.run(main())
    finally:
        renderer.close()
        llm.shutdown()


# ---------------------------------------------------------------- (b), (c) through bt-ray


def through_pool(config, model_dir: str, reqs: list[GenerationRequest], concurrency: int, warmup: int,
                 adapter_dir: str, on_arm: Callable[[str, dict], None] | None = None) -> tuple[dict, dict]:
    """(b) and (c) on one pool, and (b~) and (b+) between them; (b)'s dict has the pool's start-up seconds.
    `on_arm("bt_ray" | "bt_ray_switch" | "bt_ray_queued" | "lora", result)` is called as each arm finishes,
    before the next one starts."""
    import ray

    from bt_ray.inference.placement import connect
    from bt_ray.inference.pool import InferencePool

    started = connect(None)
    pool = InferencePool(config, model_dir, "bench")
    start = time.perf_counter()
    pool.start(timeout_s=900)
    engine_start_s = time.perf_counter() - start
    report = on_arm or (lambda name, result: None)
    try:
        base = {**pool_arm(pool, reqs, concurrency, warmup, None), "engine_start_s": round(engine_start_s, 1)}
        report("bt_ray", base)
        # (b~): (b)'s cost (another system prompt: nothing of (b) cached), the replica's GIL handed over sooner
        fresh = requests(len(reqs), system_first=1000 + len(reqs[0].messages[0]["content"].split()))
        with switch_interval(pool, SWITCH_INTERVAL_S):
            report("bt_ray_switch", pool_arm(pool, fresh, concurrency, warmup, None))
        report("bt_ray_queued", pool_arm(pool, reqs, queued(concurrency), warmup, None))
        pool.load_adapter("bench-v1", adapter_dir)
        lora = pool_arm(pool, reqs, concurrency, warmup, "bench-v1")
        report("lora", lora)
    finally:
        pool.shutdown()
        if started:  # a cluster this joined (RAY_ADDRESS) or a caller's own stays up
            ray.shutdown()
    return base, lora


def pool_arm(pool, reqs, concurrency: int, warmup: int, adapter: str | None) -> dict:
    tagged = [GenerationRequest(r.messages, r.sampling, adapter, f"{adapter or 'base'}-{r.request_id}") for r in reqs]

    def timed(request: GenerationRequest):
        sent = time.perf_counter()
        return pool.generate(request), time.perf_counter() - sent

    with ThreadPoolExecutor(concurrency) as threads:
        list(threads.map(pool.generate, tagged[:warmup]))
        before = replica_counters(pool)
        start = time.perf_counter()
        done = list(threads.map(timed, tagged))
        wall = time.perf_counter() - start
        after = replica_counters(pool)
    steps = None if after["engine_steps"] is None else step_summary(before["engine_steps"], after["engine_steps"])
    return summary(sum(r.completion_tokens for r, _ in done), wall, [latency for _, latency in done], concurrency,
                   render_s=after["render_s"] - before["render_s"],
                   inside_s=after["generate_s"] - before["generate_s"], engine_steps=steps)


@contextmanager
def switch_interval(pool, seconds: float) -> Iterator[None]:
    """Python's GIL switch interval (sys.setswitchinterval) in every replica process, through Ray's
    `__ray_call__`, for the `with` block; the one before (Python's default: 5 ms) is put back after. While
    the replica's event loop runs Python (vLLM's output processing at every engine step), Ray's threads in
    that process wait for the GIL up to this long each time they need it (a request arriving, an answer
    leaving)."""
    import ray

    def switch(replica, seconds: float) -> float:  # defined here: Ray sends it by value (bench/ is not importable there)
        import sys

        before = sys.getswitchinterval()
        sys.setswitchinterval(seconds)
        return before

    def set_all(seconds: float) -> float:
        return ray.get([actor.__ray_call__.remote(switch, seconds) for actor in pool.replicas.values()])[0]

    before = set_all(seconds)
    try:
        yield
    finally:
        set_all(before)


def replica_counters(pool) -> dict:
    """Summed over replicas since they started: seconds in generate and, of those, waiting for prompts to be
    rendered (vLLM); with inference.vllm.step_stats the engines' step counters (else None)."""
    health = pool.health()
    steps = [h["engine_steps"] for h in health if "engine_steps" in h]
    return {"generate_s": sum(h["generate_s"] for h in health), "render_s": sum(h.get("render_s", 0.0) for h in health),
            "engine_steps": {key: sum(s[key] for s in steps) for key in steps[0]} if steps else None}


def wait_for_free_gpu(min_share: float = 0.9, timeout_s: float = 60.0) -> None:
    """vLLM's engine process exits after shutdown(); the next engine needs its memory back."""
    import torch

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info()
        if free >= min_share * total:
            return
        time.sleep(1.0)


def summary(tokens: int, wall: float, latencies: list[float], concurrency: int, render_s: float,
            inside_s: float, engine_steps: dict | None = None) -> dict:
    """Throughput; each request's seconds from being sent (past the concurrency gate) to its answer
    (a path that delays requests between engine steps shows in the latencies, one that leaves gaps
    between them only in the throughput); and `per_request_s`, where the wall time went.

    Each of the `concurrency` slots is held for concurrency * wall / requests seconds per request
    (`slot`): `idle` between requests (the sender, and the tail of the run), `ray_path` from the pool
    to the replica and back (latency less the replica's time in generate; 0 for raw vLLM),
    `render` waiting for the prompt's ids, `engine` the rest. They add up to `slot`, and arm x / arm y
    in tokens/s is slot(y) / slot(x) for equal tokens: the part that grew is the part that costs.
    `inside_s` and `render_s` are sums over the requests. `engine_steps` (engine_steps.step_summary), when
    counted, is added as it is."""
    ranked = sorted(latencies)
    n = len(latencies)

    def at(q: float) -> float:
        return round(ranked[min(n - 1, int(q * n))], 3)

    slot, latency = concurrency * wall / n, sum(latencies) / n
    parts = {"slot": slot, "idle": slot - latency, "ray_path": latency - inside_s / n, "render": render_s / n,
             "engine": (inside_s - render_s) / n}
    return {"generated_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "requests_per_s": round(n / wall, 2),
            "latency_s": {"p50": at(0.5), "p90": at(0.9), "max": round(ranked[-1], 3)},
            "per_request_s": {name: round(value, 6) for name, value in parts.items()},
            **({} if engine_steps is None else {"engine_steps": engine_steps})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512,
                        help="8 waves at 64 in flight: the closed loop's ramp at the start and drain at the end "
                             "are a small share of the run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs or compilation (faster start)")
    parser.add_argument("--capture-size", type=int, default=CAPTURE_SIZE,
                        help="largest engine step (tokens) run as a CUDA graph, in every arm (the GPU configs' "
                             "value); 0 = vLLM's default for --concurrency (2 x it, at most 512)")
    parser.add_argument("--step-stats", action="store_true",
                        help="count the engine's steps in every arm (vLLM's stat logging on, in each arm alike)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    import torch

    work = Path(tempfile.mkdtemp(prefix="bt-ray-bench-"))
    arch = read_config(ARCH)
    model_dir = str(write_config_only(work / "llama-3-8b", arch))
    adapter_dir = str(random_lora(work / "lora-r32-qk", arch, rank=32))
    config = run_config(model_dir, args.concurrency, max_model_len=2048, eager=args.eager,
                        step_stats=args.step_stats, capture_size=args.capture_size)
    reqs = requests(args.requests)
    results = {"gpu": torch.cuda.get_device_name(0), "model": "Llama-3-8B shapes, dummy weights, bf16",
               "requests": args.requests, "concurrency": args.concurrency, "prompt_tokens": "600 shared + 100 own",
               "max_tokens": SAMPLING.max_tokens, "eager": args.eager, "step_stats": args.step_stats,
               "max_cudagraph_capture_size": config.inference.vllm.max_cudagraph_capture_size}
    labels = {"raw": "(a)  raw vLLM        ", "raw_queued": "(a+) + 25% queued    ",
              "raw_rendered": "(a2) + rendering     ",
              "bt_ray": "(b)  bt-ray replica  ", "bt_ray_switch": "(b~) + GIL switch 1ms",
              "bt_ray_queued": "(b+) + 25% queued    ",
              "lora": "(c)  + LoRA r32 q,k  "}

    def record(name: str, result: dict) -> None:
        """Print an arm's result and, with --json, rewrite the file with every arm finished so far."""
        results[name] = result
        print(f"{labels[name]} {result}", flush=True)
        for ratio, (top, bottom) in RATIOS.items():
            if top in results and bottom in results:
                results[ratio] = round(results[top]["tokens_per_s"] / results[bottom]["tokens_per_s"], 3)
        if args.json:
            write_json(Path(args.json), results)

    print(f"{results['gpu']}: {args.requests} requests, {args.concurrency} in flight", flush=True)
    raw_vllm(config, model_dir, reqs, args.concurrency, args.warmup, on_arm=record)
    wait_for_free_gpu()
    through_pool(config, model_dir, reqs, args.concurrency, args.warmup, adapter_dir, on_arm=record)
    print(f"bt-ray / raw = {results['bt_ray_vs_raw']} (target >= 0.95); "
          f"LoRA / base = {results['lora_vs_base']} (target >= 0.70); bt-ray / raw with rendering = "
          f"{results['bt_ray_vs_raw_rendered']} (the actor and router alone); with the replica's GIL switch interval at "
          f"1 ms: {results['bt_ray_switch_vs_raw']}; with a quarter more requests queued, bt-ray / raw = "
          f"{results['bt_ray_queued_vs_raw_queued']}")


def write_json(path: Path, results: dict) -> None:
    """Replace the file whole (a run killed mid-write leaves the previous version, not half a file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=2))
    partial.replace(path)


if __name__ == "__main__":
    main()
