"""RunState: what a run has finished, on disk after every phase, so a killed run resumes.

    <run dir>/
      config.yaml           the resolved config
      state.json            finished steps: scores, timings, costs, program and adapter paths
      events.jsonl          one JSON record per phase start/end/failure
      steps/NN-<code>/      program.json (prompts, demos) and, for 'w', the adapter
      cache/                DSPy's response cache for this run (resume re-serves finished calls)
      results.json, results.md, scores.png
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bt_ray.config import RunConfig, save_config, to_dict
from bt_ray.errors import ConfigError
from bt_ray.storage import RunMirror, open_run

# Keys that change how fast a run goes, not what it computes: a resume may change them.
EXECUTION_ONLY = {
    "output_dir", "name", "ray_address", "strategy",
    "inference.replicas", "inference.cpus_per_replica", "inference.gpus_per_replica", "inference.torch_threads",
    "inference.max_batch_size", "inference.batch_wait_ms", "inference.prefix_cache_tokens",
    "inference.max_inflight", "inference.disk_cache", "inference.request_timeout_s", "inference.request_retries",
    "inference.replica_restarts", "inference.continuous_batching", "placement.timeout_s",
    "train.cpus_per_worker", "train.torch_threads", "train.max_failures", "model.cache_dir",
}


@dataclass
class StepRecord:
    index: int  # 0 is the zero-shot baseline
    code: str  # "vanilla", "p" or "w"
    strategy: str  # the strategy up to and including this step, e.g. "p -> w"
    version: str | None  # model version the program runs with after this step (None = base)
    program_path: str
    adapter_dir: str | None = None
    dev: dict[str, Any] = field(default_factory=dict)  # {"score", "n", "errors"}
    wall_s: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)  # pool requests and tokens during the step
    trained_tokens: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    reused_from: str | None = None  # the run that computed this step (a sweep's prefix sharing), None = this run
    resources: dict[str, Any] | None = None  # what the run held while computing it (costs.held); a resume may differ


class RunState:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.steps: list[StepRecord] = []
        self.test: dict[str, Any] | None = None
        self.data: dict[str, Any] | None = None  # Splits.fingerprint() of the data the run was made on
        self.mirror: RunMirror | None = None

    @classmethod
    def open(cls, run_dir: Path, config: RunConfig, resume: bool, steps: tuple[str, ...] | None = None,
             data: dict[str, Any] | None = None) -> "RunState":
        """A fresh state, or the saved one when resuming; refuses to overwrite finished work, and a resume
        whose config, strategy (`steps`, p/w codes) or data (Splits.fingerprint, with BetterTogether's
        optimizer settings) does not continue the saved run, before anything is written."""
        state = cls(run_dir)
        state.mirror = open_run(config.output_dir, run_dir, resume)  # a URI output_dir: pulled, pushed on save
        state_file = run_dir / "state.json"
        if state_file.exists() and not resume:
            raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume to continue it, "
                              f"or choose another name= / output_dir= for a new run")
        if state_file.exists():
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
            _check_compatible(saved, to_dict(config), run_dir)
            saved_state = json.loads(state_file.read_text())
            state.steps = [StepRecord(**s) for s in saved_state["steps"]]
            if steps is not None:
                check_resumable(state, steps, config.strategy)
            _check_same_inputs(saved_state.get("data"), data, run_dir)
            state.data = data or saved_state.get("data")
        elif resume:
            raise ConfigError(f"--resume: {run_dir} holds no run to resume (no state.json); drop --resume to start")
        else:
            state.data = data
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        return state

    def finished(self, index: int) -> StepRecord | None:
        return next((s for s in self.steps if s.index == index), None)

    def add(self, record: StepRecord) -> None:
        self.steps = [s for s in self.steps if s.index != record.index] + [record]
        self.steps.sort(key=lambda s: s.index)
        self.save()

    def save(self) -> None:
        data = {"steps": [asdict(s) for s in self.steps], "test": self.test, "data": self.data}
        tmp = self.run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.run_dir / "state.json")  # atomic: a kill never leaves half a state
        self.sync()

    def sync(self) -> None:
        """Upload what changed to a URI output_dir (nothing to do for a path)."""
        if self.mirror is not None:
            self.mirror.push()

    def event(self, kind: str, **fields: Any) -> None:
        with open(self.run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "event": kind, **fields}) + "\n")

    def step_dir(self, index: int, code: str) -> Path:
        path = self.run_dir / "steps" / f"{index:02d}-{code}"
        path.mkdir(parents=True, exist_ok=True)
        return path


def check_resumable(state: RunState, steps: tuple[str, ...], strategy: str) -> None:
    for record in state.steps:
        if record.index > len(steps) or (record.index and record.code != steps[record.index - 1]):
            raise ConfigError(f"--resume: finished step {record.index} was {record.strategy!r}, which is not a "
                              f"prefix of strategy {strategy!r}; use that strategy or a new name=")


def _check_same_inputs(saved: dict | None, current: dict | None, run_dir: Path) -> None:
    if not saved or not current:
        return  # (a state.json from before bt-ray recorded its data is not checked)
    before, now = saved.get("optimizers") or {}, current.get("optimizers") or {}  # BetterTogether's keys
    # (a run from before bt-ray recorded another teleprompter's settings has its class name only)
    changed = [f"{key}: {before[key]} -> {now[key]}" for key in sorted(set(before) & set(now))
               if before[key] not in (now[key], now[key].split("(")[0])]
    if changed:  # (a key a longer strategy adds is new, not changed)
        raise ConfigError(f"--resume: {run_dir} was made with other optimizer settings ({'; '.join(changed)}); "
                          f"resume with the same ones, or start a new run with another name=")
    if saved.get("digest") == current.get("digest"):
        return

    def said(d: dict) -> str:
        return f"{d.get('source')}, {d.get('train')}/{d.get('dev')}/{d.get('test')} train/dev/test"

    raise ConfigError(f"--resume: {run_dir} was made on other data ({said(saved)}) than it would continue on "
                      f"({said(current)}); its finished steps and a new test score would mix the two. Resume "
                      f"where the data is as it was, or start a new run with another name=")


def _check_compatible(saved: dict, current: dict, run_dir: Path) -> None:
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(k for k in set(old) | set(new) if k not in EXECUTION_ONLY and old.get(k) != new.get(k))
    if changed:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume: {run_dir} was made with a different config ({diffs}); resume with the "
                          f"same values, or start a new run with another name=")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
