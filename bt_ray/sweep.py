"""Sweeps: a grid of tasks x models x strategies x seeds, each cell one `bt-ray run`.

    bt-ray sweep configs/sweep_cpu.yaml                  run (or continue) every cell
    bt-ray sweep configs/paper_table1.yaml --dry-run     the cells, what they share, what each needs

    <output_dir>/<sweep name>/
      sweep.json            every cell: status, run dir, reused steps, wall time, test score, error + log tail
      summary.md            the summary table printed at the end
      cells/<cell>/         an ordinary run dir (results.json, state.json, ...), plus cell.yaml and log.txt

Prefix sharing: cells of one task, model and seed whose configs differ only in the strategy (and other
keys that do not change results, state.EXECUTION_ONLY) share steps. A cell starts from the finished
steps of the cell whose strategy is its longest proper prefix in the grid (`vanilla` is the empty
strategy, so `p`, `p -> w`, `p -> w -> p` compute step 0 once and the first Π once); those steps are
copied into its run dir with `reused_from` naming the run that computed them, and it resumes.
This module is the plan (parsing, grid, sharing, what to do with each cell); scheduler.py runs it.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bt_ray.config import RunConfig, load_config, read_mapping, save_config, to_dict
from bt_ray.errors import ConfigError
from bt_ray.inference.placement import resource_need
from bt_ray.model import check_model
from bt_ray.storage import is_uri, redact
from bt_ray.state import EXECUTION_ONLY, StepRecord, _flatten
from bt_ray.strategy import StrategyError, format_strategy, parse_strategy

SWEEP_KEYS = ("name", "overrides", "tasks", "models", "strategies", "seeds", "output_dir", "max_concurrent", "paper")
REQUIRED = ("name", "tasks", "models", "strategies", "seeds")
# Keys each cell gets from the grid: overrides may not set them.
GRID_KEYS = ("name", "strategy", "seed", "model.name", "output_dir")
CELL_CONFIG = "cell.yaml"  # the config the sweep starts a cell with (its run dir's config.yaml is the resolved one)
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Cell:
    name: str  # <task>-<model>-<strategy>-s<seed>, also its run name
    task: str  # task label
    model: str  # model label
    strategy: tuple[str, ...]
    seed: int
    config: RunConfig
    parent: str | None = None  # the cell whose finished steps this one starts from

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def need(self) -> dict[str, float]:
        return resource_need(self.config)

    def share_key(self) -> tuple:
        """Cells with equal keys compute the same steps for the same strategy prefix."""
        flat = _flatten(to_dict(self.config))
        return tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in EXECUTION_ONLY))


@dataclass
class Sweep:
    name: str
    path: Path
    output_dir: Path
    max_concurrent: int | None
    cells: list[Cell] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.output_dir / self.name

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


# ---------------------------------------------------------------- loading


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read a sweep file, apply `key=value` overrides to every cell, expand the grid, plan the sharing.

    `output_dir=` and `max_concurrent=` on the command line set the sweep's own keys. Raises ConfigError
    listing every problem, each naming its key, before anything runs.
    """
    path = Path(path)
    raw = _read(path)
    problems: list[str] = []
    for key in raw:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            problems.append(f"{key}: unknown sweep key{f'; did you mean {close[0]!r}?' if close else ''} "
                            f"(valid: {', '.join(SWEEP_KEYS)})")
    problems += [f"{key}: missing; a sweep file needs {', '.join(REQUIRED)} (see configs/sweep_cpu.yaml)"
                 for key in REQUIRED if key not in raw]
    cli = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() in ("output_dir", "max_concurrent"):
            raw[key.strip()] = yaml.safe_load(value) if value.strip() else None
        else:
            cli.append(item)
    if problems:
        raise ConfigError(problems)
    name = _label(raw["name"], "name", problems)
    common = _overrides(raw.get("overrides") or {}, "overrides", problems)
    cli = _check_cli(cli, problems)
    tasks = _tasks(raw["tasks"], path.parent, problems)
    models = _mapping(raw["models"], "models", problems)
    for label, model in models.items():
        if not isinstance(model, str) or not model:
            problems.append(f"models.{label}: must be a model.name (smollm2-135m, a local dir or org/name), "
                            f"got {model!r}")
    strategies = _strategies(raw["strategies"], problems)
    seeds = _seeds(raw["seeds"], problems)
    output_dir = raw.get("output_dir", "runs")
    if not isinstance(output_dir, str) or not output_dir:
        problems.append(f"output_dir: must be a directory path, got {output_dir!r}")
    elif is_uri(output_dir):  # the sweep seeds and reads cells' run dirs as files
        problems.append(f"output_dir: {redact(output_dir)} is an object-store URI; bt-ray sweep needs a path (on a "
                        f"cluster of several nodes a shared filesystem at the same path on every node, e.g. "
                        f"/mnt/bt-ray/runs); a single bt-ray run takes a URI")
    limit = raw.get("max_concurrent")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        problems.append(f"max_concurrent: must be a whole number >= 1, or null for as many as the cluster fits, "
                        f"got {limit!r}")
    if problems:
        raise ConfigError(problems)
    sweep = Sweep(name, path, Path(output_dir).expanduser().resolve(), limit)
    sweep.cells = _grid(sweep, tasks, models, strategies, seeds, common, cli)
    plan_sharing(sweep.cells)
    return sweep


