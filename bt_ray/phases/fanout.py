"""Run many (program, example) jobs at once, each with its own DSPy trace.

This is how every phase talks to the pool: all jobs are in flight together
(bounded by `max_inflight`), each one a thread blocked on a replica's answer,
so the replicas see many concurrent requests and batch them. A program or metric
that raises on an example is recorded on that example (counted, reported);
a failure of the inference pool itself (EngineError, AdapterError) stops the
fan-out and is raised, naming the replica and the request. A metric that raises
on every prediction it is given is a bug, not a score of 0: MetricError.
"""

from __future__ import annotations

import logging
import sys
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import dspy
import tqdm

from bt_ray.errors import BtRayError, MetricError

logger = logging.getLogger(__name__)


@dataclass
class Job:
    program: Any  # a dspy.Module bound to a model version (set_lm)
    example: Any  # a dspy.Example with inputs set
    tag: Any = None  # caller's bookkeeping, e.g. (candidate, example index)


@dataclass
class Outcome:
    job: Job
    prediction: Any = None
    trace: list = field(default_factory=list)
    score: float = 0.0
    error: str | None = None  # the program or metric raised on this example
    traceback: str | None = None  # its traceback, for provide_traceback

    @property
    def ok(self) -> bool:
        return self.error is None


def run_jobs(jobs: list[Job], metric: Callable | None, *, adapter: Any, max_inflight: int,
             desc: str = "running") -> list[Outcome]:
    """Run every job concurrently; outcomes come back in job order."""
    position = {id(job): i for i, job in enumerate(jobs)}
    outcomes = run_stream(jobs, lambda outcome: [], metric, adapter=adapter, max_inflight=max_inflight, desc=desc)
    return sorted(outcomes, key=lambda outcome: position[id(outcome.job)])


def run_stream(jobs: list[Job], follow: Callable[[Outcome], list[Job]], metric: Callable | None, *, adapter: Any,
               max_inflight: int, desc: str = "running") -> list[Outcome]:
    """Run `jobs` concurrently; as each one ends, `follow(outcome)` (called in this thread) returns the jobs
    it leads to, which start at once: no job waits for unrelated slower ones. Outcomes in the order they end."""
    outcomes: list[Outcome] = []
    bar = tqdm.tqdm(total=len(jobs), desc=desc, file=sys.stderr, disable=None, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=max(1, max_inflight), thread_name_prefix="bt-fanout")
    try:
        pending = {pool.submit(_run_one, job, metric, adapter) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                outcomes.append(future.result())  # a pool failure raises here; the rest are cancelled below
                bar.update()
                more = follow(outcomes[-1])
                if more:
                    bar.total += len(more)
                    bar.refresh()
                    pending |= {pool.submit(_run_one, job, metric, adapter) for job in more}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    _check_metric(outcomes, desc)
    failed = [o.error for o in outcomes if not o.ok]
    if failed:
        first = failed[0].splitlines()[0][:160]
        logger.info("%s: %d of %d examples raised and score 0 (first: %s)", desc, len(failed), len(outcomes), first)
    return outcomes


def _check_metric(outcomes: list[Outcome], desc: str) -> None:
    scored = [o for o in outcomes if o.prediction is not None]
    raised = [o.error for o in scored if o.error and o.error.startswith("metric:")]
    if scored and len(raised) == len(scored):
        raise MetricError(f"{desc}: the task's metric raised on all {len(scored)} predictions it was given, e.g. "
                          f"{raised[0].removeprefix('metric: ')}. Fix the metric: bt-ray calls it as "
                          f"metric(example, prediction, trace) with a dspy.Example and a dspy.Prediction.")


def _run_one(job: Job, metric: Callable | None, adapter: Any) -> Outcome:
    with dspy.context(trace=[], adapter=adapter):
        try:
            prediction = job.program(**job.example.inputs())
        except Exception as exc:
            _reraise_infrastructure(exc)
            return Outcome(job, trace=list(dspy.settings.trace), error=f"program: {type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc())
        trace = list(dspy.settings.trace)
    try:
        score = float(metric(job.example, prediction, trace)) if metric else 1.0
    except Exception as exc:
        _reraise_infrastructure(exc)
        return Outcome(job, prediction, trace, error=f"metric: {type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc())
    return Outcome(job, prediction, trace, score)


def _reraise_infrastructure(exc: BaseException) -> None:
    """Pool failures are not the program's fault: find them in the cause chain and raise them."""
    seen = exc
    while seen is not None:
        if isinstance(seen, BtRayError):
            raise seen
        seen = seen.__cause__ or seen.__context__
