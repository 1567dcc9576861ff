"""The phase loop: baseline, then each step of the strategy, a checkpoint after each.

    bt-ray run configs/iris.yaml strategy="p -> w -> p"
      step 0  zero-shot program, base model         -> dev score
      step 1  Π on the base model                   -> dev score, checkpoint
      step 2  Θ: traces -> LoRA v1 -> program on v1 -> dev score, checkpoint
      step 3  Π on v1 (bootstraps and scores with v1) -> dev score, checkpoint
      the returned program (the last step's, or the best on dev) -> test score, once

Selection only ever sees dev (and Π's own train/validation subsamples of the
train split); test is scored once, at the end, on the returned program.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from bt_ray.config import RunConfig
from bt_ray.errors import ConfigError
from bt_ray.model import check_model
from bt_ray.phases.evaluate import evaluate
from bt_ray.phases.finetune import finetune
from bt_ray.phases.prompt import optimize_prompts
from bt_ray.report import write_results
from bt_ray.session import Session
from bt_ray.state import RunState, StepRecord
from bt_ray.strategy import format_strategy, parse_strategy
from bt_ray.tasks import Splits, Task, task_for

logger = logging.getLogger(__name__)


def preflight(config: RunConfig, task: Task) -> Splits:
    """Everything that can be checked before Ray starts or a model loads."""
    problems = []
    model_problem = check_model(config.model.name)
    if model_problem:
        problems.append(model_problem)
    try:
        splits = task.load_splits(config.task, config.seed)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"task {task.name!r}: {exc}") from None
    if splits.offline:
        logger.warning("data: OFFLINE stand-in, not the paper's data: %s", splits.source)
    steps = parse_strategy(config.strategy)
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
    def __init__(self, config: RunConfig, resume: bool = False):
        self.config = config
        self.steps = parse_strategy(config.strategy)
        self.task = task_for(config.task)
        self.splits = preflight(config, self.task)
        self.state = RunState.open(config.run_dir, config, resume)
        self._check_resumable()

    def run(self, session: Any = None) -> dict[str, Any]:
        """Run (or resume) every step. `session` defaults to a new Session (Ray + pool) for this run."""
        cfg = self.config
        logger.info("run %s: %s on %s (%s), seed %d -> %s", cfg.run_name, format_strategy(self.steps, "paper"),
                    self.task.name, self.splits.source, cfg.seed, cfg.run_dir)
        session = session or Session(cfg, cfg.run_name, cache_dir=cfg.run_dir / "cache")
        with session:
            self.session = session
            program, version = self._baseline()
            for index, code in enumerate(self.steps, start=1):
                done = self.state.finished(index)
                if done is not None:
                    program, version = self._restore(done)
                    logger.info("step %d (%s) already finished: dev %.1f, skipped", index, done.strategy,
                                done.dev["score"])
                    continue
                program, version = self._step(index, code, program, version)
            returned = self._returned_step()
            program, _ = self._restore(returned)
            test = self._evaluate(program, self.splits.test, f"test: step {returned.index} ({returned.strategy})")
            self.state.test = {"step": returned.index, "strategy": returned.strategy, **test.to_dict()}
            self.state.save()
            self.state.event("test", **self.state.test)
        return write_results(self.config, self.state, self.splits)

    # ------------------------------------------------------------ steps

    def _baseline(self) -> tuple[Any, str | None]:
        done = self.state.finished(0)
        if done is not None:
            return self._restore(done)
        program = self.task.program(self.config.task)
        program.set_lm(self.session.lm(None))
        return self._record(0, "vanilla", program, None, time.time(), self.session.pool.usage_snapshot(), {})

    def _step(self, index: int, code: str, program: Any, version: str | None) -> tuple[Any, str | None]:
        cfg, session = self.config, self.session
        strategy = format_strategy(self.steps[:index])
        self.state.event("start", step=index, strategy=strategy, version=version)
        started, usage = time.time(), session.pool.usage_snapshot()
        max_inflight = cfg.inference.max_inflight
        try:
            if code == "p":
                result = optimize_prompts(program, self.splits.train, self.task.metric, lm=session.lm(version),
                                          adapter=session.adapter, config=cfg.prompt, seed=cfg.seed * 100 + index,
                                          max_inflight=max_inflight)
                program, details = result.program, {"candidates": result.candidates, "best_seed": result.best_seed,
                                                    "bootstrap_calls": result.bootstrap_calls,
                                                    "train_size": result.train_size, "val_size": result.val_size}
            else:
                new_version = f"{cfg.run_name}-v{self.steps[:index].count('w')}"
                result = finetune(program, self.splits.train, self.task.metric, session=session,
                                  version=new_version, adapter=session.adapter, config=cfg.train,
                                  out_dir=str(self.state.step_dir(index, code)), seed=cfg.seed,
                                  max_inflight=max_inflight, current_version=version)
                program, version = result.program, new_version
                details = {"adapter_dir": result.adapter_dir, "traces_run": result.traces_run,
                           "traces_kept": result.traces_kept, "examples": result.examples,
                           "per_predictor": result.per_predictor, "train": _train_summary(result.train)}
        except Exception as exc:
            self.state.event("failed", step=index, strategy=strategy, error=f"{type(exc).__name__}: {exc}")
            raise
        return self._record(index, code, program, version, started, usage, details)

    def _record(self, index: int, code: str, program: Any, version: str | None, started: float, usage: Any,
                details: dict) -> tuple[Any, str | None]:
        strategy = format_strategy(self.steps[:index])
        dev = self._evaluate(program, self.splits.dev, f"dev: step {index} ({strategy})")
        path = self.state.step_dir(index, code) / "program.json"
        _save_program(program, path)
        spent = self.session.pool.usage_snapshot().since(usage)
        record = StepRecord(index=index, code=code, strategy=strategy, version=version, program_path=str(path),
                            adapter_dir=details.get("adapter_dir"), dev=dev.to_dict(),
                            wall_s=round(time.time() - started, 2), usage=vars(spent),
                            trained_tokens=details.get("train", {}).get("trained_tokens", 0), details=details)
        self.state.add(record)
        self.state.event("done", step=index, strategy=strategy, dev=dev.score, wall_s=record.wall_s)
        logger.info("step %d (%s): dev %.1f (%d examples, %d errors) in %.0fs", index, strategy, dev.score, dev.n,
                    dev.errors, record.wall_s)
        return program, version

    def _evaluate(self, program: Any, examples: list, desc: str):
        return evaluate(program, examples, self.task.metric, adapter=self.session.adapter,
                        max_inflight=self.config.inference.max_inflight, desc=desc)

    # ------------------------------------------------------------ resume and selection

    def _restore(self, record: StepRecord) -> tuple[Any, str | None]:
        """The program of a finished step, bound to its model version (loading the adapter if needed)."""
        pool = self.session.pool
        if record.version is not None and record.version not in pool.adapters:
            pool.load_adapter(record.version, record.adapter_dir or self._adapter_of(record.version))
        program = self.task.program(self.config.task)
        program.load(record.program_path)
        program.set_lm(self.session.lm(record.version))
        return program, record.version

    def _adapter_of(self, version: str) -> str:
        return next(s.adapter_dir for s in self.state.steps if s.version == version and s.adapter_dir)

    def _returned_step(self) -> StepRecord:
        last = self.state.finished(len(self.steps))
        if self.config.returned == "final":
            return last
        # best on dev, the earlier step winning ties (DSPy's BetterTogether)
        return max(self.state.steps[: len(self.steps) + 1], key=lambda s: (s.dev["score"], -s.index))

    def _check_resumable(self) -> None:
        for record in self.state.steps:
            if record.index > len(self.steps) or (record.index and record.code != self.steps[record.index - 1]):
                raise ConfigError(f"--resume: finished step {record.index} was {record.strategy!r}, which is not a "
                                  f"prefix of strategy {self.config.strategy!r}; use that strategy or a new name=")


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
