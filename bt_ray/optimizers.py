"""What can stand behind a strategy key of bt_ray.BetterTogether, and how each runs as a phase-loop Step.

    PromptOptimizer        bt-ray's Π, the default 'p': BootstrapFewShotWithRandomSearch, fanned out
    LoRAFinetune           bt-ray's Θ, the default 'w': traces -> LoRA on Ray Train -> a new adapter version
    dspy.BootstrapFinetune runs as bt-ray's Θ (DSPy's own needs a fine-tuning provider bt-ray does not have)
    any other DSPy Teleprompter (MIPROv2, GEPA, BootstrapFewShot, BootstrapFewShotWithRandomSearch, ...):
                           its own compile(), with the program and dspy.settings.lm bound to the current model
                           version in the pool, so every call it makes goes through the pool
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections import defaultdict
from typing import Any, Callable

import dspy
from dspy.teleprompt import BootstrapFinetune
from dspy.teleprompt.bootstrap_finetune import FinetuneTeleprompter
from dspy.teleprompt.teleprompt import Teleprompter

from bt_ray.config import PromptConfig, RunConfig, TrainConfig
from bt_ray.driver import Step, StepContext, StepOutput, finetune_step, prompt_step
from bt_ray.errors import BtRayError, ConfigError

logger = logging.getLogger(__name__)


class PromptOptimizer(Teleprompter):
    """bt-ray's Π. Settings are the session's `prompt.*` keys; keyword arguments override them for this key:
    `PromptOptimizer(metric, num_candidates=8, max_bootstrapped_demos=4)`. `metric=None`: BetterTogether's."""

    def __init__(self, metric: Callable | None = None, **prompt: Any):
        self.metric = metric
        self.overrides = _checked(PromptConfig, prompt, "PromptOptimizer")

    def compile(self, student: Any, *, trainset: list, teacher: Any = None, valset: list | None = None) -> Any:
        raise BtRayError("bt_ray.PromptOptimizer runs as a step of bt_ray.BetterTogether (strategy='p'); "
                         "it needs the loop's model version and checkpoint directory")


class LoRAFinetune(Teleprompter):
    """bt-ray's Θ. Settings are the session's `train.*` keys; keyword arguments override them for this key:
    `LoRAFinetune(metric, epochs=2, learning_rate=1e-4)`. `metric=None`: BetterTogether's."""

    def __init__(self, metric: Callable | None = None, **train: Any):
        self.metric = metric
        self.overrides = _checked(TrainConfig, train, "LoRAFinetune")

    def compile(self, student: Any, trainset: list, teacher: Any = None) -> Any:
        raise BtRayError("bt_ray.LoRAFinetune runs as a step of bt_ray.BetterTogether (strategy='w'); "
                         "it needs the loop's model version and checkpoint directory")


def _checked(cls: type, overrides: dict[str, Any], who: str) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"{who}: unknown settings {unknown}; valid: {', '.join(names)}")
    return dict(overrides)


def check_supported(key: str, optimizer: Teleprompter) -> None:
    """Refuse, before any work starts, what bt-ray cannot run behind a key."""
    if isinstance(optimizer, BootstrapFinetune):
        _bootstrap_finetune_settings(key, optimizer)
    elif isinstance(optimizer, FinetuneTeleprompter):
        raise ConfigError(f"optimizer {key!r} ({type(optimizer).__name__}) fine-tunes through a DSPy provider; "
                          f"bt-ray fine-tunes the model its pool serves with Ray Train: use BootstrapFinetune or "
                          f"bt_ray.LoRAFinetune for weight steps")


def build_step(key: str, optimizer: Teleprompter, *, metric: Callable, config: RunConfig, seed: int,
               args: dict[str, Any]) -> Step:
    """The Step for one key. `args`: trainset/teacher/valset overrides and the optimizer's compile arguments."""
    trainset = args.get("trainset")
    teacher = args.get("teacher")
    teachers = None if teacher is None else (teacher if isinstance(teacher, list) else [teacher])
    if isinstance(optimizer, PromptOptimizer):
        if teachers and len(teachers) > 1:
            raise ConfigError(f"optimizer {key!r} (bt-ray's Π) bootstraps from one teacher, as "
                              f"BootstrapFewShot does; got {len(teachers)}")
        prompt = dataclasses.replace(config.prompt, **optimizer.overrides)
        step = prompt_step(optimizer.metric or metric, prompt, seed, args.get("valset"),
                           teachers[0] if teachers else None)
        return _with_trainset(step, trainset)
    if isinstance(optimizer, LoRAFinetune):
        train = dataclasses.replace(config.train, **optimizer.overrides)
        return _with_trainset(finetune_step(optimizer.metric or metric, train, seed, teachers), trainset)
    if isinstance(optimizer, BootstrapFinetune):
        overrides = _bootstrap_finetune_settings(key, optimizer)
        step = finetune_step(optimizer.metric, dataclasses.replace(config.train, **overrides), seed, teachers)
        if optimizer.exclude_demos:  # DSPy's BootstrapFinetune also drops the demos of the program it returns
            step = _dropping_demos(step)
        return _with_trainset(_with_inflight(step, optimizer.num_threads), trainset)
    return teleprompter_step(key, optimizer, args)


