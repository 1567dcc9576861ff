"""`bt-ray report DIR --estimate SWEEP.yaml`: what a sweep's grid would cost, from the phases measured in DIR.

A grid (a sweep file: tasks x models x strategies x seeds) needs, per task/model/seed, each distinct strategy
prefix once (cells sharing a prefix compute it once), one vanilla baseline, and one test evaluation per
strategy. Each phase is priced at the mean measured cost of that phase kind (vanilla, Π, Θ, test) on the same
task and model, else the same task, else the same model, else any measured run; the output says which.
Nothing is rescaled: a grid at other sizes, on another model or device, costs what it costs there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bt_ray import costs
from bt_ray.errors import ConfigError
from bt_ray.strategy import StrategyError, parse_strategy

KINDS = ("vanilla", "p", "w", "test")


@dataclass
class Grid:
    path: Path
    name: str
    tasks: list[str]  # task names (a task label's config's task.name, else the label)
    models: dict[str, str]  # label -> model name
    strategies: list[tuple[str, ...]]
    seeds: list[Any]


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--estimate {path}: no such sweep file; e.g. configs/paper_table1.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        tasks = [_task_name(path, label, spec) for label, spec in (data.get("tasks") or {}).items()]
        models = {str(k): str(v) for k, v in (data.get("models") or {}).items()}
        strategies = list(dict.fromkeys(parse_strategy(str(s)) for s in data.get("strategies") or []))
        seeds = list(data.get("seeds") or [])
    except (yaml.YAMLError, AttributeError, TypeError, StrategyError) as exc:
        raise ConfigError(f"--estimate {path}: not a sweep file ({exc}); see configs/paper_table1.yaml") from None
    missing = [key for key, value in (("tasks", tasks), ("models", models), ("strategies", strategies),
                                      ("seeds", seeds)) if not value]
    if missing:
        raise ConfigError(f"--estimate {path}: needs non-empty {', '.join(missing)} (tasks, models, strategies, "
                          f"seeds as in configs/paper_table1.yaml)")
    return Grid(path, str(data.get("name") or path.stem), tasks, models, strategies, seeds)


def _task_name(path: Path, label: Any, spec: Any) -> str:
    """The task a label runs: task.name of its config file if it names one, else the label."""
    config = path.parent / str(spec.get("config", "")) if isinstance(spec, dict) and spec.get("config") else None
    if config is not None and config.is_file():
        name = ((yaml.safe_load(config.read_text()) or {}).get("task") or {}).get("name")
        if name:
            return str(name)
    return str(label)


def phases_per_seed(strategies: list[tuple[str, ...]]) -> tuple[dict[str, int], dict[str, int]]:
    """Phases one task/model/seed needs: (with prefix sharing, without). As the sweep shares them
    (sweep.plan_sharing): a cell starts from the cell whose strategy is its longest proper prefix in the
    grid, if any, and computes the rest; a cell without one computes step 0 and every step."""
    grid = set(strategies)
    shared = {"vanilla": 0, "test": len(strategies)}
    alone = {"vanilla": len(strategies), "test": len(strategies)}
    for strategy in strategies:
        start = next((k for k in range(len(strategy) - 1, -1, -1) if strategy[:k] in grid), None)
        if start is None:
            shared["vanilla"] += 1
        for code in strategy[start or 0:]:
            shared[code] = shared.get(code, 0) + 1
        for code in strategy:
            alone[code] = alone.get(code, 0) + 1
    return shared, alone


def measured(phase_costs: list[costs.PhaseCost], task: str, model: str, kind: str) -> tuple[costs.Mean | None, str]:
    """The mean measured cost of one `kind` phase for task/model, and where it comes from."""
    pool = [c for c in phase_costs if c.counted and c.phase == kind and (kind != "test" or c.wall_s)]
    for test, source in ((lambda c: c.task == task and c.model == model, "same task and model"),
                         (lambda c: c.task == task, "same task, other model"),
                         (lambda c: c.model == model, "same model, other task"),
                         (lambda c: True, "other task and model")):
        chosen = [c for c in pool if test(c)]
        if chosen:
            return costs.mean_of(chosen), source
    return None, "not measured"


@dataclass
class Priced:
    """One task x model of the grid: its phases and what they cost at the measured means."""

    task: str
    model: str
    phases: dict[str, int]  # kind -> phases over all seeds, after prefix sharing
    sources: dict[str, str]  # kind -> where its price comes from
    wall_s: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    generated_tokens: float = 0.0
    train_total_tokens: float = 0.0  # tokens trained through, all epochs (what gpu_rates prices)


def price(grid: Grid, phase_costs: list[costs.PhaseCost]) -> list[Priced]:
    shared, _ = phases_per_seed(grid.strategies)
    rows = []
    for task in grid.tasks:
        for model in grid.models:
            row = Priced(task, model, {k: n * len(grid.seeds) for k, n in shared.items()}, {})
            for kind, count in row.phases.items():
                mean, row.sources[kind] = measured(phase_costs, task, model, kind)
                if mean is not None:
                    row.wall_s += count * mean.wall_s
                    row.cpu_s += count * mean.cpu_s
                    row.gpu_s += count * mean.gpu_s
                    row.generated_tokens += count * mean.generated_tokens
                    row.train_total_tokens += count * mean.train_total_tokens
            rows.append(row)
    return rows


def estimate(grid: Grid, phase_costs: list[costs.PhaseCost], runs: list, rates: Any = None) -> str:
    """The estimate as markdown: phases and hours per task x model, the grid's total, what it rests on;
    with `rates` (gpu_rates.Rates), also the GPU time those phases take at the measured GPU rates."""
    shared, alone = phases_per_seed(grid.strategies)
    kinds = [k for k in KINDS if k in shared] + sorted(set(shared) - set(KINDS))
    rows = price(grid, phase_costs)
    lines = [f"## Grid estimate: {grid.name} ({grid.path})", "",
             f"{len(grid.tasks)} tasks x {len(grid.models)} models x {len(grid.strategies)} strategies x "
             f"{len(grid.seeds)} seeds = {len(rows) * len(grid.strategies) * len(grid.seeds)} runs. With prefix "
             f"sharing one task/model/seed computes {_counts(shared, kinds)}; without it, {_counts(alone, kinds)}.",
             "", "| task · model | " + " | ".join(costs.PHASE_NAMES.get(k, k) for k in kinds) +
             " | priced from | phase wall h | CPU-h | GPU-h |",
             "|---|" + "---:|" * len(kinds) + "---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.task} · {row.model} | " + " | ".join(str(row.phases[k]) for k in kinds) +
                     f" | {_merge(row.sources, kinds)} | {_hours(row.wall_s, row.cpu_s, row.gpu_s)} |")
    grand = {key: sum(getattr(r, key) for r in rows) for key in ("wall_s", "cpu_s", "gpu_s")}
    lines.append("| **grid** | " + " | ".join(str(sum(r.phases[k] for r in rows)) for k in kinds) +
                 f" | | {_hours(*grand.values())} |")
    missing = {costs.PHASE_NAMES.get(k, k) for r in rows for k, source in r.sources.items() if source == "not measured"}
    lines += ["", *_measured_table(phase_costs, kinds)]
    for caveat in _caveats(runs, phase_costs, grand, missing):
        lines += ["", caveat]
    if rates is not None:
        from bt_ray import gpu_rates

        cells = len(grid.strategies) * len(grid.seeds)
        lines += ["", *gpu_rates.section(gpu_rates.busy(rows, cells, rates), rates, runs)]
    return "\n".join(lines) + "\n"


def _counts(counts: dict[str, int], kinds: list[str]) -> str:
    return ", ".join(f"{counts.get(k, 0)}x {costs.PHASE_NAMES.get(k, k)}" for k in kinds)


def _merge(sources: dict[str, str], kinds: list[str]) -> str:
    """{'vanilla': 'same task', 'p': 'same task', 'w': 'not measured'} -> 'vanilla, Π: same task; Θ: not measured'."""
    groups: dict[str, list[str]] = {}
    for kind in kinds:
        groups.setdefault(sources[kind], []).append(costs.PHASE_NAMES.get(kind, kind))
    if len(groups) == 1:
        return f"all: {next(iter(groups))}"
    return "; ".join(f"{', '.join(names)}: {source}" for source, names in groups.items())


def _hours(wall_s: float, cpu_s: float, gpu_s: float) -> str:
    return f"{wall_s / 3600:.2f} | {cpu_s / 3600:.2f} | {gpu_s / 3600:.2f}"


def _measured_table(phase_costs: list[costs.PhaseCost], kinds: list[str]) -> list[str]:
    lines = ["Measured phases it multiplies (mean of one phase, each computed step once):", "",
             "| task · model | phase | measured | wall s | CPU-s | GPU-s |", "|---|---|---:|---:|---:|---:|"]
    by_phase = costs.per_phase(phase_costs)
    for task, model in sorted({key[:2] for key in by_phase}):
        for kind in kinds:
            mean = by_phase.get((task, model, kind))
            if mean is not None:
                lines.append(f"| {task} · {model} | {costs.PHASE_NAMES.get(kind, kind)} | {mean.count} | "
                             f"{mean.wall_s:.0f} | {mean.cpu_s:.0f} | {mean.gpu_s:.0f} |")
    return lines


def _caveats(runs: list, phase_costs: list[costs.PhaseCost], grand: dict[str, float], missing: set[str]) -> list[str]:
    lines = [f"For scale: the paper's Table 1 cost about {costs.PAPER_GPU_HOURS} A100 GPU-hours (DESIGN.md section 1); "
             f"this estimate: {grand['gpu_s'] / 3600:.2f} GPU-hours, {grand['cpu_s'] / 3600:.2f} CPU-hours."]
    if not any(c.gpu_s for c in phase_costs):
        lines.append("**Measured on CPUs only** (no GPU was reserved): the CPU-hours are what this grid would take "
                     "on the same CPUs at the measured sizes; they do not predict GPU-hours, which depend on the GPU, "
                     "vLLM and the model (a 7-8B model on vLLM, not the shipped 135M model on transformers). "
                     "Measure a few GPU runs of the grid's models and rerun this, or price the measured tokens at "
                     "the GPU benchmarks' rates (--gpu-rates).")
    if missing:
        lines.append(f"Not measured in these runs, so not in the totals: {', '.join(sorted(missing))}.")
    lines.append(f"Extrapolated from {len(runs)} run(s): " + "; ".join(sorted(_settings(runs))) +
                 ". Phases at other sizes (the paper's dev/test sets, 6 candidates, 5 epochs) cost more or less in "
                 "proportion to the examples they run; nothing is rescaled. Ray and model start-up per run are not "
                 "counted.")
    return lines


def _settings(runs: list) -> set[str]:
    """What the measured runs ran: model, engine, placement, sizes."""
    out = set()
    for run in runs:
        cfg = run.raw.get("config") or {}
        inf, pr, tr = cfg.get("inference", {}), cfg.get("prompt", {}), cfg.get("train", {})
        dev_n = next((s.get("dev_n") for s in run.steps if s.get("dev_n") is not None), "?")
        placement = (cfg.get("placement") or {}).get("mode", "?")
        out.add(f"{run.task} · {run.label} on {inf.get('engine', '?')} (placement {placement}, "
                f"{inf.get('replicas', '?')} replica(s)), dev n={dev_n}, test n={run.test.get('n')}, Π "
                f"{pr.get('num_candidates', '?')} candidates on {pr.get('train_size', '?')}+{pr.get('val_size', '?')}"
                f", Θ {tr.get('epochs', '?')} epochs")
    return out

