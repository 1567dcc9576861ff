"""EngineSteps, the vLLM stat logger behind inference.vllm.step_stats, fed FAKE stats objects shaped like
vLLM 0.26's SchedulerStats and IterationStats (the fields it reads), one `record` per engine step as vLLM's
frontend calls it."""

from types import SimpleNamespace

import pytest

from bt_ray.inference import engine_steps
from bt_ray.inference.engine_steps import EngineSteps, step_summary


def step(steps, clock, now, running, waiting=0, tokens=0, prompt=0, iteration=True, graph=None):
    """`graph`: (runtime mode, tokens computed), vLLM's CUDAGraphStat with cudagraph_metrics on; else None."""
    clock.append(now)
    cudagraph = None if graph is None else SimpleNamespace(runtime_mode=graph[0], num_unpadded_tokens=graph[1],
                                                           num_padded_tokens=graph[1], num_paddings=0)
    steps.record(SimpleNamespace(num_running_reqs=running, num_waiting_reqs=waiting, cudagraph_stats=cudagraph),
                 SimpleNamespace(num_generation_tokens=tokens, num_prompt_tokens=prompt) if iteration else None)


@pytest.fixture
def clock(monkeypatch):
    times = []
    monkeypatch.setattr(engine_steps.time, "perf_counter", lambda: times[-1])
    return times


def test_counts_steps_running_requests_and_time_only_while_requests_run(clock):
    steps = EngineSteps()
    assert steps(None, 0) is steps  # vLLM's factory call gives back this instance
    before = steps.snapshot()
    step(steps, clock, 10.000, running=4, prompt=400)  # a prefill finished
    step(steps, clock, 10.010, running=4, tokens=4)
    step(steps, clock, 10.020, running=0, tokens=4)  # the batch finished: idle until the next request
    step(steps, clock, 15.000, running=2, waiting=1, prompt=200, tokens=2)
    step(steps, clock, 15.030, running=2, tokens=2)
    summary = step_summary(before, steps.snapshot())
    # 3 step intervals began with requests running: 10 + 10 + 30 ms; the 4.98 s idle gap is no step's time
    assert summary == {"steps": 5, "running": 2.4, "waiting": 0.2, "tokens_per_step": 2.4,
                       "step_ms": pytest.approx(50 / 3, abs=1e-3), "prefill_share": 0.4}


def test_a_pause_stops_the_step_clock_and_stats_without_a_step_count_none(clock):
    steps = EngineSteps()
    step(steps, clock, 1.0, running=3, tokens=3)
    steps.pause()  # the engine sleeps (placement timeshare) with requests still counted as running
    step(steps, clock, 100.0, running=3, tokens=3)
    step(steps, clock, 100.5, running=3, tokens=3, iteration=False)  # a step that finished nothing
    steps.record(None, SimpleNamespace(num_generation_tokens=1, num_prompt_tokens=0))  # outputs, no stats
    snap = steps.snapshot()
    assert snap["steps"] == 3 and snap["generated_tokens"] == 7 and snap["busy_s"] == pytest.approx(0.5)


def test_a_summary_of_no_steps_is_zeros_not_a_division_error():
    steps = EngineSteps()
    assert step_summary(steps.snapshot(), steps.snapshot()) == {  # and no `graphs`: vLLM said nothing of them
        "steps": 0, "running": 0.0, "waiting": 0.0, "tokens_per_step": 0.0, "step_ms": 0.0, "prefill_share": 0.0}


def test_with_cudagraph_metrics_steps_say_how_they_ran_and_how_many_tokens(clock):
    """vLLM's runtime modes as it prints them (str(CUDAGraphMode) is its name): FULL for decode-only steps,
    PIECEWISE for mixed steps within the captured sizes, NONE above them."""
    steps = EngineSteps()
    before = steps.snapshot()
    step(steps, clock, 1.00, running=64, prompt=700, graph=("NONE", 6400))  # a wave's prefill
    step(steps, clock, 1.02, running=64, tokens=64, graph=("FULL", 64))
    step(steps, clock, 1.03, running=64, tokens=64, graph=("FULL", 64))
    step(steps, clock, 1.04, running=64, tokens=63, prompt=700, graph=("PIECEWISE", 173))  # 63 decodes + 1 new
    step(steps, clock, 1.05, running=64, tokens=64)  # no graph stats: counted as a step, not by mode
    summary = step_summary(before, steps.snapshot())
    assert summary["steps"] == 5
    assert summary["graphs"] == {"full": 0.5, "piecewise": 0.25, "eager": 0.25}
    assert summary["step_tokens"] == pytest.approx((6400 + 64 + 64 + 173) / 4, abs=0.1)
