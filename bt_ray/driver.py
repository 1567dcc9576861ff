"""The phase loop: baseline, then each step of the strategy, a checkpoint after each.

    bt-ray run configs/iris.yaml strategy="p -> w -> p"
      step 0  zero-shot program, base model         -> dev score
      step 1  Π on the base model                   -> dev score, checkpoint
      step 2  Θ: traces -> LoRA v1 -> program on v1 -> dev score, checkpoint
      step 3  Π on v1 (bootstraps and scores with v1) -> dev score, checkpoint
      the returned program (the last step's, or the best on dev) -> test score, once

`PhaseLoop` is the loop itself; `Driver` (the CLI's `bt-ray run`) and
`bt_ray.BetterTogether.compile` (the Python API) both run on it. A step is a
`Step`: bt-ray's Π (`prompt_step`), Θ (`finetune_step`), or any DSPy
teleprompter (bt_ray.optimizers). Selection only ever sees dev (and Π's own
train/validation subsamples of the train split); test is scored once, at the
end, on the returned program.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bt_ray.config import PromptConfig, RunConfig, TrainConfig, to_dict
from bt_ray.costs import held
from bt_ray.errors import BtRayError, ConfigError
from bt_ray.model import check_model
from bt_ray.phases.evaluate import EvalResult, evaluate
from bt_ray.phases.finetune import finetune
from bt_ray.phases.prompt import optimize_prompts
from bt_ray.report import write_results
from bt_ray.session import Session
from bt_ray.state import RunState, StepRecord
from bt_ray.strategy import format_strategy, parse_strategy
from bt_ray.tasks import Splits, Task, task_for

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- steps


@dataclass
class StepContext:
    """What one step gets: the program so far, the model version it runs on, and where to write."""

    session: Any
    index: int
    code: str  # the step's key in the strategy: 'p', 'w', or a user's key such as 'mipro'
    program: Any  # bound to `version`
    version: str | None
    trainset: list
    step_dir: Path
    new_version: str  # the name a weight step gives its adapter: <run>-v<N>
    max_inflight: int


@dataclass
class StepOutput:
    program: Any
    version: str | None  # the model version `program` runs on after the step
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """One kind of step. A `weights` step makes a new adapter version."""

    run: Callable[[StepContext], StepOutput]
    weights: bool = False


def prompt_step(metric: Callable, config: PromptConfig, seed: int, valset: list | None = None,
                teacher: Any = None) -> Step:
    """bt-ray's Π: BootstrapFewShotWithRandomSearch, all bootstraps and candidates fanned out."""

    def run(ctx: StepContext) -> StepOutput:
        result = optimize_prompts(ctx.program, ctx.trainset, metric, lm=ctx.session.lm(ctx.version),
                                  adapter=ctx.session.adapter, config=config, seed=seed * 100 + ctx.index,
                                  max_inflight=ctx.max_inflight, valset=valset, teacher=teacher)
        return StepOutput(result.program, ctx.version, {
            "candidates": result.candidates, "best_seed": result.best_seed, "bootstrap_calls": result.bootstrap_calls,
            "train_size": result.train_size, "val_size": result.val_size})

    return Step(run)


def finetune_step(metric: Callable | None, config: TrainConfig, seed: int, teachers: list | None = None) -> Step:
    """bt-ray's Θ: traces of the current program (or teachers) -> LoRA on Ray Train -> a new adapter version."""

    def run(ctx: StepContext) -> StepOutput:
        result = finetune(ctx.program, ctx.trainset, metric, session=ctx.session, version=ctx.new_version,
                          adapter=ctx.session.adapter, config=config, out_dir=str(ctx.step_dir), seed=seed,
                          max_inflight=ctx.max_inflight, current_version=ctx.version, teachers=teachers)
        return StepOutput(result.program, ctx.new_version, {
            "adapter_dir": result.adapter_dir, "traces_run": result.traces_run, "traces_kept": result.traces_kept,
            "examples": result.examples, "per_predictor": result.per_predictor, "train": _train_summary(result.train)})

    return Step(run, weights=True)


