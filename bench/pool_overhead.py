"""What bt-ray's serving path costs per request, on CPU: the path of bench/gpu_serving.py's arm (b).

The engine is the FakeEngine (labelled test engine, no model): it answers a request after the
seconds its message names (`fake-sleep:<s>`), many at once, as a GPU batch does. Every arm sends
the same --requests with --concurrency in flight:

  (a) direct  the engine in this process, on asyncio (what raw vLLM's arm measures)
  (b) pool    InferencePool -> Router -> ReplicaActor (Ray) -> the same engine, from driver threads
              (one replica; --replicas for more)

and, for (b)'s ceiling at 0 s, bare Ray: the same requests as calls to an async actor that answers
at once, from as many driver threads (what Ray itself costs per call).

Prints requests/s of each, b/a and, of (b), each request's mean Ray path (its latency less the
replica's time in generate) and idle slot time (gpu_serving.summary's parts) for each --latency-s.
At the latency of the GPU bench's requests (64 in flight at about 60 requests/s: about 1 s each),
b/a is the share of arm (a)'s throughput the path keeps before any GPU work; at 0 s, (b) is the
path's ceiling in requests/s. What this leaves out: the vLLM replica's prompt rendering (timed
separately below: a wave of --concurrency prompts, how long each waits for its ids and how long the
replica's event loop stalls, rendered one by one on it, in one batch off it, or by PromptRenderer)
and how the GPU shares its host's CPU. With --loop-load P,B the engine's event loop is kept busy B ms
of every P ms (a Python spin holding the GIL), in (a) and (b) alike, as vLLM's output processing keeps
the loop of a replica (or of raw vLLM's caller) busy at every engine step: does the Ray path cost more
when the replica's loop is busy? With --switch-interval-ms S, (b) runs again with the replica's GIL switch
interval at S ms (Python's default: 5), the arm (b~) of bench/gpu_serving.py. Not a test: numbers depend on
the machine.

    python bench/pool_overhead.py                                   # latencies 1.0 and 0, 64 in flight
    python bench/pool_overhead.py --latency-s 0.5,0 --requests 2048 --concurrency 128
    python bench/pool_overhead.py --latency-s 1.0 --loop-load 6.5,2  # a loop busy 2 ms of each 6.5 ms step
    python bench/pool_overhead.py --latency-s 1.0 --loop-load 6.5,4 --switch-interval-ms 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import gpu_serving  # noqa: E402 (bench/, beside this script)

from bt_ray.config import load_config  # noqa: E402
from bt_ray.inference.engine import GenerationRequest  # noqa: E402
from bt_ray.inference.fake import FakeEngine, write_loop_load  # noqa: E402

T = TypeVar("T")


def requests(n: int, latency_s: float) -> list[GenerationRequest]:
    """The GPU bench's requests, each told to the FakeEngine to take `latency_s`."""
    def timed(r: GenerationRequest) -> GenerationRequest:
        *head, last = r.messages
        last = {**last, "content": f"fake-sleep:{latency_s} {last['content']}"}
        return GenerationRequest((*head, last), r.sampling, r.adapter, r.request_id)

    return [timed(r) for r in gpu_serving.requests(n)]


def direct(reqs: list[GenerationRequest], concurrency: int, loop_load: tuple[float, float] | None = None) -> float:
    engine = FakeEngine(loop_load=loop_load)

    async def main() -> float:
        gate = asyncio.Semaphore(concurrency)

        async def one(request):
            async with gate:
                return await engine.generate(request)

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in reqs))
        return time.perf_counter() - start

    return asyncio.run(main())


class BareActor:
    """An async Ray actor that answers at once: Ray's own cost per call, without bt-ray's pool or engine."""

    async def generate(self, request: GenerationRequest):
        from bt_ray.inference.engine import GenerationResult

        return GenerationResult(request.request_id, "answer", 700, 1, "stop", None)


def bare_ray(reqs: list[GenerationRequest], concurrency: int) -> float:
    """Requests/s of bare Ray calls (the same requests, from as many driver threads, ray.get each)."""
    import ray

    actor = ray.remote(BareActor).options(num_cpus=0.5).remote()
    call = lambda request: ray.get(actor.generate.remote(request))  # noqa: E731
    try:
        with ThreadPoolExecutor(concurrency) as threads:
            list(threads.map(call, reqs[:concurrency]))  # warm-up
            start = time.perf_counter()
            list(threads.map(call, reqs))
            return len(reqs) / (time.perf_counter() - start)
    finally:
        ray.kill(actor)


async def watch_loop(work: Awaitable[T]) -> tuple[T, float]:
    """Await `work` on this event loop beside a 1 ms heartbeat: its result and the loop's longest stall (s)."""
    stall, done = 0.0, False

    async def heartbeat():
        nonlocal stall
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            stall = max(stall, time.perf_counter() - before - 0.001)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.01)
    try:
        result = await work
    finally:
        done = True
        await beat  # its last beat measures a stall that ended with `work`
    return result, stall


