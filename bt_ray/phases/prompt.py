"""Π: prompt optimization with BootstrapFewShotWithRandomSearch semantics, fanned out.

Same candidates as DSPy 3.4.1's BootstrapFewShotWithRandomSearch (seeds -3..N-4):
  -3 zero-shot, -2 labeled demos only, -1 unshuffled bootstrap, >= 0 shuffled
  train order with a random number (1..max_bootstrapped_demos) of bootstrapped demos.
Each bootstrap follows BootstrapFewShot: a teacher with labeled demos runs the
train examples in order (the example itself removed from its demos) and the first
`size` examples whose trace passes the metric give the demos; unused examples
fill the labeled demos. The best candidate on the validation subsample wins,
earlier seeds winning ties.

What differs from DSPy is only *how* it runs: the bootstraps of all seeds run
concurrently, each in waves of its own, and every candidate is scored on the
validation examples as soon as it has its demos, all in one fan-out, instead of one
example and one candidate after another. Outcomes are the same because a given
(teacher, example) request gets the same answer.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import dspy
from dspy.utils.hasher import Hasher

from bt_ray.config import PromptConfig
from bt_ray.phases.fanout import Job, Outcome, run_stream

logger = logging.getLogger(__name__)

KIND = {-3: "zero-shot", -2: "labeled only", -1: "bootstrap, unshuffled"}


@dataclass
class Plan:
    """One BootstrapFewShot run: a seed, its train order, its demo budget and its outcome."""

    seed: int
    trainset: list
    size: int  # bootstrapped demos wanted
    teacher: Any = None
    next_index: int = 0
    results: dict[int, Outcome] = field(default_factory=dict)  # train index -> outcome
    passed: dict[int, bool] = field(default_factory=dict)  # train index -> trace passed the metric

    def wants_more(self) -> bool:
        return len(self.successes()) < self.size and self.next_index < len(self.trainset)

    def successes(self) -> list[int]:
        """Indices of passing examples, in train order, up to `size` (BootstrapFewShot stops there)."""
        found = []
        for i in range(len(self.trainset)):
            if i not in self.results:
                break
            if self.passed[i]:
                found.append(i)
                if len(found) == self.size:
                    break
        return found


@dataclass
class PromptResult:
    program: Any
    candidates: list[dict]  # {"seed", "kind", "score", "n", "demos"} in seed order
    best_seed: int
    bootstrap_calls: int
    train_size: int
    val_size: int


def optimize_prompts(program: Any, trainset: list, metric: Callable, *, lm: Any, adapter: Any,
                     config: PromptConfig, seed: int, max_inflight: int,
                     valset: list | None = None, teacher: Any = None) -> PromptResult:
    """Return the best of `config.num_candidates` few-shot programs, all bound to `lm`.

    Candidates are scored on a validation subsample of `trainset`, or on `valset` when one is given.
    `teacher` (a program of the same structure) bootstraps the demos instead of the student, as in
    BootstrapFewShot; its predictors without an LM run on `lm`.
    """
    train, val = _subsample(trainset, config, seed, valset)
    student = program.reset_copy()
    seeds = list(range(-3, config.num_candidates - 3))
    candidates = {-3: _bound(student.reset_copy(), lm)}
    if -2 in seeds:
        labeled = dspy.LabeledFewShot(k=config.max_labeled_demos).compile(student, trainset=train, sample=True)
        candidates[-2] = _bound(labeled, lm)
    # Candidates that need no bootstrap are scored from the start; each bootstrap runs in waves of its own,
    # and its candidate is scored as soon as it has its demos (no plan waits for another's stragglers).
    early = [Job(candidates[s], ex, tag=s) for s in candidates for ex in val]
    plans = [_plan(s, train, config, seed, student, lm, teacher) for s in seeds if s >= -1]

    def scoring(plan: Plan) -> list[Job]:
        candidates[plan.seed] = _bound(_assemble(student, plan, config), lm)
        return [Job(candidates[plan.seed], ex, tag=plan.seed) for ex in val]

    calls, outcomes = _bootstrap(plans, metric, config, adapter, max_inflight, early, scoring)
    table = []
    for s in seeds:
        scores = [o.score for o in outcomes if o.job.tag == s]
        demos = sum(len(p.demos) for p in candidates[s].predictors())
        table.append({"seed": s, "kind": KIND.get(s, "bootstrap, random"), "demos": demos,
                      "score": round(100.0 * sum(scores) / len(scores), 2), "n": len(scores)})
        logger.info("Π candidate seed %d (%s, %d demos): %.1f", s, table[-1]["kind"], demos, table[-1]["score"])
    best = max(table, key=lambda row: row["score"])  # max keeps the first (earlier seed) on ties
    return PromptResult(candidates[best["seed"]], table, best["seed"], calls, len(train), len(val))


def _subsample(trainset: list, config: PromptConfig, seed: int, valset: list | None = None) -> tuple[list, list]:
    if valset:
        shuffled = list(trainset)
        random.Random(seed).shuffle(shuffled)
        return shuffled[: config.train_size], list(valset)
    need = config.train_size + config.val_size
    if len(trainset) < need:
        raise ValueError(f"prompt.train_size + prompt.val_size = {need} but the train split has "
                         f"{len(trainset)} examples; lower them or enlarge task.train_size")
    shuffled = list(trainset)
    random.Random(seed).shuffle(shuffled)
    return shuffled[: config.train_size], shuffled[config.train_size: need]


def _plan(s: int, train: list, config: PromptConfig, run_seed: int, student: Any, lm: Any,
          teacher: Any = None) -> Plan:
    order = list(train)
    size = config.max_bootstrapped_demos
    if s >= 0:  # DSPy seeds its shuffle and size with the candidate seed; the run seed offsets it
        random.Random(s + 1000 * run_seed).shuffle(order)
        size = random.Random(s + 1000 * run_seed).randint(1, config.max_bootstrapped_demos)
    # BootstrapFewShot: the teacher (default: the student) gets labeled demos unless it is already compiled.
    # Unlike DSPy's reset_copy there, a teacher keeps its own LMs; its predictors without one run on `lm`.
    compiled = teacher is not None and getattr(teacher, "_compiled", False)
    own_lms = {name: p.lm for name, p in teacher.named_predictors()} if teacher is not None else {}
    teacher = teacher.deepcopy() if teacher is not None else student.reset_copy()
    if config.max_labeled_demos and not compiled:
        teacher = dspy.LabeledFewShot(k=config.max_labeled_demos).compile(teacher.reset_copy(), trainset=order)
    for name, predictor in teacher.named_predictors():
        predictor.lm = own_lms.get(name) or lm
    return Plan(s, order, size, teacher)


def _bootstrap(plans: list[Plan], metric: Callable, config: PromptConfig, adapter: Any, max_inflight: int,
               extra: list[Job], then: Callable[[Plan], list[Job]] | None = None) -> tuple[int, list[Outcome]]:
    """Run every plan's teacher over its train order, all plans at once, each in waves of its own until it has
    enough passing traces. `extra` jobs run from the start, and `then(plan)`'s jobs as soon as that plan is
    done. Returns the teacher calls made and the outcomes of the other jobs."""
    running: dict[int, int] = {}  # plan seed -> runs of its current wave not yet ended

    def next_jobs(plan: Plan) -> list[Job]:
        if plan.wants_more():
            jobs = _wave(plan)
            running[plan.seed] = len(jobs)
            return jobs
        return then(plan) if then else []

    def follow(outcome: Outcome) -> list[Job]:
        if not isinstance(outcome.job.tag, tuple):  # not a teacher run
            return []
        plan, i = outcome.job.tag
        plan.results[i] = outcome
        plan.passed[i] = outcome.ok and _passes(outcome.score, config.metric_threshold)
        running[plan.seed] -= 1
        return next_jobs(plan) if running[plan.seed] == 0 else []

    first = list(extra) + [job for plan in plans for job in next_jobs(plan)]
    outcomes = run_stream(first, follow, metric, adapter=adapter, max_inflight=max_inflight,
                          desc=f"Π: {len(plans)} bootstraps and candidate scoring")
    calls = sum(isinstance(o.job.tag, tuple) for o in outcomes)
    return calls, [o for o in outcomes if not isinstance(o.job.tag, tuple)]


def _wave(plan: Plan) -> list[Job]:
    """The plan's next train examples to run its teacher on: twice the demos it still lacks (at least 4)."""
    width = max(2 * (plan.size - len(plan.successes())), 4)
    stop = min(plan.next_index + width, len(plan.trainset))
    jobs = [Job(_without(plan.teacher, plan.trainset[i]), plan.trainset[i], tag=(plan, i))
            for i in range(plan.next_index, stop)]
    plan.next_index = stop
    return jobs