# ---------------------------------------------------------------- the loop


class PhaseLoop:
    """Score the starting program, run each step, score it on dev, checkpoint it; resume skips finished steps.

    `dev=None` means no dev set: steps are not scored (their score is None), as in DSPy's BetterTogether
    without a validation set.
    """

    def __init__(self, session: Any, state: RunState, run_name: str, strategy: tuple[str, ...],
                 steps: dict[str, Step], *, build_program: Callable[[], Any], metric: Callable,
                 trainsets: list[list], dev: list | None, max_inflight: int, start_version: str | None = None,
                 max_errors: int | None = None, provide_traceback: bool = False):
        assert len(trainsets) == len(strategy)
        self.session, self.state, self.run_name = session, state, run_name
        self.strategy, self.steps = strategy, steps
        self.build_program, self.metric = build_program, metric
        self.trainsets, self.dev = trainsets, dev
        self.max_inflight, self.start_version = max_inflight, start_version
        self.max_errors, self.provide_traceback = max_errors, provide_traceback

    def run(self) -> dict[int, tuple[Any, str | None]]:
        """(program, version) of every step, 0 being the starting program; finished steps are restored."""
        done = self.state.finished(0)
        program, version = self.restore(done) if done else self._baseline()
        out = {0: (program, version)}
        for index, code in enumerate(self.strategy, start=1):
            done = self.state.finished(index)
            if done is not None:
                program, version = self.restore(done)
                logger.info("step %d (%s) already finished: dev %s, skipped", index, done.strategy,
                            _score_text(done.dev.get("score")))
            else:
                program, version = self._step(index, code, program, version)
            out[index] = (program, version)
        return out

    def _baseline(self) -> tuple[Any, str | None]:
        program = self.build_program()
        program.set_lm(self.session.lm(self.start_version))
        started, usage = time.time(), self.session.pool.usage_snapshot()
        return self._record(0, "vanilla", program, self.start_version, started, usage, {})

    def _step(self, index: int, code: str, program: Any, version: str | None) -> tuple[Any, str | None]:
        strategy = format_strategy(self.strategy[:index])
        self.state.event("start", step=index, strategy=strategy, version=version)
        started, usage = time.time(), self.session.pool.usage_snapshot()
        weights = sum(self.steps[c].weights for c in self.strategy[:index])
        ctx = StepContext(self.session, index, code, program, version, self.trainsets[index - 1],
                          self.state.step_dir(index, code), f"{self.run_name}-v{weights}", self.max_inflight)
        try:
            out = self.steps[code].run(ctx)
            return self._record(index, code, out.program, out.version, started, usage, out.details)
        except Exception as exc:
            self.state.event("failed", step=index, strategy=strategy, error=f"{type(exc).__name__}: {exc}")
            raise

    def _record(self, index: int, code: str, program: Any, version: str | None, started: float, usage: Any,
                details: dict) -> tuple[Any, str | None]:
        strategy = format_strategy(self.strategy[:index])
        dev = self._score_dev(program, f"dev: step {index} ({strategy})")
        path = self.state.step_dir(index, code) / "program.json"
        _save_program(program, path)
        spent = self.session.pool.usage_snapshot().since(usage)
        record = StepRecord(index=index, code=code, strategy=strategy, version=version, program_path=str(path),
                            adapter_dir=details.get("adapter_dir"), dev=dev,
                            wall_s=round(time.time() - started, 2), usage=vars(spent),
                            trained_tokens=details.get("train", {}).get("trained_tokens", 0), details=details,
                            resources=held(to_dict(self.session.config)))
        self.state.add(record)
        self.state.event("done", step=index, strategy=strategy, dev=dev["score"], wall_s=record.wall_s)
        logger.info("step %d (%s): dev %s (%d examples, %d errors) in %.0fs", index, strategy,
                    _score_text(dev["score"]), dev["n"], dev["errors"], record.wall_s)
        return program, version

    def _score_dev(self, program: Any, desc: str) -> dict[str, Any]:
        if not self.dev:
            return {"score": None, "n": 0, "errors": 0}
        result = self.evaluate(program, self.dev, desc)
        if self.max_errors is not None and result.errors and result.errors >= self.max_errors:
            raise BtRayError(f"{desc}: {result.errors} of {result.n} examples raised, max_errors={self.max_errors} "
                             f"(DSPy's Evaluate stops at that many); raise max_errors or pass None to count "
                             f"them as score 0")
        return result.to_dict()

    def evaluate(self, program: Any, examples: list, desc: str) -> EvalResult:
        return evaluate(program, examples, self.metric, adapter=self.session.adapter,
                        max_inflight=self.max_inflight, desc=desc, provide_traceback=self.provide_traceback)

    def restore(self, record: StepRecord) -> tuple[Any, str | None]:
        """The program of a finished step, bound to its model version (loading the adapter if needed)."""
        pool = self.session.pool
        if record.version is not None and record.version not in pool.adapters:
            pool.load_adapter(record.version, record.adapter_dir or self._adapter_of(record.version))
        program = self.build_program()
        program.load(record.program_path)
        program.set_lm(self.session.lm(record.version))
        return program, record.version

    def _adapter_of(self, version: str) -> str:
        found = next((s.adapter_dir for s in self.state.steps if s.version == version and s.adapter_dir), None)
        if found is None:
            raise ConfigError(f"model version {version!r} is not loaded in the pool and no finished step of "
                              f"{self.state.run_dir} made it; start from the base model or load it first")
        return found


