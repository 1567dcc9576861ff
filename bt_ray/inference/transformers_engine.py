"""TransformersEngine: the CPU (and small-GPU) engine, built on plain transformers + peft.

Where its speed comes from (DESIGN.md §2): concurrent `generate` calls are queued
and run as micro-batches, and the prompt prefix shared by DSPy calls of one program
(instructions + demos) is computed once per adapter and its KV reused, so a call
only pays for its short last message and its answer.

    generate() --queue--> batch loop (event loop) --run_in_executor--> worker thread
                                                                       tokenize, prefix KV,
                                                                       prefill + decode

All model work, adapter loads and sleep/wake run on one worker thread, in order, so
they never race; the event loop only queues requests and hands out results. That
thread is shared by every engine in the process (see `torch_thread`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bt_ray.config import InferenceConfig
from bt_ray.errors import AdapterError, BtRayError, ConfigError, EngineError
from bt_ray.inference.batching import Pending, RequestQueue
from bt_ray.inference.chat import prefix_ids, prompt_ids
from bt_ray.inference.engine import GenerationRequest, GenerationResult
from bt_ray.inference.generation import Row, compute_prefix, generate_rows
from bt_ray.inference.kv_cache import PrefixKV
from bt_ray.inference.prefix_cache import PrefixCache
from bt_ray.inference.sampling import make_generator, request_seed

logger = logging.getLogger(__name__)

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU and bfloat16 on GPU.

    On CPUs with AMX, bf16 decodes batches of 16 about 1.65x faster than fp32 (bench/
    engine_throughput.py), but the 135M model's greedy answers shift with it (more DSPy
    format slips in a small probe), so CPU keeps fp32 unless asked.
    """
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Counters:
    requests: int = 0
    failed_requests: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0


_TORCH_THREAD_NAME = "bt-ray-torch"
_torch_thread: ThreadPoolExecutor | None = None
_torch_thread_lock = threading.Lock()


def torch_thread() -> ThreadPoolExecutor:
    """The one thread of this process that runs torch compute (model loads, batches, adapters).

    With GNU OpenMP every thread that runs parallel torch ops gets its own OpenMP team;
    once the teams hold more threads than there are cores, OpenMP stops spinning between
    parallel regions and each small op waits for its threads to wake up. Measured on 2
    cores: decode-sized matmuls 1.65x slower, in every thread, for the life of the process.
    """
    global _torch_thread
    with _torch_thread_lock:
        if _torch_thread is None:
            _torch_thread = ThreadPoolExecutor(1, thread_name_prefix=_TORCH_THREAD_NAME)
        return _torch_thread


def run_on_torch_thread(fn: Callable[..., T], *args: Any) -> T:
    """Call `fn(*args)` on the torch thread and wait for it (directly, if already there)."""
    if threading.current_thread().name.startswith(_TORCH_THREAD_NAME):
        return fn(*args)
    return torch_thread().submit(fn, *args).result()