def _passes(score: float, threshold: float | None) -> bool:
    return score >= threshold if threshold is not None else bool(score)


def _without(teacher: Any, example: Any) -> Any:
    """A private copy of the teacher whose demos leave out `example` (BootstrapFewShot does this)."""
    copy = teacher.deepcopy()
    for (_, original), (_, pred) in zip(teacher.named_predictors(), copy.named_predictors()):
        pred.lm = original.lm
        pred.demos = [d for d in pred.demos if d != example]
    return copy


def _assemble(student: Any, plan: Plan, config: PromptConfig) -> Any:
    """BootstrapFewShot._train: bootstrapped demos first, then labeled ones from unused examples."""
    used = plan.successes()
    name2traces: dict[str, list] = {name: [] for name, _ in student.named_predictors()}
    for i in used:
        outcome = plan.results[i]
        names = {id(pred): name for name, pred in outcome.job.program.named_predictors()}
        found: dict[str, list] = {}
        for predictor, inputs, outputs in outcome.trace:
            name = names.get(id(predictor))  # by identity, never by position in the trace
            if name is not None:
                found.setdefault(name, []).append(dspy.Example(augmented=True, **inputs, **outputs))
        for name, demos in found.items():
            if len(demos) > 1:  # one call of a looped predictor per example, as DSPy picks it
                rng = random.Random(Hasher.hash(tuple(demos)))
                demos = [rng.choice(demos[:-1]) if rng.random() < 0.5 else demos[-1]]
            name2traces[name].extend(demos)
    unused = [x for i, x in enumerate(plan.trainset) if i not in set(used)]
    random.Random(0).shuffle(unused)
    program = student.reset_copy()
    rng = random.Random(0)
    for name, predictor in program.named_predictors():
        augmented = name2traces[name][: plan.size]
        take = max(0, min(config.max_labeled_demos - len(augmented), len(unused)))
        predictor.demos = augmented + rng.sample(unused, take)
    return program


def _bound(program: Any, lm: Any) -> Any:
    program.set_lm(lm)
    return program
