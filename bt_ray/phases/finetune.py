"""Θ: BootstrapFinetune — traces of the current program become LoRA training data.

1. Run the current program (its prompts, its model version) on the train split
   through the pool and keep runs whose metric passes `train.metric_threshold`.
2. Each predictor call in a kept trace becomes one chat example, formatted by the
   same DSPy adapter that formats it at inference (demos left out unless
   `train.include_demos`); all predictors go into one multitask dataset.
3. Ray Train fits a LoRA adapter; every replica loads it as a new version and the
   program comes back bound to that version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from bt_ray.config import TrainConfig
from bt_ray.errors import TrainingError
from bt_ray.phases.fanout import Job, run_jobs
from bt_ray.train.trainer import train_lora

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    program: Any  # same prompts, bound to the new version
    version: str
    adapter_dir: str
    traces_run: int
    traces_kept: int
    examples: int
    per_predictor: dict[str, int]
    train: Any  # bt_ray.train.trainer.TrainResult


def collect_examples(program: Any, trainset: list, metric: Callable, *, adapter: Any, config: TrainConfig,
                     max_inflight: int, teachers: list | None = None) -> tuple[list[list[dict]], dict[str, Any]]:
    """Run the program (or each teacher) on `trainset`; chat examples from every predictor call of each
    passing trace."""
    sources = teachers or [program]
    outcomes = run_jobs([Job(source, ex) for source in sources for ex in trainset], metric, adapter=adapter,
                        max_inflight=max_inflight,
                        desc=f"Θ: collecting traces on {len(trainset)} examples"
                             + (f" x {len(sources)} teachers" if teachers else ""))
    kept = [o for o in outcomes if o.ok and o.score >= config.metric_threshold]
    examples, per_predictor = [], {}
    for outcome in kept:
        for name, messages in trace_messages(outcome.job.program, outcome.trace, adapter, config.include_demos):
            examples.append(messages)
            per_predictor[name] = per_predictor.get(name, 0) + 1
    stats = {"traces_run": len(outcomes), "traces_kept": len(kept), "errors": sum(not o.ok for o in outcomes),
             "per_predictor": per_predictor}
    logger.info("Θ: %d of %d traces passed (threshold %g) -> %d chat examples %s", len(kept), len(outcomes),
                config.metric_threshold, len(examples), per_predictor)
    return examples, stats


def trace_messages(program: Any, trace: list, adapter: Any, include_demos: bool) -> list[tuple[str, list[dict]]]:
    """(predictor name, messages) per call; predictors are found by identity, so loops are handled."""
    names = {id(pred): name for name, pred in program.named_predictors()}
    calls = []
    for predictor, inputs, outputs in trace:
        name = names.get(id(predictor))
        if name is None:
            raise TrainingError(f"a trace step came from a predictor that is not part of the program "
                                f"({type(predictor).__name__}); build sub-modules in __init__, not in forward()")
        demos = predictor.demos if include_demos else []
        data = adapter.format_finetune_data(signature=predictor.signature, demos=demos, inputs=inputs,
                                            outputs=dict(outputs))
        calls.append((name, data["messages"]))
    return calls


def finetune(program: Any, trainset: list, metric: Callable, *, session: Any, version: str, adapter: Any,
             config: TrainConfig, out_dir: str, seed: int, max_inflight: int,
             current_version: str | None = None, teachers: list | None = None) -> FinetuneResult:
    """Θ for `program` (bound to `current_version`); returns it bound to the new `version`.

    After an earlier Θ the current adapter keeps training (Θ→Θ optimizes the same weights twice).
    With `teachers` (programs of the same structure), their traces are the training data (as in
    BootstrapFinetune); their predictors without an LM run on `current_version`.
    """
    if teachers:
        teachers = [teacher.deepcopy() for teacher in teachers]
        for predictor in (p for teacher in teachers for p in teacher.predictors()):
            predictor.lm = predictor.lm or session.lm(current_version)
    examples, stats = collect_examples(program, trainset, metric, adapter=adapter, config=config,
                                       max_inflight=max_inflight, teachers=teachers)
    if not examples:
        raise TrainingError(
            f"no traces passed the metric (threshold {config.metric_threshold:g}) on {len(trainset)} train "
            f"examples ({stats['errors']} of {stats['traces_run']} raised, mostly unparsable answers), so there is "
            f"nothing to fine-tune on: give the program demos with a 'p' step first (e.g. 'p -> w'), use a larger "
            f"model.name, or lower train.metric_threshold (0 keeps every parsed trace)")
    init = session.pool.adapters[current_version] if current_version else None
    with session.training():  # timeshare: replicas sleep while training uses their GPUs
        result = train_lora(examples, config, str(session.model_dir), out_dir, name=version, seed=seed,
                            init_adapter_dir=init, gpus_per_worker=session.train_gpus_per_worker,
                            placement_timeout_s=session.config.placement.timeout_s)
    session.pool.load_adapter(version, str(result.adapter_dir))
    tuned = program.deepcopy()
    tuned.set_lm(session.lm(version))
    return FinetuneResult(tuned, version, str(result.adapter_dir), stats["traces_run"], stats["traces_kept"],
                          len(examples), stats["per_predictor"], result)