# ---------------------------------------------------------------- bt-ray run


def preflight(config: RunConfig, task: Task) -> Splits:
    """Everything that can be checked before Ray starts or a model loads."""
    problems = []
    model_problem = check_model(config.model.name, config.model.cache_dir)
    if model_problem:
        problems.append(model_problem)
    try:
        splits = task.load_splits(config.task, config.seed)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"task {task.name!r}: {exc}") from None
    steps = parse_strategy(config.strategy)
    _check_splits(splits, config, steps)
    if splits.offline:
        logger.warning("data: OFFLINE stand-in, not the paper's data: %s", splits.source)
    need = config.prompt.train_size + config.prompt.val_size
    if "p" in steps and len(splits.train) < need and splits.offline and len(splits.train) >= 2:
        _fit_prompt_sizes(config, len(splits.train))
    elif "p" in steps and len(splits.train) < need:
        problems.append(f"prompt.train_size + prompt.val_size = {need} but the {task.name} train split has "
                        f"{len(splits.train)} examples; lower them (the paper uses 15 + 35 for Iris)")
    if problems:
        raise ConfigError(problems)
    _try_metric(task, splits)
    return splits


def _check_splits(splits: Any, config: RunConfig, steps: tuple[str, ...]) -> None:
    """What the task's data function returned: a Splits whose parts the run needs are not empty."""
    source = f"task.data={config.task.data}" if config.task.data else f"task {config.task.name!r}"
    if not isinstance(splits, Splits):
        raise ConfigError(f"{source} returned a {type(splits).__name__}; return bt_ray.tasks.Splits(train=[...], "
                          f"dev=[...], test=[...], source='where the data came from')")
    needed = {"dev": "every step is scored on it", "test": "the returned program is scored on it",
              **({"train": "Π and Θ learn from it"} if steps else {})}
    empty = [f"the {part} split is empty ({why})" for part, why in needed.items() if not getattr(splits, part)]
    if empty:
        raise ConfigError([f"{source}: {problem}" for problem in empty])


def _try_metric(task: Task, splits: Splits) -> None:
    """Score one gold answer against itself: a metric that raises here will likely raise on the model's too."""
    import dspy

    example = splits.train[0]
    try:
        task.metric(example, dspy.Prediction(**example.labels()), None)
    except Exception as exc:
        logger.warning("task %r: its metric raised on a gold answer scored against itself (%s: %s); if it "
                       "raises on every prediction the run stops with MetricError", task.name,
                       type(exc).__name__, exc)


