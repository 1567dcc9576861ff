"""Score a program on a split: every example in flight at once through the pool."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from bt_ray.phases.fanout import Job, run_jobs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    score: float  # mean metric over all examples, in percent; an example that raised counts 0
    n: int
    errors: int  # examples where the program or metric raised

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "n": self.n, "errors": self.errors}


def evaluate(program: Any, examples: list, metric: Callable, *, adapter: Any, max_inflight: int,
             desc: str = "evaluating", provide_traceback: bool = False) -> EvalResult:
    outcomes = run_jobs([Job(program, ex) for ex in examples], metric, adapter=adapter,
                        max_inflight=max_inflight, desc=desc)
    if provide_traceback:
        for i, outcome in enumerate(outcomes):
            if not outcome.ok:
                logger.warning("%s: example %d raised:\n%s", desc, i, outcome.traceback or outcome.error)
    return summarize([o.score for o in outcomes], sum(not o.ok for o in outcomes))


def summarize(scores: list[float], errors: int = 0) -> EvalResult:
    n = len(scores)
    return EvalResult(round(100.0 * sum(scores) / n, 2) if n else 0.0, n, errors)
