"""VLLMEngine: the engine protocol on vLLM's AsyncLLM. The only module that imports vLLM.

Written against vLLM 0.26 (pyproject's `gpu` extra). vLLM is imported when an engine is
built, never at import time, so CPU machines run bt-ray without it. What bt-ray sends to
vLLM is computed by the pure functions of `vllm_args.py`.

- Prompts are rendered by bt-ray (`chat.prompt_ids`, the same tokens the trainer uses), in small
  chunks off the event loop (`PromptRenderer`), and passed as token ids; vLLM's automatic prefix caching
  reuses the shared instructions + demos.
- Every adapter version is added under a new name and a new integer id (`AdapterIds`), on
  top of the base model, which keeps serving: `add_lora` does not pause other requests.
- With inference.vllm.step_stats, an `EngineSteps` stat logger counts the engine's steps (health's
  `engine_steps`: requests running per step, time per step, CUDA graph mode per step).
- sleep/wake use vLLM's sleep mode (placement timeshare): level 1 moves the weights (and the
  LoRA slots) to CPU memory and drops the KV cache. Level 2 is refused: in vLLM 0.26 it breaks
  with LoRA enabled (vLLM issue #39934, see `VLLMEngine.__init__`).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import time
from typing import Any

from bt_ray.config import InferenceConfig
from bt_ray.errors import AdapterError, EngineError, RequestError
from bt_ray.inference.engine import GenerationRequest, GenerationResult
from bt_ray.inference.engine_steps import EngineSteps
from bt_ray.inference.renderer import PromptRenderer
from bt_ray.inference.vllm_args import AdapterIds, check_adapter_fits, engine_kwargs, sampling_kwargs

logger = logging.getLogger(__name__)


def engine_env() -> None:
    """Set before vLLM starts its engine process (which inherits the environment):
    - without FlashInfer installed (the offline wheel set), vLLM's default sampler setting imports it
      and fails; with it (a pip-installed vLLM), vLLM's default stays;
    - spawn, not fork, for the engine process: this process may hold a Ray driver or a CUDA
      context (vLLM forces spawn itself only inside Ray actors or after CUDA init)."""
    if importlib.util.find_spec("flashinfer") is None:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


class _VLLM:
    """The vLLM names bt-ray uses, imported together (and only here)."""

    def __init__(self) -> None:
        engine_env()
        try:
            import vllm
            from vllm import AsyncEngineArgs, SamplingParams
            from vllm.lora.request import LoRARequest
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineError(f"inference.engine=vllm needs vLLM on the replica's node ({exc}); install bt-ray's "
                              "`gpu` extra (vllm==0.26.0) or, offline, the wheel set (scripts/gpu_check.sh)") from exc
        self.version = vllm.__version__
        self.AsyncEngineArgs, self.SamplingParams, self.LoRARequest = AsyncEngineArgs, SamplingParams, LoRARequest
        self.AsyncLLM, self.FINAL_ONLY = AsyncLLM, RequestOutputKind.FINAL_ONLY


class VLLMEngine:
    def __init__(self, model_dir: str, config: InferenceConfig, dtype: str = "auto"):
        from transformers import AutoTokenizer

        if config.vllm.sleep_level == 2:
            # vLLM 0.26 with LoRA: reload_weights() fails on the LoRA-wrapped layers (their weights sit
            # under `base_layer`), and level 2 also discards the LoRA slots (vLLM issue #39934).
            raise EngineError("inference.vllm.sleep_level=2 does not work with LoRA adapters in vLLM 0.26 "
                              "(vLLM issue #39934); set inference.vllm.sleep_level=1")
        self._vllm = vllm = _VLLM()
        self.config = config
        self.kwargs = engine_kwargs(config, model_dir, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.kwargs["tokenizer"])
        self.renderer = PromptRenderer(self.tokenizer)
        self.steps = EngineSteps() if config.vllm.step_stats else None
        self.llm = vllm.AsyncLLM.from_engine_args(vllm.AsyncEngineArgs(**self.kwargs),
                                                  stat_loggers=None if self.steps is None else [self.steps])
        self.ids = AdapterIds()
        self.paths: dict[str, str] = {}
        self.asleep = False
        self.served = 0
        self.render_s = 0.0  # summed over requests: waiting for the prompt's ids
        self._request_ids = itertools.count()
        logger.info("vLLM %s engine: %s (tp=%d, max_lora_rank=%d, max_loras=%d)", vllm.version, model_dir,
                    config.vllm.tensor_parallel_size, config.vllm.max_lora_rank, config.vllm.max_loras)

    # ------------------------------------------------------------ engine protocol

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.asleep:
            raise EngineError("the vLLM engine is asleep; call wake() before generate()")
        lora = self._lora_request(request.adapter)
        start = time.perf_counter()
        ids = await self.renderer.ids(request.messages)
        self.render_s += time.perf_counter() - start
        params = self._vllm.SamplingParams(**sampling_kwargs(request.sampling), output_kind=self._vllm.FINAL_ONLY)
        request_id = f"{request.request_id or 'req'}-{next(self._request_ids)}"
        final = None
        try:
            async for output in self.llm.generate({"prompt_token_ids": ids}, params, request_id, lora_request=lora):
                final = output
        except ValueError as exc:  # vLLM's input checks (a prompt longer than max_model_len): this request only
            raise RequestError(f"vLLM refused request {request_id} ({len(ids)} prompt tokens): {exc}") from exc
        if final is None or not final.outputs:
            raise EngineError(f"vLLM returned no output for request {request_id}")
        completion = final.outputs[0]
        if completion.finish_reason in ("abort", "error"):  # e.g. aborted by sleep() while in flight
            raise EngineError(f"vLLM ended request {request_id} with finish_reason={completion.finish_reason!r}")
        self.served += 1
        return GenerationResult(
            request_id=request.request_id, text=completion.text, prompt_tokens=len(ids),
            completion_tokens=len(completion.token_ids),
            finish_reason="length" if completion.finish_reason == "length" else "stop",
            adapter=request.adapter, cached_prompt_tokens=final.num_cached_tokens or 0)

    async def load_adapter(self, name: str, path: str) -> None:
        check_adapter_fits(path, self.config.vllm.max_lora_rank)
        lora_id = self.ids.assign(name)
        request = self._vllm.LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))
        try:
            added = await self.llm.add_lora(request)
        except Exception as exc:
            self.ids.forget_failed(name)
            raise AdapterError(f"vLLM could not load adapter {name!r} from {path}: {type(exc).__name__}: {exc}") from exc
        if not added:
            self.ids.forget_failed(name)
            raise AdapterError(f"vLLM refused adapter {name!r} from {path} (add_lora returned False)")
        self.paths[name] = str(path)
        logger.info("adapter %s loaded as LoRA id %d from %s", name, lora_id, path)

    async def unload_adapter(self, name: str) -> None:
        lora_id = self.ids.drop(name)
        self.paths.pop(name, None)
        await self.llm.remove_lora(lora_id)

    async def sleep(self) -> None:
        level = self.config.vllm.sleep_level
        if level == 0:
            raise EngineError("this vLLM engine was started without sleep mode; set inference.vllm.sleep_level=1 "
                              "to let replicas free their GPU during training")
        await self.llm.sleep(level)  # vLLM aborts requests still in flight and clears its prefix cache
        self.asleep = True
        if self.steps is not None:
            self.steps.pause()

    async def wake(self) -> None:
        if not self.asleep:
            return
        await self.llm.wake_up()  # weights (and LoRA slots) back from CPU memory, a fresh KV cache
        await self.llm.reset_prefix_cache()
        self.asleep = False

    async def health(self) -> dict[str, Any]:
        return {"engine": "vllm", "version": self._vllm.version, "adapters": sorted(self.ids.ids),
                "lora_ids": dict(self.ids.ids), "asleep": self.asleep, "served": self.served,
                "render_s": self.render_s, **({} if self.steps is None else {"engine_steps": self.steps.snapshot()}),
                "tensor_parallel_size": self.kwargs["tensor_parallel_size"]}

    # ------------------------------------------------------------ beyond the protocol

    def shutdown(self) -> None:
        """Stop vLLM's engine process and free the GPU (tests and benchmarks start several engines)."""
        self.llm.shutdown()
        self.renderer.close()

    def _lora_request(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        if adapter not in self.ids.ids:
            loaded = ", ".join(sorted(self.ids.ids)) or "none"
            raise AdapterError(f"adapter {adapter!r} is not loaded on this engine (loaded: {loaded}); "
                               "load it with load_adapter() first")
        return self._vllm.LoRARequest(lora_name=adapter, lora_int_id=self.ids.ids[adapter],
                                                   lora_path=self.paths[adapter])