def _fit_prompt_sizes(config: RunConfig, available: int) -> None:
    """Offline stand-in data is smaller than the paper's: Π's subsamples shrink to fit, in the same ratio."""
    pr = config.prompt
    train = max(1, round(available * pr.train_size / (pr.train_size + pr.val_size)))
    val = max(1, available - train)
    logger.warning("offline data: the train split has %d examples, fewer than prompt.train_size + "
                   "prompt.val_size = %d + %d; Π uses %d + %d instead (download the real data for the paper's "
                   "sizes)", available, pr.train_size, pr.val_size, train, val)
    pr.train_size, pr.val_size = train, val


class Driver:
    """`bt-ray run`: a config's task and strategy on the phase loop, then the test score and the results."""

    def __init__(self, config: RunConfig, resume: bool = False):
        self.config = config
        self.steps = parse_strategy(config.strategy)
        self.task = task_for(config.task)
        self.splits = preflight(config, self.task)
        self.state = RunState.open(config.run_dir, config, resume, self.steps, self.splits.fingerprint())

    def run(self, session: Any = None) -> dict[str, Any]:
        """Run (or resume) every step. `session` defaults to a new Session (Ray + pool) for this run."""
        cfg = self.config
        logger.info("run %s: %s on %s (%s), seed %d -> %s", cfg.run_name, format_strategy(self.steps, "paper"),
                    self.task.name, self.splits.source, cfg.seed, cfg.run_dir)
        session = session or Session(cfg, cfg.run_name, cache_dir=cfg.run_dir / "cache")
        with session:
            self.session = session
            steps = {"p": prompt_step(self.task.metric, cfg.prompt, cfg.seed),
                     "w": finetune_step(self.task.metric, cfg.train, cfg.seed)}
            loop = PhaseLoop(session, self.state, cfg.run_name, self.steps, steps,
                             build_program=lambda: self.task.program(cfg.task), metric=self.task.metric,
                             trainsets=[self.splits.train] * len(self.steps), dev=self.splits.dev,
                             max_inflight=cfg.inference.max_inflight)
            loop.run()
            returned = self._returned_step()
            program, _ = loop.restore(returned)
            started, usage = time.time(), session.pool.usage_snapshot()
            test = loop.evaluate(program, self.splits.test, f"test: step {returned.index} ({returned.strategy})")
            spent = session.pool.usage_snapshot().since(usage)
            self.state.test = {"step": returned.index, "strategy": returned.strategy, **test.to_dict(),
                               "wall_s": round(time.time() - started, 2), "requests": spent.requests,
                               "generated_tokens": spent.generated_tokens}
            self.state.save()
            self.state.event("test", **self.state.test)
        results = write_results(self.config, self.state, self.splits)
        self.state.sync()  # results to a URI output_dir
        return results

    def _returned_step(self) -> StepRecord:
        return returned_step(self.state.steps[: len(self.steps) + 1], self.config.returned)


def returned_step(records: list[StepRecord], returned: str) -> StepRecord:
    """The last step (the paper), or the best on dev with the earlier step winning ties (DSPy's BetterTogether)."""
    if returned == "final":
        return records[-1]
    return max(records, key=lambda s: (_sortable(s.dev.get("score")), -s.index))


def _sortable(score: float | None) -> float:
    return float("-inf") if score is None else score


def _score_text(score: float | None) -> str:
    return "not scored (no dev set)" if score is None else f"{score:.1f}"


def _save_program(program: Any, path: Path) -> None:
    """Prompts and demos only: the model version is recorded beside it, not inside."""
    copy = program.deepcopy()
    for predictor in copy.predictors():
        predictor.lm = None
    copy.save(str(path))


def _train_summary(train: Any) -> dict[str, Any]:
    return {"trained_tokens": train.trained_tokens, "total_tokens": train.total_tokens, "steps": train.steps,
            "examples": train.examples, "dropped": train.dropped, "wall_s": round(train.wall_s, 2),
            "workers": train.workers, "first_loss": train.losses[0] if train.losses else None,
            "last_loss": train.losses[-1] if train.losses else None}