def _bootstrap_finetune_settings(key: str, optimizer: BootstrapFinetune) -> dict[str, Any]:
    """DSPy's BootstrapFinetune settings as bt-ray's `train.*`; what has no bt-ray meaning is refused."""
    problems = []
    if not optimizer.multitask:
        problems.append(f"optimizer {key!r}: BootstrapFinetune(multitask=False) is not supported; bt-ray trains "
                        f"one adapter on all predictors' examples (they share the model)")
    if _lm_dict_value(optimizer.train_kwargs):
        problems.append(f"optimizer {key!r}: BootstrapFinetune(train_kwargs=...) is not supported; set the "
                        f"session's train.* keys instead (train.epochs, train.learning_rate, train.batch_size, ...)")
    if _lm_dict_value(optimizer.adapter) is not None:
        problems.append(f"optimizer {key!r}: BootstrapFinetune(adapter=...) is not supported; training data is "
                        f"formatted by the session's ChatAdapter, the one used at inference")
    if problems:
        raise ConfigError(problems)
    # DSPy's BootstrapFinetune keeps every trace when it has no metric; with one, those where it is truthy.
    return {"include_demos": not optimizer.exclude_demos,
            **({"metric_threshold": 1e-9} if optimizer.metric else {"metric_threshold": 0.0})}


def _lm_dict_value(value: Any) -> Any:
    if isinstance(value, defaultdict) and value.default_factory is not None:
        return value.default_factory()
    return value or None


def teleprompter_step(key: str, optimizer: Teleprompter, args: dict[str, Any]) -> Step:
    """Any DSPy Teleprompter: compile() with the program and dspy.settings.lm on the current version."""
    accepted = set(inspect.signature(optimizer.compile).parameters)
    name = type(optimizer).__name__

    def run(ctx: StepContext) -> StepOutput:
        lm = ctx.session.lm(ctx.version)
        student = ctx.program.deepcopy()
        student.set_lm(lm)
        student._compiled = False
        given = {"trainset": ctx.trainset, **args}
        kwargs = {k: v for k, v in given.items() if k in accepted}
        logger.info("step %d: %s.compile(%s) on model version %s", ctx.index, name, ", ".join(kwargs),
                    ctx.version or "base")
        with dspy.context(lm=lm, adapter=ctx.session.adapter):
            program = optimizer.compile(student, **kwargs)
        _rebind(program, lm, key, name)
        return StepOutput(program, ctx.version, {"optimizer": name})

    return Step(run)


def _rebind(program: Any, lm: Any, key: str, name: str) -> None:
    """Predictors an optimizer left without an LM get the current version back (DSPy's BetterTogether does
    the same); one moved to another model is an error: bt-ray's weight steps are the only ones that change it."""
    for pred_name, predictor in program.named_predictors():
        current = getattr(predictor.lm, "model", None)
        if predictor.lm is not None and current != lm.model:
            raise BtRayError(f"optimizer {key!r} ({name}) left predictor {pred_name!r} on model {current!r}; the "
                             f"step ran on {lm.model!r}, and only bt-ray's weight steps change the model")
        predictor.lm = lm


def _dropping_demos(step: Step) -> Step:
    def run(ctx: StepContext) -> StepOutput:
        out = step.run(ctx)
        for predictor in out.program.predictors():
            predictor.demos = []
        return out

    return Step(run, step.weights)


def _with_trainset(step: Step, trainset: list | None) -> Step:
    if trainset is None:
        return step
    return Step(lambda ctx: step.run(dataclasses.replace(ctx, trainset=list(trainset))), step.weights)


def _with_inflight(step: Step, num_threads: int | None) -> Step:
    if not num_threads:
        return step
    return Step(lambda ctx: step.run(dataclasses.replace(ctx, max_inflight=num_threads)), step.weights)
