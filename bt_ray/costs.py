"""What each phase of a run cost: wall time, CPU- and GPU-seconds, generated and trained tokens.

Resource-seconds are derived from what the run reserved on the Ray cluster (its resolved config,
or `resources` in results.json), not measured utilisation:

    pool   = inference.replicas x (inference.cpus_per_replica CPUs, inference.gpus_per_replica GPUs)
             (placement.mode=timeshare: one whole GPU per replica)
    train  = train.num_workers x (train.cpus_per_worker CPUs, 1 GPU if train.use_gpu)
             (placement.mode=timeshare: no extra GPU, training runs on the sleeping replicas' GPUs)
    step   CPU-s = pool CPUs x step wall_s + train CPUs x Ray Train wall_s (Θ steps)
           GPU-s = pool GPUs x step wall_s + train GPUs x Ray Train wall_s (Θ steps)
    test   the same pool formula over the test evaluation's wall_s

The pool stays up for the whole step (training included), so its reservation counts for all of it.
Not counted: Ray and model start-up before step 0, and the driver process (it reserves nothing).

A step whose `reused_from` names another run was computed there (a sweep shares strategy prefixes):
it is counted once, at the run that computed it, however many cells reuse it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bt_ray.config import from_dict
from bt_ray.inference.placement import reserved
from bt_ray.strategy import paper_notation, split_strategy

FORMULA = ("CPU-s (GPU-s) = pool CPUs (GPUs) x step wall time + training CPUs (GPUs) x Ray Train wall time; "
           "pool = inference.replicas x inference.cpus_per_replica (gpus_per_replica; one GPU per replica with "
           "placement.mode=timeshare); training = train.num_workers x train.cpus_per_worker (one GPU each if "
           "train.use_gpu, none extra with timeshare). Reserved resources, not measured utilisation; Ray and model "
           "start-up are not counted.")
PAPER_GPU_HOURS = 75  # Table 1 of the paper: about 75 A100 GPU-hours (DESIGN.md section 1)
PHASES = ("vanilla", "p", "w", "test")
PHASE_NAMES = {"vanilla": "vanilla (step 0)", "p": "Π", "w": "Θ", "test": "test evaluation"}


def held(config: dict[str, Any]) -> dict[str, Any]:
    """The CPUs and GPUs a run reserves, from its resolved config (a dict, as in results.json)."""
    run_config = from_dict(config)
    return {"placement": run_config.placement.mode, **reserved(run_config)}


@dataclass
class PhaseCost:
    """One step (or the test evaluation) of one run."""

    run: str
    run_dir: Path
    task: str
    model: str  # the model's label (the paper's where it matches)
    strategy: str  # the run's strategy, paper notation
    seed: int
    step: int | None  # None for the test evaluation
    phase: str  # vanilla | p | w | test | a user's step key
    step_strategy: str
    wall_s: float
    train_wall_s: float
    cpu_s: float
    gpu_s: float
    generated_tokens: int
    trained_tokens: int  # answer tokens with a loss (labels), once
    train_total_tokens: int  # every token the training ran through, over all epochs (what its compute scales with)
    reused_from: str | None = None
    counted: bool = True  # False: a reuse of a step counted at the run that computed it

    def row(self) -> dict[str, Any]:
        return {"run": self.run, "task": self.task, "model": self.model, "strategy": self.strategy,
                "seed": self.seed, "step": "" if self.step is None else self.step, "phase": self.phase,
                "step_strategy": self.step_strategy, "wall_s": round(self.wall_s, 2),
                "train_wall_s": round(self.train_wall_s, 2), "cpu_s": round(self.cpu_s, 1),
                "gpu_s": round(self.gpu_s, 1), "generated_tokens": self.generated_tokens,
                "trained_tokens": self.trained_tokens,
                "train_total_tokens": self.train_total_tokens, "reused_from": self.reused_from or "",
                "counted": self.counted}


def phase_costs(runs: list) -> list[PhaseCost]:
    """Every step and test evaluation of `runs` (table1.RunResult), reused steps marked not counted."""
    costs = []
    for run in runs:
        resources = run.raw.get("resources") or held(run.raw.get("config", {}))
        for row in run.steps:
            code = split_strategy(row["strategy"])
            details = row.get("details") or {}
            train = details.get("train") or {}
            step_resources = row.get("resources") or resources  # a resume may have held other resources
            costs.append(_cost(run, step_resources, row["step"], code[-1] if code else "vanilla", row["strategy"],
                               float(row.get("wall_s") or 0.0), float(train.get("wall_s") or 0.0),
                               row.get("generated_tokens", 0), row.get("trained_tokens", 0),
                               train.get("total_tokens", 0), row.get("reused_from")))
        test = run.test
        if not test:  # no test set scored (BetterTogether.compile): no test phase to cost
            continue
        returned = paper_notation(test.get("strategy") or "")
        costs.append(_cost(run, resources, None, "test", returned, float(test.get("wall_s") or 0.0),
                           0.0, test.get("generated_tokens", 0), 0, 0, None))
    _mark_reuse(costs, runs)
    return costs


def _cost(run: Any, resources: dict, step: int | None, phase: str, step_strategy: str, wall_s: float,
          train_s: float, generated: int, trained: int, train_total: int, reused_from: str | None) -> PhaseCost:
    pool, train = resources["pool"], resources["train"]
    return PhaseCost(run.name, run.dir, run.task, run.label, run.strategy, run.seed, step, phase, step_strategy,
                     wall_s, train_s, pool["CPU"] * wall_s + train["CPU"] * train_s,
                     pool["GPU"] * wall_s + train["GPU"] * train_s, generated or 0, trained or 0, train_total or 0,
                     reused_from)


def _mark_reuse(costs: list[PhaseCost], runs: list) -> None:
    """A reused step counts once: at the run that computed it if that run is in the report, else at its first
    reuse. Chains (C reused B's step, which B reused from A) are followed to the run that computed it."""
    reuse = {(c.run_dir, c.step): c.reused_from for c in costs if c.step is not None}
    seen: set[tuple] = set()
    for cost in costs:
        if not cost.reused_from:
            continue
        key: tuple = (cost.run_dir, cost.step)
        for _ in range(len(runs) + 1):
            if not reuse.get(key):
                break
            origin = _origin(reuse[key], runs)
            key = (origin.dir, cost.step) if origin is not None else (reuse[key], cost.step)
        if key in reuse and not reuse[key]:
            cost.counted = False  # counted where it was computed
        else:
            cost.counted = key not in seen  # computed outside this report: count its first reuse
            seen.add(key)


def _origin(reused_from: str, runs: list) -> Any:
    """The run `reused_from` names: by run name, directory name, or a path inside its directory."""
    for run in runs:
        if reused_from in (run.name, run.dir.name, str(run.dir)):
            return run
    path = Path(reused_from)
    for run in runs:
        candidates = [path] if path.is_absolute() else [run.dir.parent / path, run.root / path]
        for candidate in candidates:
            try:
                candidate.resolve().relative_to(run.dir.resolve())
                return run
            except ValueError:
                continue
    return None


# ---------------------------------------------------------------- summaries


FIELDS = ("wall_s", "cpu_s", "gpu_s", "generated_tokens", "trained_tokens", "train_total_tokens")


@dataclass
class Mean:
    """The mean cost of `count` phases (or runs)."""

    count: int
    wall_s: float
    cpu_s: float
    gpu_s: float
    generated_tokens: float
    trained_tokens: float
    train_total_tokens: float


def _mean(rows: list[dict[str, float]]) -> Mean:
    return Mean(len(rows), *(statistics.fmean(r[f] for r in rows) if rows else 0.0 for f in FIELDS))


def mean_of(costs: list[PhaseCost]) -> Mean:
    return _mean([{f: getattr(c, f) for f in FIELDS} for c in costs])


def per_phase(costs: list[PhaseCost]) -> dict[tuple[str, str, str], Mean]:
    """(task, model, phase) -> mean cost of one such phase, over the phases actually computed."""
    groups: dict[tuple[str, str, str], list[PhaseCost]] = {}
    for cost in costs:
        if cost.counted:
            groups.setdefault((cost.task, cost.model, cost.phase), []).append(cost)
    return {key: mean_of(group) for key, group in groups.items()}


def per_strategy(costs: list[PhaseCost]) -> dict[tuple[str, str, str], tuple[Mean, int]]:
    """(task, model, strategy) -> (mean cost of one run of it: its steps and test summed, reused steps at their
    recorded cost, as if it ran alone; how many of its steps were reused)."""
    groups: dict[tuple[str, str, str], dict[Path, list[PhaseCost]]] = {}
    for cost in costs:
        groups.setdefault((cost.task, cost.model, cost.strategy), {}).setdefault(cost.run_dir, []).append(cost)
    return {key: (_mean([{f: sum(getattr(c, f) for c in run) for f in FIELDS} for run in by_run.values()]),
                  sum(1 for run in by_run.values() for c in run if c.reused_from))
            for key, by_run in groups.items()}


def total(costs: list[PhaseCost]) -> dict[str, float]:
    """What the report's runs cost together, each computed step once."""
    return {f: sum(getattr(c, f) for c in costs if c.counted) for f in FIELDS}