def render_stall(wave: int = 64, waves: int = 8) -> dict[str, tuple[float, float, float]]:
    """The vLLM replica's prompt rendering on the GPU bench's requests and tokenizer, `wave` requests
    arriving at once (as when a batch of 64 finishes together), `waves` times, on an event loop with a
    1 ms heartbeat: per way of rendering, (ms until a prompt's ids are ready, the mean over the wave;
    the loop's longest stall in ms; ms until the wave's last prompt is ready), medians over the waves.
    'one by one' is chat.prompt_ids on the loop (the replica before PromptRenderer); 'one batch' the
    whole wave in one call on one worker thread (PromptRenderer as first written); 'PromptRenderer'
    its chunks on its thread pool (the replica now)."""
    import statistics
    from pathlib import Path

    from transformers import AutoTokenizer

    from bt_ray.inference.chat import prompt_ids
    from bt_ray.inference.renderer import PromptRenderer
    from bt_ray.synthetic import read_config, write_config_only

    arch = read_config(gpu_serving.ARCH)
    tokenizer = AutoTokenizer.from_pretrained(write_config_only(Path(tempfile.mkdtemp()) / "m", arch))
    renderers = {"one batch": PromptRenderer(tokenizer, chunk=wave, threads=1),
                 "PromptRenderer": PromptRenderer(tokenizer)}

    async def one_by_one(messages):
        return prompt_ids(tokenizer, messages)

    async def measure(render, reqs) -> tuple[float, float, float]:
        async def wave() -> list[float]:
            start = time.perf_counter()

            async def timed(messages) -> float:
                await render(messages)
                return time.perf_counter() - start

            return await asyncio.gather(*(timed(r.messages) for r in reqs))

        ready, stall = await watch_loop(wave())
        return statistics.mean(ready), stall, max(ready)

    async def main() -> dict[str, tuple[float, float, float]]:
        results = {}
        for name, render in (("one by one", one_by_one), *((name, r.ids) for name, r in renderers.items())):
            runs = [await measure(render, gpu_serving.requests(wave)) for _ in range(waves + 1)][1:]  # 1st: warm-up
            results[name] = tuple(statistics.median(run[i] for run in runs) * 1e3 for i in range(3))
        return results

    try:
        return asyncio.run(main())
    finally:
        for renderer in renderers.values():
            renderer.close()


def row(label: str, a: float, b: dict) -> None:
    parts = b["per_request_s"]
    print(f"{label} {a:17.1f} {b['requests_per_s']:15.1f} {b['requests_per_s'] / a:6.3f} "
          f"{parts['ray_path'] * 1e3:19.1f} {parts['idle'] * 1e3:15.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-s", default="1.0,0", help="comma-separated engine latencies per request")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--loop-load", help="P,B: keep the engine's event loop busy B ms of every P ms")
    parser.add_argument("--switch-interval-ms", type=float, help="also (b~): the replica's GIL switch interval")
    args = parser.parse_args()

    import ray

    from bt_ray.inference.pool import InferencePool

    latencies = [float(x) for x in args.latency_s.split(",")]
    loop_load = tuple(float(x) for x in args.loop_load.split(",")) if args.loop_load else None
    model_dir = tempfile.mkdtemp(prefix="bt-ray-overhead-")  # the FakeEngine's: no model, maybe a loop load
    if loop_load:
        write_loop_load(model_dir, *loop_load)
    ray.init(include_dashboard=False, log_to_driver=False)
    config = load_config(None, ["inference.engine=fake", f"inference.replicas={args.replicas}",
                                "inference.cpus_per_replica=0.5", f"output_dir={tempfile.mkdtemp()}"])
    print(f"{args.requests} requests, {args.concurrency} in flight, {args.replicas} replica(s), "
          f"{os.cpu_count()} CPUs" + (f", engine loop busy {loop_load[1]:g} ms of every {loop_load[0]:g} ms"
                                      if loop_load else ""))
    print(f"{'latency s':>9} {'(a) direct req/s':>17} {'(b) pool req/s':>15} {'b/a':>6} "
          f"{'(b) Ray path ms/req':>19} {'(b) idle ms/req':>15}")
    pool = InferencePool(config, model_dir, "overhead")
    pool.start()
    try:
        for latency in latencies:
            reqs = requests(args.requests, latency)
            a = args.requests / direct(reqs, args.concurrency, loop_load)
            # the GPU bench's arm (b); its warm-up wave also starts the actors' and the threads' paths
            b = gpu_serving.pool_arm(pool, reqs, args.concurrency, args.concurrency, None)
            row(f"{latency:9.2f}", a, b)
            if args.switch_interval_ms:
                with gpu_serving.switch_interval(pool, args.switch_interval_ms / 1e3):
                    row(f"{'(b~)':>9}", a, gpu_serving.pool_arm(pool, reqs, args.concurrency, args.concurrency, None))
        bare = bare_ray(requests(args.requests, 0), args.concurrency)
        print(f"bare Ray actor calls, {args.concurrency} driver threads: {bare:.1f} req/s (the ceiling of any path "
              "that makes one Ray call per request)", flush=True)
    finally:
        pool.shutdown()
    ray.shutdown()
    print(f"\nthe vLLM replica's prompt rendering, {args.concurrency} of these prompts arriving at once, on this CPU:")
    print(f"{'':>15} {'ready ms (mean)':>15} {'loop stall ms':>13} {'wave ready ms':>13}")
    for name, (mean, stall, ready) in render_stall(args.concurrency).items():
        print(f"{name:>15} {mean:15.1f} {stall:13.1f} {ready:13.1f}")


if __name__ == "__main__":
    main()
