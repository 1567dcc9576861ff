"""EngineSteps: what vLLM's engine did step by step, as counters (inference.vllm.step_stats).

A vLLM stat logger (the methods of vLLM's StatLoggerBase, duck-typed: no vLLM import here). vLLM's
frontend calls `record` once per engine step it hears from, with the scheduler's view of that step
(requests running and waiting) and what the step produced (generated tokens, prompt tokens of requests
whose prefill finished). Throughput = generated tokens per step / seconds per step, so two runs that
differ in tokens/s differ in one of those: fewer requests running per step (requests arrive late: the
path to the engine) or longer steps (e.g. more steps that mix prefill with decoding).

With vLLM's cudagraph_metrics on (engine_kwargs turns it on with step_stats), each step also says how it
ran: as one full CUDA graph (decode-only steps), as piecewise graphs, or without graphs (more tokens than
the largest captured size, inference.vllm.max_cudagraph_capture_size), and how many tokens it computed.
Only vLLM's V1 model runner reports this: the V2 runner, vLLM 0.26's default for Llama-family models
("Using V2 Model Runner" in its log), sends no cudagraph stats, and step_summary then leaves them out.
"""

from __future__ import annotations

import time
from typing import Any


GRAPH_MODES = {"FULL": "full", "PIECEWISE": "piecewise", "NONE": "eager"}  # vLLM's CUDAGraphStat.runtime_mode


class EngineSteps:
    def __init__(self) -> None:
        self.steps = 0
        self.running = 0  # summed over steps: requests running after each step
        self.waiting = 0  # summed over steps: requests queued in vLLM after each step
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.prefill_steps = 0  # steps in which some request's prefill finished
        self.busy_s = 0.0  # time from a step with requests running to the next step
        self.busy_steps = 0  # the steps busy_s spans
        self.graph_steps = dict.fromkeys(GRAPH_MODES.values(), 0)  # steps by how they ran (vLLM's cudagraph_metrics)
        self.step_tokens = 0  # tokens computed, summed over the steps in graph_steps
        self._last: tuple[float, int] | None = None  # (when, requests running) of the step before

    def __call__(self, vllm_config: Any, engine_index: int = 0) -> "EngineSteps":
        """vLLM's StatLoggerFactory: AsyncLLM(stat_loggers=[steps]) logs into this instance."""
        return self

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        now = time.perf_counter()
        if iteration_stats is not None:
            self.generated_tokens += iteration_stats.num_generation_tokens
            prompt = iteration_stats.num_prompt_tokens
            self.prompt_tokens += prompt
            self.prefill_steps += prompt > 0
        if scheduler_stats is None:
            return
        self.steps += 1
        self.running += scheduler_stats.num_running_reqs
        self.waiting += scheduler_stats.num_waiting_reqs
        graph = getattr(scheduler_stats, "cudagraph_stats", None)
        if graph is not None:
            self.graph_steps[GRAPH_MODES.get(str(graph.runtime_mode), "eager")] += 1
            self.step_tokens += graph.num_unpadded_tokens
        if self._last is not None and self._last[1] > 0:
            self.busy_s += now - self._last[0]
            self.busy_steps += 1
        self._last = (now, scheduler_stats.num_running_reqs)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def pause(self) -> None:
        """The engine stops stepping (VLLMEngine.sleep; vLLM's adapter around this logger does not pass on
        its sleep state): the time until its next step is not a step's time."""
        self._last = None

    def snapshot(self) -> dict[str, float]:
        return {"steps": self.steps, "running": self.running, "waiting": self.waiting,
                "generated_tokens": self.generated_tokens, "prompt_tokens": self.prompt_tokens,
                "prefill_steps": self.prefill_steps, "busy_s": self.busy_s, "busy_steps": self.busy_steps,
                **{f"{mode}_steps": n for mode, n in self.graph_steps.items()}, "step_tokens": self.step_tokens}


def step_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per step, between two snapshots: requests running and waiting, generated tokens, ms, and the share of
    steps that finished some prefill; where vLLM said how steps ran, the share run as a full CUDA graph, as
    piecewise graphs and without graphs (`graphs`), and the tokens each computed (`step_tokens`)."""
    diff = {key: after[key] - before[key] for key in after}
    steps = diff["steps"] or 1
    graphed = sum(diff[f"{mode}_steps"] for mode in GRAPH_MODES.values())
    graphs = {} if not graphed else {
        "graphs": {mode: round(diff[f"{mode}_steps"] / graphed, 3) for mode in GRAPH_MODES.values()},
        "step_tokens": round(diff["step_tokens"] / graphed, 1)}
    return {"steps": int(diff["steps"]), "running": round(diff["running"] / steps, 2),
            "waiting": round(diff["waiting"] / steps, 2),
            "tokens_per_step": round(diff["generated_tokens"] / steps, 2),
            "step_ms": round(1000 * diff["busy_s"] / (diff["busy_steps"] or 1), 3),
            "prefill_share": round(diff["prefill_steps"] / steps, 3), **graphs}
