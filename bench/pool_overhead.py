"""What bt-ray's serving path costs per request, on CPU: the path of bench/gpu_serving.py's arm (b).

The engine is the FakeEngine (labelled test engine, no model): it answers a request after the
seconds its message names (`fake-sleep:<s>`), many at once, as a GPU batch does. Every arm sends
the same --requests with --concurrency in flight:

  (a) direct  the engine in this process, on asyncio (what raw vLLM's arm measures)
  (b) pool    InferencePool -> Router -> ReplicaActor (Ray) -> the same engine, from driver threads
              (one replica; --replicas for more)

Prints requests/s of each and b/a for each --latency-s. At the latency of the GPU bench's requests
(64 in flight at about 60 requests/s: about 1 s each), b/a is the share of arm (a)'s throughput the
path keeps before any GPU work; at 0 s, (b) is the path's ceiling in requests/s. What this leaves
out: the vLLM replica's prompt rendering (`chat.prompt_ids`, timed separately below) and how the GPU
shares its host's CPU. Not a test: numbers depend on the machine.

    python bench/pool_overhead.py                                   # latencies 1.0 and 0, 64 in flight
    python bench/pool_overhead.py --latency-s 0.5,0 --requests 2048 --concurrency 128
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import gpu_serving  # noqa: E402 (bench/, beside this script)

from bt_ray.config import load_config  # noqa: E402
from bt_ray.inference.engine import GenerationRequest  # noqa: E402
from bt_ray.inference.fake import FakeEngine  # noqa: E402


def requests(n: int, latency_s: float) -> list[GenerationRequest]:
    """The GPU bench's requests, each told to the FakeEngine to take `latency_s`."""
    def timed(r: GenerationRequest) -> GenerationRequest:
        *head, last = r.messages
        last = {**last, "content": f"fake-sleep:{latency_s} {last['content']}"}
        return GenerationRequest((*head, last), r.sampling, r.adapter, r.request_id)

    return [timed(r) for r in gpu_serving.requests(n)]


def direct(reqs: list[GenerationRequest], concurrency: int) -> float:
    engine = FakeEngine()

    async def main() -> float:
        gate = asyncio.Semaphore(concurrency)

        async def one(request):
            async with gate:
                return await engine.generate(request)

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in reqs))
        return time.perf_counter() - start

    return asyncio.run(main())


def through_pool(pool, reqs: list[GenerationRequest], concurrency: int) -> float:
    with ThreadPoolExecutor(concurrency) as threads:
        start = time.perf_counter()
        results = list(threads.map(pool.generate, reqs))
        wall = time.perf_counter() - start
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    return wall


def prompt_cost(n: int = 256) -> tuple[float, int]:
    """Seconds per request of the vLLM replica's prompt rendering on the GPU bench's requests and tokenizer,
    and the prompt's tokens."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from bt_ray.inference.chat import prompt_ids
    from bt_ray.synthetic import read_config, write_config_only

    arch = read_config(gpu_serving.ARCH)
    tokenizer = AutoTokenizer.from_pretrained(write_config_only(Path(tempfile.mkdtemp()) / "m", arch))
    reqs = gpu_serving.requests(n)
    tokens = len(prompt_ids(tokenizer, reqs[0].messages))
    start = time.perf_counter()
    for r in reqs:
        prompt_ids(tokenizer, r.messages)
    return (time.perf_counter() - start) / n, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-s", default="1.0,0", help="comma-separated engine latencies per request")
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()

    import ray

    from bt_ray.session import Session

    latencies = [float(x) for x in args.latency_s.split(",")]
    ray.init(include_dashboard=False, log_to_driver=False)
    config = load_config(None, ["inference.engine=fake", f"inference.replicas={args.replicas}",
                                "inference.cpus_per_replica=0.5", f"output_dir={tempfile.mkdtemp()}"])
    print(f"{args.requests} requests, {args.concurrency} in flight, {args.replicas} replica(s), "
          f"{os.cpu_count()} CPUs")
    print(f"{'latency s':>9} {'(a) direct req/s':>17} {'(b) pool req/s':>15} {'b/a':>6}")
    with Session(config, "overhead") as session:
        through_pool(session.pool, requests(args.concurrency, 0), args.concurrency)  # warm-up: actors, threads
        for latency in latencies:
            reqs = requests(args.requests, latency)
            a = args.requests / direct(reqs, args.concurrency)
            b = args.requests / through_pool(session.pool, reqs, args.concurrency)
            print(f"{latency:9.2f} {a:17.1f} {b:15.1f} {b / a:6.3f}", flush=True)
    ray.shutdown()
    seconds, tokens = prompt_cost()
    print(f"prompt rendering in the vLLM replica (chat.prompt_ids, {tokens} tokens): {seconds * 1e3:.2f} ms per "
          "request, on this CPU")


if __name__ == "__main__":
    main()