class TransformersEngine:
    def __init__(self, model_dir: str, config: InferenceConfig, dtype: str = "auto"):
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        threads = config.torch_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        # All model work, adapter loads and sleep/wake run on one thread, one after another.
        self._executor = torch_thread()
        run_on_torch_thread(self._load_model, model_dir, threads)
        self._peft: Any = None  # peft.PeftModel wrapping self.model, from the first adapter load on
        self.adapters: dict[str, str] = {}  # loaded adapter name -> path
        self._used_names: set[str] = set()
        self._stop_ids = _end_of_turn_ids(self.tokenizer, self.model)
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self._stop_ids)
        self.prefixes = PrefixCache(config.prefix_cache_tokens)
        self.queue = RequestQueue()
        self.counters = Counters()
        self.asleep = False
        self._batcher: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None
        logger.info("transformers engine: %s on %s (%s), %d torch threads", model_dir, self.device, self.dtype, threads)

    def _load_model(self, model_dir: str, threads: int) -> None:
        torch.set_num_threads(threads)  # the thread count is per thread
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype, attn_implementation="sdpa")
        self.model.to(self.device).eval()
        _check_full_attention(self.model.config, model_dir)

    # ------------------------------------------------------------ engine protocol

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.asleep:
            raise EngineError("the transformers engine is asleep; call wake() before generate()")
        self._start_batcher()
        future = asyncio.get_running_loop().create_future()
        self.queue.put(Pending(request, future))
        self._arrived.set()
        return await future

    async def load_adapter(self, name: str, path: str) -> None:
        await self._on_worker(self._load_adapter, name, path)

    async def unload_adapter(self, name: str) -> None:
        await self._on_worker(self._unload_adapter, name)

    async def sleep(self) -> None:
        await self._on_worker(self._sleep)

    async def wake(self) -> None:
        await self._on_worker(self._wake)

    async def health(self) -> dict[str, Any]:
        c = self.counters
        return {
            "engine": "transformers", "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
            "adapters": sorted(self.adapters), "queue": len(self.queue), "asleep": self.asleep,
            **asdict(c), "mean_batch_size": (c.requests / c.batches) if c.batches else 0.0,
            "prefix_cache": self.prefixes.stats(),
        }

    # ------------------------------------------------------------ batching (event loop)

    def _start_batcher(self) -> None:
        if self._batcher is None or self._batcher.done() or self._batcher.get_loop() is not asyncio.get_running_loop():
            self._arrived = asyncio.Event()
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _batch_loop(self) -> None:
        while True:
            await self._wait_for_requests()
            batch = self.queue.next_batch(self.config.max_batch_size)
            if not batch:
                continue
            try:
                outcomes = await self._on_worker(self._run_batch, [p.request for p in batch])
            except Exception as exc:  # the batch as a whole failed: every caller hears about it
                logger.exception("transformers engine: a batch of %d requests failed", len(batch))
                outcomes = [exc] * len(batch)
            for pending, outcome in zip(batch, outcomes):
                if pending.future.done():  # the caller went away
                    continue
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)

    async def _wait_for_requests(self) -> None:
        """Wait for a first request, then up to batch_wait_ms for the batch to fill."""
        while not len(self.queue):
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.batch_wait_ms / 1000
        while len(self.queue) < self.config.max_batch_size and loop.time() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break

    async def _on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------ model work (worker thread)

    def _run_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult | Exception]:
        """Generate for requests sharing one adapter. Returns a result or an exception per request."""
        adapter = requests[0].adapter
        if self.asleep:
            error = EngineError("the transformers engine went to sleep before this request ran; call wake()")
            return [error] * len(requests)
        if adapter is not None and adapter not in self.adapters:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            return [AdapterError(f"adapter {adapter!r} is not loaded on this engine (loaded: {loaded}); "
                                 "load it with load_adapter() first")] * len(requests)
        started = time.perf_counter()
        outcomes: list[GenerationResult | Exception | None] = [None] * len(requests)
        rows: dict[int, tuple[Row, int]] = {}  # request index -> (row, cached prompt tokens)
        with torch.inference_mode(), self._adapter_context(adapter):
            fresh: dict[tuple, PrefixKV] = {}  # prefixes computed for this batch
            for i, request in enumerate(requests):
                try:
                    rows[i] = self._make_row(request, fresh)
                except Exception as exc:  # a bad request fails alone
                    outcomes[i] = _request_error(request, exc)
            if rows:
                try:
                    generate_rows(self.model, self.tokenizer, [row for row, _ in rows.values()],
                                  self._pad_id, self._stop_ids)
                except Exception as exc:
                    logger.exception("transformers engine: a batch of %d requests failed", len(rows))
                    error = EngineError(f"transformers engine: a batch of {len(rows)} requests "
                                        f"(adapter {adapter!r}) failed: {exc!r}")
                    error.__cause__ = exc
                    for i in rows:
                        outcomes[i] = error
                    rows = {}
        for i, (row, cached) in rows.items():
            outcomes[i] = GenerationResult(requests[i].request_id, row.text, len(row.prompt), len(row.tokens),
                                           row.finish_reason, adapter, cached)
        self._count(outcomes, adapter, started)
        return outcomes

    def _make_row(self, request: GenerationRequest, fresh: dict[tuple, PrefixKV]) -> tuple[Row, int]:
        """Tokenize a request and find (or compute) its prefix KV. Returns the row and its cached tokens."""
        sampling = request.sampling
        prompt = prompt_ids(self.tokenizer, request.messages)
        context = self.model.config.max_position_embeddings
        if sampling.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {sampling.max_tokens}")
        if len(prompt) + sampling.max_tokens > context:
            raise EngineError(f"prompt of {len(prompt)} tokens + max_tokens {sampling.max_tokens} exceeds the "
                              f"model's context of {context} tokens; shorten the prompt or lower max_tokens")
        prefix, cached = None, 0
        ids = prefix_ids(self.tokenizer, request.messages, prompt)
        if ids:
            key = (request.adapter, tuple(ids))
            prefix = fresh.get(key) or self.prefixes.get(key)
            if prefix is not None:
                cached = len(ids)
            else:
                prefix = fresh[key] = compute_prefix(self.model, ids)
                self.prefixes.put(key, prefix, len(ids))  # one longer than the whole budget is not kept
        generator = make_generator(request_seed(sampling, prompt), self.device)
        return Row(prompt, prefix, sampling, generator), cached

    def _adapter_context(self, adapter: str | None):
        if self._peft is None:
            return nullcontext()
        if adapter is None:  # the base model: LoRA layers off (peft cannot disable with no adapter loaded)
            return self._peft.disable_adapter() if self.adapters else nullcontext()
        self._peft.set_adapter(adapter)
        return nullcontext()

    def _count(self, outcomes: list, adapter: str | None, started: float) -> None:
        c = self.counters
        c.batches += 1
        for outcome in outcomes:
            c.requests += 1
            if isinstance(outcome, GenerationResult):
                c.prompt_tokens += outcome.prompt_tokens
                c.cached_prompt_tokens += outcome.cached_prompt_tokens
                c.generated_tokens += outcome.completion_tokens
            else:
                c.failed_requests += 1
        logger.debug("batch of %d (adapter %r) in %.2fs; prefix cache %s", len(outcomes), adapter,
                     time.perf_counter() - started, self.prefixes.stats())

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel  # peft is only needed once adapters are used

        if name in self._used_names:
            raise AdapterError(f"adapter name {name!r} was already used on this engine; names are never reused "
                               "(caches keyed by name would serve stale outputs): load it under a new version name")
        if not (Path(path) / "adapter_config.json").is_file():
            raise AdapterError(f"adapter {name!r}: {path} has no adapter_config.json; "
                               "give a directory written by peft's save_pretrained")
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
            else:
                self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
        except Exception as exc:
            raise AdapterError(f"could not load adapter {name!r} from {path}: {exc}") from exc
        self._peft.eval()
        self.adapters[name] = path
        self._used_names.add(name)
        logger.info("loaded adapter %s from %s", name, path)

    def _unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            raise AdapterError(f"adapter {name!r} is not loaded (loaded: {loaded})")
        self._peft.delete_adapter(name)
        del self.adapters[name]
        evicted = self.prefixes.evict_adapter(name)
        logger.info("unloaded adapter %s (%d cached prefixes dropped)", name, evicted)

    def _sleep(self) -> None:
        self.asleep = True
        self.prefixes.clear()
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def _wake(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)
        self.asleep = False


def _request_error(request: GenerationRequest, exc: Exception) -> Exception:
    if isinstance(exc, BtRayError):
        return exc
    error = EngineError(f"request {request.request_id!r} failed: {exc!r}")
    error.__cause__ = exc
    return error


def _end_of_turn_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """Token ids that end an answer: the tokenizer's EOS and the model's generation EOS ids."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise EngineError("the tokenizer and generation config name no end-of-sequence token; "
                          "generation could only stop at max_tokens or a stop string")
    return frozenset(ids)


def _check_full_attention(config: Any, model_dir: str) -> None:
    """Prefix KV reuse assumes every layer keeps all past tokens (no sliding-window layers)."""
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise EngineError(f"{model_dir}: layer types {other} are not supported by the transformers engine "
                          "(its batch KV cache assumes full attention in every layer); use the vLLM engine")