def _read(path: Path) -> dict:
    return read_mapping(path, "sweep file", "shipped sweeps are configs/sweep_*.yaml",
                        "a mapping (name, tasks, models, strategies, seeds)")


def _label(value: Any, key: str, problems: list[str]) -> str:
    if not isinstance(value, str) or not _LABEL.match(value):
        problems.append(f"{key}: {value!r} must be a short name of letters, digits, '.', '_' or '-' "
                        f"(it names directories)")
        return "invalid"
    return value


def _mapping(value: Any, key: str, problems: list[str]) -> dict:
    if not isinstance(value, dict) or not value:
        problems.append(f"{key}: must be a non-empty mapping of label -> value, got {value!r}")
        return {}
    for label in value:
        _label(label, f"{key}.{label}", problems)
    return value


def _overrides(tree: Any, key: str, problems: list[str], prefix: str = "") -> list[str]:
    """A mapping (nested or with dotted keys) as `dotted.key=value` strings, refusing the grid's own keys."""
    if not isinstance(tree, dict):
        problems.append(f"{key}: must be a mapping of dotted.key: value, got {tree!r}")
        return []
    out = []
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            out += _overrides(value, key, problems, dotted + ".")
        elif dotted in GRID_KEYS:
            problems.append(f"{key}: {dotted} is set by the sweep's grid for each cell; edit the sweep's "
                            f"{_grid_home(dotted)} instead")
        else:
            out.append(f"{dotted}={json.dumps(value)}")
    return out


def _check_cli(items: list[str], problems: list[str]) -> list[str]:
    for item in items:
        key = item.partition("=")[0].strip()
        if key in GRID_KEYS:
            problems.append(f"override {item!r}: {key} is set by the sweep's grid; edit the sweep's "
                            f"{_grid_home(key)} instead")
    return items


def _grid_home(key: str) -> str:
    return {"strategy": "strategies", "seed": "seeds", "model.name": "models"}.get(key, f"{key} (top level)")


def _tasks(value: Any, base: Path, problems: list[str]) -> dict[str, tuple[Path, list[str]]]:
    tasks = {}
    for label, spec in _mapping(value, "tasks", problems).items():
        key = f"tasks.{label}"
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), str):
            problems.append(f"{key}: must be {{config: <run config, relative to the sweep file>, overrides: "
                            f"{{...}}}}, got {spec!r}")
            continue
        for extra in set(spec) - {"config", "overrides"}:
            problems.append(f"{key}.{extra}: unknown key (valid: config, overrides)")
        config = (base / spec["config"]).resolve()
        if not config.is_file():
            problems.append(f"{key}.config: {spec['config']!r} does not exist (looked for {config}); paths are "
                            f"relative to the sweep file")
        tasks[label] = (config, _overrides(spec.get("overrides") or {}, f"{key}.overrides", problems))
    return tasks


def _strategies(value: Any, problems: list[str]) -> list[tuple[str, ...]]:
    if not isinstance(value, list) or not value:
        problems.append(f"strategies: must be a non-empty list such as [vanilla, p, 'p -> w'], got {value!r}")
        return []
    out = []
    for i, text in enumerate(value):
        try:
            steps = parse_strategy(text)
        except StrategyError as exc:
            problems.append(f"strategies[{i}]: {exc}")
            continue
        if steps in out:
            problems.append(f"strategies[{i}]: {text!r} is listed twice")
        out.append(steps)
    return out


def _seeds(value: Any, problems: list[str]) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                          for s in value):
        problems.append(f"seeds: must be a non-empty list of whole numbers such as [0, 1, 2], got {value!r}")
        return []
    if len(set(value)) != len(value):
        problems.append(f"seeds: {value} lists a seed twice")
    return value


