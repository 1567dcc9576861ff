"""`bt-ray report DIR`: the paper's Table 1 from the results.json of a run or a sweep, with costs and plots.

    bt-ray report runs/paper-table1 [--paper configs/paper_table1.yaml] [--out DIR] [--estimate SWEEP.yaml]

Rows are strategies (the paper's order, then any others), columns are task x model, a cell is the test
score's mean ± sample standard deviation over the seeds that finished, with the paper's number beside it
where the task and model match. Every intermediate step's dev score, the cost of each phase, and two plots
(scores.png, phases.png) go beside it in DIR/report/.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bt_ray import costs
from bt_ray.errors import ConfigError
from bt_ray.strategy import PAPER_STRATEGIES, StrategyError, paper_notation, split_strategy

logger = logging.getLogger(__name__)

DEFAULT_PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper_table1.yaml"
TASK_ORDER = ("hotpotqa", "gsm8k", "iris")  # the paper's column order
STRATEGY_ORDER = tuple(paper_notation(s) for s in PAPER_STRATEGIES)
REQUIRED = ("run", "task", "model", "strategy", "seed", "steps", "test")


# ---------------------------------------------------------------- inputs


@dataclass
class RunResult:
    """One finished run's results.json, with its model's label (the paper's where it matches)."""

    dir: Path
    root: Path  # the directory the report was asked for
    raw: dict[str, Any]
    label: str
    task_label: str | None = None  # a sweep cell's task label (two labels may run one task.name)

    name = property(lambda self: self.raw["run"])
    task = property(lambda self: self.task_label or self.raw["task"])
    model = property(lambda self: self.raw["model"])
    strategy = property(lambda self: paper_notation(self.raw["strategy"]))
    seed = property(lambda self: self.raw["seed"])
    steps = property(lambda self: self.raw["steps"])
    test = property(lambda self: self.raw["test"] or {})  # {} when the run scored no test set


@dataclass
class Paper:
    """configs/paper_table1.yaml: model labels -> model names, and Table 1's numbers (None: not possible)."""

    path: Path | None = None
    models: dict[str, str] = field(default_factory=dict)
    scores: dict[tuple[str, str, str], float | None] = field(default_factory=dict)  # (label, strategy, task)

    def score(self, label: str, strategy: str, task: str) -> tuple[bool, float | None]:
        """(the paper has this cell, its number); a cell it has may be None (not possible in the paper)."""
        key = (label, strategy, task.lower())
        return key in self.scores, self.scores.get(key)


def load_paper(path: str | Path | None) -> Paper:
    """The paper's numbers; the default file may be absent (an installed package), a named one may not."""
    if path is None:
        if not DEFAULT_PAPER.is_file():
            return Paper()
        path = DEFAULT_PAPER
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--paper {path}: no such file; the paper's numbers are in configs/paper_table1.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        models = {str(k): str(v) for k, v in (data.get("models") or {}).items()}
        scores = {(str(label), paper_notation(strategy), str(task).lower()): None if value is None else float(value)
                  for label, table in (data.get("paper") or {}).items()
                  for strategy, row in table.items() for task, value in row.items()}
    except (yaml.YAMLError, AttributeError, TypeError, ValueError, StrategyError) as exc:
        raise ConfigError(f"--paper {path}: expected `models: {{label: model name}}` and `paper: {{label: "
                          f"{{strategy: {{task: score or null}}}}}}` as in configs/paper_table1.yaml ({exc})") from None
    return Paper(path, models, scores)


def model_label(name: str, models: dict[str, str]) -> str:
    """The label of `name` in `models` (label -> model name): equal names, or equal basenames, or the basename
    equal to a label, ignoring case. Unmatched: the basename ('smollm2-135m', a local dir's last part)."""
    return _known_label(name, models) or _basename(name)


def _known_label(name: str, models: dict[str, str]) -> str | None:
    base = _basename(name).lower()
    for label, public in models.items():
        if name == public or base in (_basename(public).lower(), label.lower()):
            return label
    return None


def _basename(name: str) -> str:
    return Path(name.rstrip("/")).name or name


def find_runs(root: str | Path, models: dict[str, str]) -> tuple[list[RunResult], list[Path]]:
    """Every finished run (a results.json) under `root`, at any depth; and the unfinished ones (a state.json but
    no results.json yet: still running, or stopped)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"bt-ray report {root}: no such directory; give the directory of a `bt-ray run` "
                          f"(output_dir/name) or of a `bt-ray sweep`")
    runs = [_load(path, root, models) for path in sorted(root.rglob("results.json"))]
    _apply_sweep_labels(runs, models)
    unfinished = sorted(p.parent for p in root.rglob("state.json")
                        if (p.parent / "config.yaml").exists() and not (p.parent / "results.json").exists())
    if not runs:
        waiting = f"; unfinished (no results.json yet): {', '.join(map(str, unfinished))}" if unfinished else ""
        raise ConfigError(f"bt-ray report {root}: found no results.json under it{waiting}. Expected the directory "
                          f"of a finished `bt-ray run` (output_dir/name/results.json) or of a `bt-ray sweep` "
                          f"(<sweep dir>/cells/<cell>/results.json)")
    return runs, unfinished


def _load(path: Path, root: Path, models: dict[str, str]) -> RunResult:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable results.json ({exc}); rerun the run with --resume to "
                          f"rewrite it, or move the file away") from None
    missing = [key for key in REQUIRED if not isinstance(raw, dict) or key not in raw]
    if missing:
        raise ConfigError(f"{path}: not a bt-ray results.json, it lacks {', '.join(missing)}; rerun the run "
                          f"with --resume to rewrite it, or move the file away")
    return RunResult(path.parent, root, raw, model_label(str(raw["model"]), models))


def _apply_sweep_labels(runs: list[RunResult], models: dict[str, str]) -> None:
    """Columns by the sweep's own labels where a run is a sweep cell (<sweep>/cells/<cell>, in <sweep>/sweep.json):
    its task label, and its model label unless the model is one of `models`. Elsewhere, unmatched models that
    share a basename (/ckpt/a/final, /ckpt/b/final) are told apart by their full names."""
    from bt_ray.sweep import status_rows

    sweeps: dict[Path, dict[str, dict]] = {}
    for run in runs:
        path = run.dir.parent.parent / "sweep.json"
        if path not in sweeps:  # none: not a sweep cell, or a damaged status file (the results' own names)
            sweeps[path] = status_rows(path)
        row = sweeps[path].get(run.dir.name) if run.dir.parent.name == "cells" else None
        if row and row.get("task") and row.get("model"):
            run.task_label = str(row["task"])
            run.label = _known_label(str(run.model), models) or str(row["model"])
    names: dict[str, set[str]] = {}
    for run in runs:
        names.setdefault(run.label, set()).add(str(run.model))
    for run in runs:
        if len(names[run.label]) > 1 and _known_label(str(run.model), models) is None:
            run.label = str(run.model)


# ---------------------------------------------------------------- aggregation


@dataclass
class Stat:
    """Mean and sample standard deviation (None below two values) of one number over seeds."""

    values: list[float]
    seeds: list[int]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, with_n: bool = True) -> str:
        if not self.values:
            return "—"
        shown = f"{self.mean:.1f}" + ("" if self.std is None else f" ± {self.std:.1f}")
        return f"{shown} (n={self.n})" if with_n else shown


Column = tuple[str, str]  # (task, model label)


@dataclass
class Table:
    """Test scores and every step's dev score, per column and strategy."""

    columns: list[Column]
    strategies: list[str]
    test: dict[tuple[Column, str], Stat]
    steps: dict[tuple[Column, str, int], Stat]  # (column, strategy, step index) -> dev score
    runs: list[RunResult]


def aggregate(runs: list[RunResult]) -> Table:
    test: dict[tuple[Column, str], Stat] = {}
    steps: dict[tuple[Column, str, int], Stat] = {}
    seen: dict[tuple[Column, str, Any], RunResult] = {}
    for run in sorted(runs, key=lambda r: (r.seed, r.name)):
        column = (run.task, run.label)
        twin = seen.setdefault((column, run.strategy, run.seed), run)
        if twin is not run:
            raise ConfigError(f"runs {twin.dir} and {run.dir} are both task {column[0]}, model {column[1]}, "
                              f"strategy {run.strategy}, seed {run.seed}: one column would count that seed twice. "
                              f"Report their directories separately, or move one of them out of {run.root}")
        cell = test.setdefault((column, run.strategy), Stat([], []))
        if run.test.get("score") is not None:
            cell.values.append(float(run.test["score"]))
            cell.seeds.append(run.seed)
        for row in run.steps:
            if row.get("dev") is not None:
                stat = steps.setdefault((column, run.strategy, row["step"]), Stat([], []))
                stat.values.append(float(row["dev"]))
                stat.seeds.append(run.seed)
    columns = sorted({c for c, _ in test}, key=lambda c: (_rank(c[0].lower(), TASK_ORDER), c[0], c[1]))
    strategies = sorted({s for _, s in test}, key=lambda s: (_rank(s, STRATEGY_ORDER), len(split_strategy(s)), s))
    return Table(columns, strategies, test, steps, runs)


def _rank(value: str, order: tuple[str, ...]) -> int:
    return order.index(value) if value in order else len(order)


def column_name(column: Column) -> str:
    return f"{column[0]} · {column[1]}"


# ---------------------------------------------------------------- markdown


def markdown(table: Table, paper: Paper, phase_costs: list[costs.PhaseCost], unfinished: list[Path]) -> str:
    lines = ["# Table 1: test accuracy (%), mean ± std over seeds", ""]
    header = ["strategy"]
    for column in table.columns:
        header += [column_name(column), "paper"]
    lines += [_row(header), _row(["---"] + ["---:"] * (len(header) - 1))]
    for strategy in table.strategies:
        cells = [strategy]
        for column in table.columns:
            cells += [table.test.get((column, strategy), Stat([], [])).text(), _paper_text(paper, column, strategy)]
        lines.append(_row(cells))
    lines += ["", *_column_notes(table), "",
              "*n*: seeds that finished; ± is the sample standard deviation over them. *paper*: Table 1 of "
              "Soylu et al. 2024 (mean of 3 seeds, full test sets" + (f", from {paper.path}" if paper.path else "") +
              "); — the paper has no such model/task; n/a it reports none (not possible there)."]
    lines += ["", "## Dev score after each step (mean ± std over seeds)"]
    for column in table.columns:
        lines += ["", *_steps_table(table, column)]
    lines += ["", *_cost_tables(phase_costs)]
    if unfinished:
        lines += ["", f"## Unfinished ({len(unfinished)}): a state.json but no results.json yet (running or stopped)",
                  ""] + [f"- {path}{_progress(path)}" for path in unfinished]
    return "\n".join(lines) + "\n"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _paper_text(paper: Paper, column: Column, strategy: str) -> str:
    has, value = paper.score(column[1], strategy, column[0])
    return "—" if not has else "n/a" if value is None else f"{value:.1f}"


def _column_notes(table: Table) -> list[str]:
    notes = []
    for column in table.columns:
        runs = [r for r in table.runs if (r.task, r.label) == column]
        test_n = sorted({r.test.get("n") for r in runs} - {None})
        seeds = sorted({r.seed for r in runs})
        offline = any((r.raw.get("data") or {}).get("offline") for r in runs)
        models = sorted({r.model for r in runs})
        notes.append(f"- {column_name(column)}: model {', '.join(f'`{m}`' for m in models)}; test n="
                     f"{'/'.join(map(str, test_n))}; seeds {', '.join(map(str, seeds))}"
                     + ("; data: **OFFLINE stand-in**, not the paper's data" if offline else ""))
    return notes


def _steps_table(table: Table, column: Column) -> list[str]:
    depth = max((i for (c, _, i) in table.steps if c == column), default=0)
    lines = [f"**{column_name(column)}**", "",
             _row(["strategy", "step 0 (vanilla)", *(f"step {i}" for i in range(1, depth + 1)), "test"]),
             _row(["---"] + ["---:"] * (depth + 2))]
    for strategy in table.strategies:
        if (column, strategy) not in table.test:
            continue
        cells = [table.steps.get((column, strategy, i), Stat([], [])).text(with_n=False) for i in range(depth + 1)]
        lines.append(_row([strategy, *cells, table.test[(column, strategy)].text()]))
    return lines


def _cost_tables(phase_costs: list[costs.PhaseCost]) -> list[str]:
    lines = ["## Costs", "", "Per phase (mean of one phase; each computed step once, reuses not counted again):", "",
             _row(["task · model", "phase", "computed", "wall s", "CPU-s", "GPU-s", "generated tok", "trained tok"]),
             _row(["---", "---"] + ["---:"] * 6)]
    by_phase = costs.per_phase(phase_costs)
    for (task, model, phase), mean in sorted(by_phase.items(), key=lambda kv: (kv[0][:2], _rank(kv[0][2],
                                                                                                costs.PHASES))):
        lines.append(_row([column_name((task, model)), costs.PHASE_NAMES.get(phase, phase), str(mean.count),
                           *_mean_cells(mean)]))
    lines += ["", "Per strategy (mean of one run: its steps and test evaluation; steps it reused from another "
                  "run at their recorded cost):", "",
              _row(["task · model", "strategy", "runs", "wall s", "CPU-s", "GPU-s", "generated tok", "trained tok",
                    "reused steps"]),
              _row(["---", "---"] + ["---:"] * 7)]
    by_strategy = costs.per_strategy(phase_costs)
    for (task, model, strategy), (mean, reused) in sorted(
            by_strategy.items(), key=lambda kv: (kv[0][:2], _rank(kv[0][2], STRATEGY_ORDER), kv[0][2])):
        lines.append(_row([column_name((task, model)), strategy, str(mean.count), *_mean_cells(mean), str(reused)]))
    total = costs.total(phase_costs)
    untimed = sum(1 for c in phase_costs if c.phase == "test" and not c.wall_s)
    lines += ["", f"**Total** (each computed step once): {total['wall_s'] / 3600:.2f} h of phase wall time, "
                  f"{total['cpu_s'] / 3600:.2f} CPU-hours, {total['gpu_s'] / 3600:.2f} GPU-hours, "
                  f"{total['generated_tokens']:.0f} generated and {total['trained_tokens']:.0f} trained tokens.",
              "", f"*Resource-seconds*: {costs.FORMULA}"]
    if untimed:
        lines += ["", f"{untimed} run(s) did not record their test evaluation's time (results.json written before "
                      f"bt-ray recorded it): counted as 0."]
    return lines


def _mean_cells(mean: costs.Mean) -> list[str]:
    return [f"{mean.wall_s:.0f}", f"{mean.cpu_s:.0f}", f"{mean.gpu_s:.0f}", f"{mean.generated_tokens:.0f}",
            f"{mean.trained_tokens:.0f}"]


def _progress(run_dir: Path) -> str:
    try:
        steps = json.loads((run_dir / "state.json").read_text()).get("steps", [])
    except (OSError, json.JSONDecodeError):
        return ""
    return f" ({len(steps)} step(s) finished)"


# ---------------------------------------------------------------- CSV


def write_csvs(table: Table, paper: Paper, phase_costs: list[costs.PhaseCost], out: Path) -> None:
    rows = []
    for column in table.columns:
        models = sorted({r.model for r in table.runs if (r.task, r.label) == column})
        for strategy in table.strategies:
            stat = table.test.get((column, strategy))
            if stat is None:
                continue
            has, value = paper.score(column[1], strategy, column[0])
            rows.append({"task": column[0], "model": column[1], "model_name": ";".join(models),
                         "strategy": strategy, **_stat_fields(stat), "paper": "" if value is None else value,
                         "paper_has_cell": has})
    _write(out / "table1.csv", rows)
    _write(out / "steps.csv", [
        {"task": c[0], "model": c[1], "strategy": s, "step": i, **_stat_fields(stat)}
        for (c, s, i), stat in sorted(table.steps.items(), key=lambda kv: (table.columns.index(kv[0][0]),
                                                                          table.strategies.index(kv[0][1]), kv[0][2]))])
    _write(out / "costs.csv", [c.row() for c in phase_costs])


def _stat_fields(stat: Stat) -> dict[str, Any]:
    return {"mean": "" if stat.mean is None else round(stat.mean, 3),
            "std": "" if stat.std is None else round(stat.std, 3),
            "n": stat.n, "seeds": " ".join(map(str, stat.seeds))}


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- the command


@dataclass
class Report:
    table: Table
    paper: Paper
    costs: list[costs.PhaseCost]
    unfinished: list[Path]
    markdown: str
    out: Path


def _local_copy(root: str | Path) -> str | Path:
    """A run or sweep in an object store (output_dir=s3://...): its results, states and configs, downloaded."""
    from bt_ray import storage

    if not storage.is_uri(str(root)):
        return root
    local = storage.local_run_dir(str(root).rstrip("/"), "report-input")
    shutil.rmtree(local, ignore_errors=True)
    count = storage.pull_named(str(root), ("results.json", "state.json", "config.yaml", "sweep.json"), local)
    logger.info("downloaded %d results/state/config files of %s into %s", count, storage.redact(str(root)), local)
    return local


def make_report(root: str | Path, paper_path: str | Path | None = None, out: str | Path | None = None,
                extra_models: dict[str, str] | None = None) -> Report:
    """Read every results.json under `root`, write table1.md, the CSVs and the plots into `out`."""
    from bt_ray import plots

    paper = load_paper(paper_path)
    root = _local_copy(root)
    runs, unfinished = find_runs(root, {**paper.models, **(extra_models or {})})
    table = aggregate(runs)
    phase_costs = costs.phase_costs(runs)
    out = Path(out).expanduser() if out else Path(root).expanduser() / "report"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(table, paper, phase_costs, unfinished)
    (out / "table1.md").write_text(text)
    write_csvs(table, paper, phase_costs, out)
    plots.plot_scores(table, paper, out / "scores.png")
    plots.plot_phases(table, out / "phases.png")
    logger.info("report of %d run(s) (%d unfinished) in %s", len(runs), len(unfinished), out)
    return Report(table, paper, phase_costs, unfinished, text, out)
