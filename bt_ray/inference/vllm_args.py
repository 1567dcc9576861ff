"""bt-ray config and requests -> vLLM arguments, as plain data (no vLLM import, unit-tested on CPU).

`vllm_compat.py` turns these dicts into vLLM objects; keeping the mapping here means a
CPU machine without vLLM can check every argument bt-ray sends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bt_ray.config import InferenceConfig
from bt_ray.errors import AdapterError
from bt_ray.inference.engine import SamplingParams


def engine_kwargs(config: InferenceConfig, model_dir: str, dtype: str = "auto") -> dict[str, Any]:
    """Keyword arguments of vllm.AsyncEngineArgs for one replica."""
    v = config.vllm
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": "bfloat16" if dtype == "auto" else dtype,  # model.dtype: auto = bf16 on GPU
        "enable_lora": True,
        "max_lora_rank": v.max_lora_rank,
        "max_loras": v.max_loras,
        # Adapters kept in CPU memory beyond max_loras: every version a run may go back to
        # (Π after Θ can evaluate an older step) stays loaded without re-reading files.
        "max_cpu_loras": max(v.max_loras, 8),
        "max_num_seqs": config.max_batch_size,
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "enable_prefix_caching": True,  # the shared instructions + demos of a candidate are computed once
        "enable_sleep_mode": v.sleep_level > 0,
        "load_format": v.load_format,
        "enforce_eager": v.enforce_eager,
        "disable_log_stats": True,
    }
    if v.max_model_len is not None:
        kwargs["max_model_len"] = v.max_model_len
    if v.step_stats:  # each step also says how it ran (CUDA graph mode, tokens): engine_steps.EngineSteps
        kwargs["cudagraph_metrics"] = True
    if v.max_cudagraph_capture_size is not None:
        kwargs["max_cudagraph_capture_size"] = v.max_cudagraph_capture_size
    if v.tensor_parallel_size > 1:
        # Worker processes on the GPUs Ray gave this actor; vLLM's own Ray executor would
        # try to place workers in the cluster a second time.
        kwargs["distributed_executor_backend"] = "mp"
    return kwargs


def sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for one bt-ray request.

    DSPy 3.4's request config (dspy.lm15.Config) has no `n`: each DSPy call is one completion,
    and repeated rollouts arrive as separate calls with their own seeds, so n is always 1.
    The stop strings (DSPy's completion marker among them) are cut from the text, as the
    transformers engine does.
    """
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "stop": list(sampling.stop),
        "include_stop_str_in_output": False,
    }
    if sampling.seed is not None:
        kwargs["seed"] = sampling.seed % (2**63)  # vLLM takes a signed 64-bit seed
    return kwargs


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest LoRA rank in a peft adapter directory (r, or the largest of rank_pattern)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} has no adapter_config.json; give a directory written by peft's "
                           "save_pretrained")
    try:
        config = json.loads(path.read_text())
        ranks = [int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{path}: cannot read the LoRA rank ({type(exc).__name__}: {exc})") from exc
    return max(ranks)


def check_adapter_fits(adapter_dir: str | Path, max_lora_rank: int) -> int:
    """Refuse, before vLLM sees it, an adapter whose rank exceeds the replicas' max_lora_rank."""
    rank = adapter_rank(adapter_dir)
    if rank > max_lora_rank:
        raise AdapterError(f"adapter {adapter_dir} has LoRA rank {rank} but the vLLM replicas were started with "
                           f"inference.vllm.max_lora_rank={max_lora_rank}; raise inference.vllm.max_lora_rank to "
                           f">= {rank} (one of 8, 16, 32, 64, 128, 256, 320, 512) or train with a smaller "
                           f"train.lora_rank")
    return rank


class AdapterIds:
    """Adapter version name -> vLLM's integer LoRA id; both are never reused.

    vLLM keys its caches (prefix cache, loaded LoRA slots) by id and name. A version that
    reused an old id or name could be answered from the old adapter's cache entries.
    """

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}  # loaded name -> id
        self._used: set[str] = set()
        self._next = 1  # vLLM reserves 0 for "no adapter"

    def assign(self, name: str) -> int:
        if name in self._used:
            raise AdapterError(f"adapter name {name!r} was already used on this replica; names are never reused "
                               "(vLLM caches keyed by name would serve stale outputs): load it under a new version")
        self._used.add(name)
        self.ids[name] = self._next
        self._next += 1
        return self.ids[name]

    def drop(self, name: str) -> int:
        if name not in self.ids:
            raise AdapterError(f"adapter {name!r} is not loaded (loaded: {', '.join(sorted(self.ids)) or 'none'})")
        return self.ids.pop(name)

    def forget_failed(self, name: str) -> None:
        """A load that failed keeps its name used (it may be half-registered) but not loaded."""
        self.ids.pop(name, None)