def status_rows(path: Path) -> dict[str, dict[str, Any]]:
    """sweep.json's rows by cell name; none if it is absent or damaged."""
    try:
        return {row["name"]: row for row in json.loads(path.read_text())["cells"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def cell_name(task: str, model: str, strategy: tuple[str, ...], seed: int) -> str:
    """iris-smollm2-135m-p_w_p-s0"""
    return f"{task}-{model}-{'_'.join(strategy) or 'vanilla'}-s{seed}"


def _grid(sweep: Sweep, tasks: dict, models: dict, strategies: list, seeds: list, common: list[str],
          cli: list[str]) -> list[Cell]:
    cells, problems = [], {}  # problem -> the task x model pairs it occurs in
    cells_dir = sweep.dir / "cells"
    named: dict[str, str] = {}  # cell name -> the labels that gave it (labels may contain '-')
    for task, (config_path, task_overrides) in tasks.items():
        for model, model_name in models.items():
            for strategy in strategies:
                for seed in seeds:
                    name = cell_name(task, model, strategy, seed)
                    where = f"tasks.{task} x models.{model}"
                    if named.setdefault(name, where) != where:
                        problems.setdefault(f"cell {name!r} comes from both {named[name]} and {where} (one run "
                                            f"dir for two cells); rename one of those labels", {})
                        continue
                    grid = [f"model.name={json.dumps(model_name)}", f"seed={seed}", f"name={name}",
                            f"strategy={json.dumps(format_strategy(strategy))}",
                            f"output_dir={json.dumps(str(cells_dir))}"]
                    # The task's config, then the sweep's overrides, the task's, the command line's, the grid's.
                    items = [*common, *task_overrides, *cli, *grid]
                    try:
                        config = load_config(config_path, items)
                    except ConfigError as exc:
                        for problem in exc.problems:
                            problems.setdefault(problem, {})[f"tasks.{task} x models.{model}"] = None
                        continue
                    cells.append(Cell(name, task, model, strategy, seed, config))
    if problems:
        every = len(tasks) * len(models)
        raise ConfigError([p if not where else f"{p} (in every cell)" if len(where) == every else
                           f"{p} (in {', '.join(where)})" for p, where in problems.items()])
    return cells


# ---------------------------------------------------------------- sharing


def plan_sharing(cells: list[Cell]) -> None:
    """Each cell's parent: the cell of the same share key whose strategy is its longest proper prefix."""
    by_key: dict[tuple, dict[tuple, Cell]] = {}
    for cell in cells:
        by_key.setdefault((cell.seed, cell.share_key()), {})[cell.strategy] = cell
    for cell in cells:
        group = by_key[(cell.seed, cell.share_key())]
        cell.parent = next((group[cell.strategy[:k]].name for k in range(len(cell.strategy) - 1, -1, -1)
                            if cell.strategy[:k] in group), None)


def shared_steps(sweep: Sweep, cell: Cell) -> int:
    """How many of the cell's steps (step 0 included) its parent computes for it."""
    return len(sweep.cell(cell.parent).strategy) + 1 if cell.parent else 0


# ---------------------------------------------------------------- what to do with a cell


@dataclass
class Decision:
    action: str  # done: finished earlier, skip | resume: continue its run dir | seed: start from its parent's
    #              steps | fresh: start from scratch | conflict: its dir holds another config's run
    detail: str = ""


def decide(cell: Cell) -> Decision:
    """What rerunning the sweep does with this cell, from its run dir alone."""
    run_dir = cell.run_dir
    results = run_dir / "results.json"
    if (run_dir / "state.json").exists():
        changed = _changed_keys(run_dir / CELL_CONFIG, cell.config)
        if changed:
            return Decision("conflict", f"{run_dir} holds a run made with other values of {', '.join(changed)}; "
                                        f"delete that directory or give the sweep another output_dir")
        if results.exists() and json.loads(results.read_text()).get("test"):
            return Decision("done", "finished earlier")
        done = json.loads((run_dir / "state.json").read_text())["steps"]
        return Decision("resume", f"{len(done)} of {len(cell.strategy) + 1} steps finished")
    if cell.parent:
        return Decision("seed", f"starts from {cell.parent}")
    return Decision("fresh")


def _changed_keys(saved_path: Path, config: RunConfig) -> list[str]:
    """Keys that change results, where the cell's config differs from the one it was last started with."""
    if not saved_path.is_file():
        return []  # not started by a sweep: `bt-ray run --resume` checks it against the run's config.yaml
    old, new = _flatten(yaml.safe_load(saved_path.read_text())), _flatten(to_dict(config))
    return sorted(k for k in set(old) | set(new) if k not in EXECUTION_ONLY and old.get(k) != new.get(k))


def seed_from_parent(cell: Cell, parent: Cell) -> list[dict[str, Any]]:
    """Copy the parent's finished steps into the cell's run dir, marked `reused_from`; the cell then resumes.

    Programs and adapters are copied, so the cell's run dir stands alone. Returns the reused steps.
    """
    state = json.loads((parent.run_dir / "state.json").read_text())
    records = [StepRecord(**s) for s in state["steps"] if s["index"] <= len(parent.strategy)]
    run_dir = cell.run_dir
    tmp = run_dir.with_name(run_dir.name + ".seeding")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for record in records:
        record.program_path = _copy_into(record.program_path, parent.run_dir, tmp, run_dir)
        if record.adapter_dir:
            record.adapter_dir = _copy_into(record.adapter_dir, parent.run_dir, tmp, run_dir)
        record.reused_from = record.reused_from or parent.name
    (tmp / "state.json").write_text(json.dumps({"steps": [asdict(r) for r in records], "test": None}, indent=2))
    # The parent's resolved config (its preflight may have fitted sizes to the data): the resume checks the
    # cell's against it, and they differ only in keys that do not change results (name, strategy, ...).
    shutil.copy2(parent.run_dir / "config.yaml", tmp / "config.yaml")
    reused = [{"step": r.index, "strategy": r.strategy, "from": r.reused_from} for r in records]
    with open(tmp / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": "reused", "from": parent.name, "steps": reused}) + "\n")
    if run_dir.exists():  # only cell.yaml / log.txt of a cell that never got a state
        for item in run_dir.iterdir():
            shutil.move(str(item), tmp / item.name)
        run_dir.rmdir()
    tmp.rename(run_dir)  # a killed seeding never leaves half a state behind
    return reused


def _copy_into(path: str, parent_dir: Path, tmp: Path, run_dir: Path) -> str:
    """Copy a file or directory from the parent's run dir to the same place in the cell's; its new path."""
    source = Path(path)
    try:
        relative = source.resolve().relative_to(parent_dir.resolve())
    except ValueError:
        return path  # outside the parent's run dir (an adapter from elsewhere): keep pointing at it
    target = tmp / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    return str(run_dir / relative)


def reused_steps(cell: Cell) -> list[dict[str, Any]]:
    """Steps of the cell's run that another run computed (from its state.json)."""
    state_file = cell.run_dir / "state.json"
    if not state_file.exists():
        return []
    steps = json.loads(state_file.read_text())["steps"]
    return [{"step": s["index"], "strategy": s["strategy"], "from": s["reused_from"]} for s in steps
            if s.get("reused_from")]


def write_cell_config(cell: Cell) -> Path:
    """The cell's config as the YAML its `bt-ray run` reads."""
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    path = cell.run_dir / CELL_CONFIG
    save_config(cell.config, path)
    return path


# ---------------------------------------------------------------- --dry-run


def plan_text(sweep: Sweep) -> str:
    """The cells, where each starts from, what a rerun does with it, and the resources each holds."""
    cells = sweep.cells
    shape = {"tasks": len({c.task for c in cells}), "models": len({c.model for c in cells}),
             "strategies": len({c.strategy for c in cells}), "seeds": len({c.seed for c in cells})}
    lines = [f"sweep {sweep.name}: {len(cells)} cells (" + " x ".join(f"{n} {k}" for k, n in shape.items()) +
             f") -> {sweep.dir}", ""]
    width = max(len(c.name) for c in cells)
    lines.append(f"{'cell':{width}}  {'needs':16}  {'now':34}  starts from")
    for cell in cells:
        need = ", ".join(f"{v:g} {k}" for k, v in cell.need.items() if v > 0)
        decision = decide(cell)
        now = decision.action if not decision.detail or decision.action == "seed" else \
            f"{decision.action}: {decision.detail}"
        start = "scratch" if not cell.parent else \
            f"{cell.parent} (reuses {_steps_text(shared_steps(sweep, cell))})"
        lines.append(f"{cell.name:{width}}  {need:16}  {now[:34]:34}  {start}")
    alone = sum(len(c.strategy) + 1 for c in cells)
    shared = alone - sum(shared_steps(sweep, c) for c in cells)
    total = {k: sum(c.need[k] for c in cells) for k in ("CPU", "GPU")}
    lines += ["", f"steps to compute: {shared} with prefix sharing, {alone} without (step 0 = the zero-shot "
                  f"baseline counts as a step)",
              f"resources: each cell holds its own replicas and trainer (above); all at once would need "
              f"{total['CPU']:g} CPUs, {total['GPU']:g} GPUs; the sweep runs as many as the cluster fits"
              + (f", at most {sweep.max_concurrent}" if sweep.max_concurrent else "") +
              ", a cell after the one it starts from"]
    models = {(c.config.model.name, c.config.model.cache_dir) for c in cells}
    lines += [f"model: {problem}" for name, cache in sorted(models) if (problem := check_model(name, cache))]
    for conflict in (c for c in cells if decide(c).action == "conflict"):
        lines.append(f"conflict: {conflict.name}: {decide(conflict).detail}")
    return "\n".join(lines)


def _steps_text(n: int) -> str:
    return "step 0" if n == 1 else f"steps 0-{n - 1}"
