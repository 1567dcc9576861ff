"""TransformersEngine: the CPU (and small-GPU) engine, built on plain transformers + peft.

Where its speed comes from (DESIGN.md §2): concurrent `generate` calls are decoded
together, and the prompt prefix shared by DSPy calls of one program (instructions +
demos) is computed once per adapter and its KV reused, so a call only pays for its
short last message and its answer.

    generate() --queue--> batcher (event loop) --submit--> _serve (torch thread): admit, one decode step
                                                            ^-- re-submits itself while there is work

Continuous batching: between decode steps, waiting requests for the running batch's
adapter join it (up to max_batch_size rows), so the batch stays full while answers of
very different lengths finish at different steps (generation.py). Results go back to
the callers' event loops with call_soon_threadsafe.

All model work, adapter loads and sleep/wake run on one worker thread, in order, so
they never race: each decode step is its own task there, so an adapter load or a sleep
submitted meanwhile runs between two steps. The event loop only queues requests. That
thread is shared by every engine in the process (see `torch_thread`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bt_ray.config import InferenceConfig
from bt_ray.errors import AdapterError, BtRayError, ConfigError, EngineError, RequestError
from bt_ray.inference.batching import Pending, RequestQueue, settle
from bt_ray.inference.chat import prefix_ids, prompt_ids
from bt_ray.inference.engine import GenerationRequest, GenerationResult
from bt_ray.inference.generation import Batch, Row, compute_prefix
from bt_ray.inference.kv_cache import PrefixKV
from bt_ray.inference.prefix_cache import PrefixCache
from bt_ray.inference.sampling import make_generator, request_seed

logger = logging.getLogger(__name__)

T = TypeVar("T")
_UNKNOWN = object()
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
    batches: int = 0  # prefill batches: a new batch, or rows joining a running one
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decoded_rows: int = 0  # rows decoding, summed over decode steps


@dataclass
class Job:
    """A request being decoded: its caller's future, its row, and its prompt tokens served from cache."""

    pending: Pending
    row: Row
    cached: int


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
        self._peft_mode: Any = _UNKNOWN  # the adapter its LoRA layers are set for (None: off)
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
        # Decode loop state, touched only on the torch thread (but _scheduled, under _lock).
        self._lock = threading.Lock()
        self._scheduled = False  # a _serve task is queued or running
        self._batch: Batch | None = None
        self._batch_adapter: str | None = None
        self._batch_id = 0
        self._jobs: dict[int, Job] = {}  # id(row) -> job, for every row of the running batch
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
            "adapters": sorted(self.adapters), "queue": len(self.queue), "running": len(self._jobs),
            "asleep": self.asleep, "continuous_batching": self.config.continuous_batching, **asdict(c),
            "mean_batch_size": (c.decoded_rows / c.decode_steps) if c.decode_steps else 0.0,
            "prefix_cache": self.prefixes.stats(),
        }

    # ------------------------------------------------------------ batching (event loop)

    def _start_batcher(self) -> None:
        if self._batcher is None or self._batcher.done() or self._batcher.get_loop() is not asyncio.get_running_loop():
            self._arrived = asyncio.Event()
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _batch_loop(self) -> None:
        """Start the decode loop when requests arrive at an idle engine (a busy one takes them itself)."""
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not self._scheduled:
                await self._wait_to_fill()
            self._schedule()

    async def _wait_to_fill(self) -> None:
        """Up to batch_wait_ms for a first batch to fill: rows prefilled together pad less and share prefixes."""
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

    # ------------------------------------------------------------ decode loop (torch thread)

    def _schedule(self, again: bool = False) -> None:
        """Queue one `_serve` on the torch thread, unless one is queued already (any thread).

        One step per task: adapter loads and sleep/wake submitted meanwhile run between
        two steps, in order, and never during one.
        """
        with self._lock:
            if again:  # called by _serve: go on while rows decode or requests wait
                self._scheduled = bool(self._jobs) or len(self.queue) > 0
            elif self._scheduled:
                return
            else:
                self._scheduled = True
            if self._scheduled:
                self._executor.submit(self._serve)

    def _serve(self) -> None:
        """Admit waiting requests into the running batch, then decode one step."""
        try:
            with torch.inference_mode():
                self._admit()
                if self._jobs:
                    self._decode_step()
        except Exception as exc:  # a bug here must not leave callers waiting
            self._fail_running(exc)
        finally:
            self._schedule(again=True)

    def _admit(self) -> None:
        if not self._jobs:  # idle: a new batch for the oldest request's adapter
            taken = self.queue.next_batch(self.config.max_batch_size)
        elif self.config.continuous_batching:
            taken = self.queue.joiners(self._batch_adapter, self.config.max_batch_size - len(self._jobs))
        else:
            return
        if not taken:
            return
        adapter, started = taken[0].request.adapter, time.perf_counter()
        unavailable = self._unavailable(adapter)
        if unavailable:
            for pending in taken:
                self._finish(pending, unavailable, adapter)
            return
        self._use_adapter(adapter)
        jobs = self._make_jobs(taken)
        if not jobs:
            return
        if not self._jobs:
            self._batch = Batch(self.model, self.tokenizer, self._pad_id, self._stop_ids, self.config.max_batch_size)
            self._batch_adapter, self._batch_id = adapter, self._batch_id + 1
        self._jobs.update((id(job.row), job) for job in jobs)
        try:
            done = self._batch.join([job.row for job in jobs])
        except Exception as exc:
            self._fail_running(exc)
            return
        self.counters.batches += 1
        self._collect(done)
        logger.debug("batch %d: %d rows joined (adapter %r) in %.2fs; prefix cache %s", self._batch_id,
                     len(jobs), adapter, time.perf_counter() - started, self.prefixes.stats())

    def _make_jobs(self, taken: list[Pending]) -> list[Job]:
        jobs: list[Job] = []
        fresh: dict[tuple, PrefixKV] = {}  # prefixes computed for these rows
        for pending in taken:
            try:
                jobs.append(Job(pending, *self._make_row(pending.request, fresh)))
            except Exception as exc:  # a bad request fails alone
                self._finish(pending, _request_error(pending.request, exc), pending.request.adapter)
        return jobs

    def _decode_step(self) -> None:
        unavailable = self._unavailable(self._batch_adapter)  # slept or unloaded since the last step
        if unavailable:
            self._end_batch(unavailable)
            return
        for job in list(self._jobs.values()):
            if job.pending.future.done():  # the caller went away: free its slot
                self._batch.drop(job.row)
                del self._jobs[id(job.row)]
        if not self._jobs:
            self._batch = None
            return
        self.counters.decode_steps += 1
        self.counters.decoded_rows += len(self._jobs)
        try:
            self._use_adapter(self._batch_adapter)
            finished = self._batch.step()
        except Exception as exc:
            self._fail_running(exc)
            return
        self._collect(finished)

    def _collect(self, finished: list[Row]) -> None:
        """Hand finished rows to their callers; the batch ends with its last row."""
        for row in finished:
            job = self._jobs.pop(id(row))
            result = GenerationResult(job.pending.request.request_id, row.text, len(row.prompt), len(row.tokens),
                                      row.finish_reason, self._batch_adapter, job.cached)
            self._finish(job.pending, result, self._batch_adapter)
        if not self._jobs:
            self._batch = None  # frees its KV cache

    def _fail_running(self, exc: Exception) -> None:
        """A failed step fails every row of the batch; the engine goes on with a new one."""
        rows = len(self._jobs)
        logger.exception("transformers engine: batch %d (%d rows) failed", self._batch_id, rows)
        error = EngineError(f"transformers engine: batch {self._batch_id} of {rows} requests "
                            f"(adapter {self._batch_adapter!r}) failed: {exc!r}")
        error.__cause__ = exc
        self._end_batch(error)

    def _end_batch(self, error: Exception) -> None:
        jobs, self._jobs, self._batch = self._jobs, {}, None  # cleared before any caller hears of it
        for job in jobs.values():
            self._finish(job.pending, error, self._batch_adapter)

    def _finish(self, pending: Pending, outcome: GenerationResult | Exception, adapter: str | None) -> None:
        """Count an outcome and hand it to the caller's event loop (futures are not thread-safe)."""
        c = self.counters
        c.requests += 1
        if isinstance(outcome, GenerationResult):
            c.prompt_tokens += outcome.prompt_tokens
            c.cached_prompt_tokens += outcome.cached_prompt_tokens
            c.generated_tokens += outcome.completion_tokens
        else:
            c.failed_requests += 1
        try:
            pending.future.get_loop().call_soon_threadsafe(settle, pending.future, outcome)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting
            pass

    def _unavailable(self, adapter: str | None) -> Exception | None:
        if self.asleep:
            return EngineError("the transformers engine went to sleep before this request finished; call wake()")
        if adapter is not None and adapter not in self.adapters:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            return AdapterError(f"adapter {adapter!r} is not loaded on this engine (loaded: {loaded}); "
                                "load it with load_adapter() first")
        return None

    def _make_row(self, request: GenerationRequest, fresh: dict[tuple, PrefixKV]) -> tuple[Row, int]:
        """Tokenize a request and find (or compute) its prefix KV. Returns the row and its cached tokens."""
        sampling = request.sampling
        prompt = prompt_ids(self.tokenizer, request.messages)
        context = self.model.config.max_position_embeddings
        if sampling.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {sampling.max_tokens}")
        if len(prompt) >= context:
            raise RequestError(f"prompt of {len(prompt)} tokens does not fit the model's context of {context} "
                               f"tokens; shorten it (fewer demos: prompt.max_bootstrapped_demos, max_labeled_demos)")
        if len(prompt) + sampling.max_tokens > context:  # as vLLM does: the answer stops at the context's end
            sampling = replace(sampling, max_tokens=context - len(prompt))
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

    def _use_adapter(self, adapter: str | None) -> None:
        """LoRA layers on with `adapter` active, or off for the base model (None).

        Switched only when it changes, not entered as peft's disable_adapter() context at
        every step: that context walks every module twice, ~8 ms, 6% of a decode step.
        """
        if self._peft is None or self._peft_mode == adapter:
            return
        if adapter is None:  # (peft cannot disable with no adapter loaded; with none, LoRA layers do nothing)
            if self.adapters:
                self._peft.base_model.disable_adapter_layers()
        else:
            self._peft.base_model.enable_adapter_layers()
            self._peft.set_adapter(adapter)
        self._peft_mode = adapter

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
                if not self.adapters:  # peft still names the last unloaded adapter active: base calls would fail
                    self._peft.set_adapter(name)
        except Exception as exc:
            raise AdapterError(f"could not load adapter {name!r} from {path}: {exc}") from exc
        self._peft.eval()
        self._peft_mode = _UNKNOWN  # the load may have switched layers on
        self.adapters[name] = path
        self._used_names.add(name)
        logger.info("loaded adapter %s from %s", name, path)

    def _unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            raise AdapterError(f"adapter {name!r} is not loaded (loaded: {loaded})")
        self._peft.delete_adapter(name)
        self._peft_mode = _UNKNOWN
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
    if isinstance(exc, (BtRayError, RequestError)):
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
