"""bt-ray sweep without Ray or a model: the sweep file, the grid, prefix sharing, rerun decisions, scheduling."""

import json
from pathlib import Path

import pytest
import yaml

from bt_ray import scheduler
from bt_ray.cli import main
from bt_ray.config import save_config
from bt_ray.state import check_resumable
from bt_ray.errors import ConfigError
from bt_ray.scheduler import SweepRun
from bt_ray.state import RunState, StepRecord
from bt_ray.sweep import cell_name, decide, load_sweep, plan_text, seed_from_parent

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER = ["vanilla", "p", "w", "p -> p", "w -> w", "p -> w", "w -> p", "p -> w -> p"]


def write_sweep(tmp_path, **keys):
    body = {"name": "t", "output_dir": str(tmp_path / "out"), "tasks": {"iris": {"config": str(CONFIGS / "iris.yaml")}},
            "models": {"smol": "smollm2-135m"}, "strategies": ["p", "p -> p"], "seeds": [0, 1], **keys}
    body = {k: v for k, v in body.items() if v is not None}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_the_cpu_sweep_expands_to_named_cells_with_every_override(tmp_path):
    sweep = load_sweep(CONFIGS / "sweep_cpu.yaml", [f"output_dir={tmp_path}", "train.epochs=3"])
    assert [c.name for c in sweep.cells] == ["iris-smollm2-135m-p-s0", "iris-smollm2-135m-p-s1",
                                             "iris-smollm2-135m-p_w-s0", "iris-smollm2-135m-p_w-s1"]
    cell = sweep.cell("iris-smollm2-135m-p_w-s1")
    cfg = cell.config
    assert (cfg.strategy, cfg.seed, cfg.name, cfg.model.name) == ("p -> w", 1, cell.name, "smollm2-135m")
    assert cell.run_dir == tmp_path / "sweep-cpu" / "cells" / cell.name
    assert cfg.task.dev_size == 20 and cfg.prompt.val_size == 12  # the sweep's overrides
    assert cfg.train.epochs == 3  # the command line's, over the sweep's 2
    assert cell.need == {"CPU": 1.0, "GPU": 0.0} and sweep.max_concurrent == 2


def test_task_overrides_come_after_the_sweeps_and_nested_mappings_work(tmp_path):
    path = write_sweep(tmp_path, overrides={"train": {"epochs": 2}, "task.dev_size": 10},
                       tasks={"a": {"config": str(CONFIGS / "iris.yaml"), "overrides": {"task.dev_size": 7}},
                              "b": {"config": str(CONFIGS / "iris.yaml")}})
    sweep = load_sweep(path)
    dev = {c.task: c.config.task.dev_size for c in sweep.cells}
    assert dev == {"a": 7, "b": 10} and all(c.config.train.epochs == 2 for c in sweep.cells)
    # Different task configs never share steps, even for the same strategy prefix.
    assert all(sweep.cell(c.parent).task == c.task for c in sweep.cells if c.parent)


def test_prefix_plan_of_the_papers_eight_strategies(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, strategies=PAPER, seeds=[0, 1]))
    parents = {c.name: c.parent for c in sweep.cells if c.seed == 0}
    name = lambda s: None if s is None else cell_name("iris", "smol", s, 0)  # noqa: E731
    expected = {(): None, ("p",): (), ("w",): (), ("p", "p"): ("p",), ("w", "w"): ("w",), ("p", "w"): ("p",),
                ("w", "p"): ("w",), ("p", "w", "p"): ("p", "w")}
    assert parents == {name(k): name(v) for k, v in expected.items()}
    assert all(sweep.cell(c.parent).seed == c.seed for c in sweep.cells if c.parent)  # seeds never share
    # Alone, each cell computes step 0 and all its steps (21 per seed); shared, each computes one new step.
    assert "steps to compute: 16 with prefix sharing, 42 without" in plan_text(sweep)


def test_a_config_difference_beyond_strategy_stops_sharing(tmp_path):
    path = write_sweep(tmp_path, strategies=["p", "p -> w"], seeds=[0],
                       tasks={"a": {"config": str(CONFIGS / "iris.yaml")},
                              "b": {"config": str(CONFIGS / "iris.yaml"), "overrides": {"inference.replicas": 2}}})
    sweep = load_sweep(path)
    # inference.replicas changes speed, not results (state.EXECUTION_ONLY): b's p -> w still shares b's p.
    assert sweep.cell("b-smol-p_w-s0").parent == "b-smol-p-s0"


@pytest.mark.parametrize("keys, message", [
    ({"strategy": ["p"]}, "strategy: unknown sweep key; did you mean 'strategies'?"),
    ({"seeds": None}, "seeds: missing"),
    ({"strategies": ["p", "p -> q"]}, "strategies[1]: step 2 of 'p -> q'"),
    ({"strategies": ["p", "Π"]}, "strategies[1]: 'Π' is listed twice"),
    ({"seeds": [0, "one"]}, "seeds: must be a non-empty list of whole numbers"),
    ({"tasks": {"iris": {"config": "nope.yaml"}}}, "tasks.iris.config: 'nope.yaml' does not exist"),
    ({"tasks": {"iris": "iris.yaml"}}, "tasks.iris: must be {config:"),
    ({"overrides": {"seed": 3}}, "overrides: seed is set by the sweep's grid for each cell; edit the sweep's seeds"),
    ({"models": {"a b": "smollm2-135m"}}, "models.a b: 'a b' must be a short name"),
    ({"max_concurrent": 0}, "max_concurrent: must be a whole number >= 1"),
    ({"output_dir": "s3://bucket/runs"}, "output_dir: s3://bucket/runs is an object-store URI; bt-ray sweep needs"),
    ({"overrides": {"train.epochs": 0}}, "train.epochs: must be >= 1"),
    ({"tasks": {"iris": {"config": str(CONFIGS / "iris.yaml")}, "iris-a": {"config": str(CONFIGS / "iris.yaml")}},
      "models": {"a-m": "smollm2-135m", "m": "smollm2-135m"}},
     "cell 'iris-a-m-p-s0' comes from both tasks.iris x models.a-m and tasks.iris-a x models.m"),
])
def test_bad_sweep_files_name_the_key(tmp_path, keys, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path, **keys))
    assert message in str(err.value)


def test_grid_keys_are_refused_on_the_command_line_and_bad_cells_are_reported_once(tmp_path):
    with pytest.raises(ConfigError, match="strategy=p.*edit the sweep's strategies"):
        load_sweep(write_sweep(tmp_path), ["strategy=p"])
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path), ["train.epoch=2"])
    assert len(err.value.problems) == 1 and "train.epoch: unknown key" in err.value.problems[0]
    assert err.value.problems[0].endswith("(in every cell)")
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 cells (1 tasks x 1 models x 2 strategies x 2 seeds)" in out
    assert "iris-smol-p_p-s1" in out and "iris-smol-p-s1 (reuses steps 0-1)" in out and "2 CPU" in out
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    # key=value after a flag is an override as well; anything else after it is refused by argparse
    assert main(["sweep", str(path), "--dry-run", "seeds=[0]"]) == 2  # a grid key, refused by the sweep
    assert "seeds" in capsys.readouterr().err
    assert main(["sweep", str(path), "--dry-run", "train.epochs=3"]) == 0
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--dry-run", "stray"])


# ---------------------------------------------------------------- rerun decisions and seeding


def fake_finished_run(cell, steps, test=True, adapter=False):
    """What a finished `bt-ray run` leaves on disk (a fake: no model ran)."""
    run_dir = cell.run_dir
    records = []
    for index, code in enumerate(steps):
        step_dir = run_dir / "steps" / f"{index:02d}-{code}"
        step_dir.mkdir(parents=True)
        (step_dir / "program.json").write_text(json.dumps({"step": index}))
        adapter_dir = None
        if code == "w" and adapter:
            adapter_dir = step_dir / f"{cell.name}-v1" / "adapter"
            adapter_dir.mkdir(parents=True)
            (adapter_dir / "adapter_model.safetensors").write_bytes(b"weights")
        records.append(StepRecord(index, code, " -> ".join(steps[1:index + 1]) or "vanilla",
                                  f"{cell.name}-v1" if adapter_dir else None, str(step_dir / "program.json"),
                                  str(adapter_dir) if adapter_dir else None, {"score": 10.0 * index, "n": 4,
                                                                                "errors": 0}, wall_s=1.0))
    state = RunState(run_dir)
    state.steps, state.test = records, ({"score": 50.0, "step": len(steps) - 1} if test else None)
    state.save()
    save_config(cell.config, run_dir / "config.yaml")
    save_config(cell.config, run_dir / "cell.yaml")
    if test:
        (run_dir / "results.json").write_text(json.dumps({"steps": [{"dev": r.dev["score"]} for r in records],
                                                          "test": state.test}))


def test_rerun_decisions_from_the_run_dir(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    root, child = sweep.cell("iris-smol-p-s0"), sweep.cell("iris-smol-p_p-s0")
    assert decide(root).action == "fresh" and decide(child).action == "seed"
    fake_finished_run(root, ["vanilla", "p"], test=False)
    assert decide(root).action == "resume" and "2 of 2 steps" in decide(root).detail
    (root.run_dir / "results.json").write_text(json.dumps({"test": {"score": 1.0}}))
    assert decide(root).action == "done"
    changed = load_sweep(write_sweep(tmp_path, overrides={"prompt.num_candidates": 4})).cell(root.name)
    conflict = decide(changed)
    assert conflict.action == "conflict" and "prompt.num_candidates" in conflict.detail
    faster = load_sweep(write_sweep(tmp_path, overrides={"inference.replicas": 2})).cell(root.name)
    assert decide(faster).action == "done"  # a key that does not change results


def test_seeding_copies_the_parents_steps_and_the_child_resumes_after_them(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, strategies=["w", "w -> p"], seeds=[0]))
    parent, child = sweep.cell("iris-smol-w-s0"), sweep.cell("iris-smol-w_p-s0")
    fake_finished_run(parent, ["vanilla", "w"], adapter=True)
    reused = seed_from_parent(child, parent)
    assert reused == [{"step": 0, "strategy": "vanilla", "from": parent.name},
                      {"step": 1, "strategy": "w", "from": parent.name}]
    state = RunState.open(child.run_dir, child.config, resume=True)  # the child's config resumes the parent's
    check_resumable(state, ("w", "p"), "w -> p")
    assert [s.reused_from for s in state.steps] == [parent.name, parent.name]
    w = state.finished(1)
    assert w.version == f"{parent.name}-v1"  # the adapter keeps the version name it was loaded under
    assert Path(w.adapter_dir).is_relative_to(child.run_dir) and Path(w.program_path).is_relative_to(child.run_dir)
    assert (Path(w.adapter_dir) / "adapter_model.safetensors").read_bytes() == b"weights"
    events = [json.loads(line) for line in (child.run_dir / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "reused" and events[0]["from"] == parent.name
    # A grandchild records the run that computed each step, not the one it copied from.
    deeper = load_sweep(write_sweep(tmp_path, strategies=["w", "w -> p", "w -> p -> p"], seeds=[0]))
    grandchild = deeper.cell("iris-smol-w_p_p-s0")
    fake_state = RunState.open(child.run_dir, child.config, resume=True)
    fake_state.add(StepRecord(2, "p", "w -> p", w.version, str(child.run_dir / "steps/02-p/program.json")))
    (child.run_dir / "steps/02-p").mkdir(parents=True)
    (child.run_dir / "steps/02-p/program.json").write_text("{}")
    assert [r["from"] for r in seed_from_parent(grandchild, child)] == [parent.name, parent.name, child.name]


# ---------------------------------------------------------------- scheduling (fake cell processes)


class FakeCellProcess:
    """A fake `bt-ray run` subprocess: finishes on its second poll, leaving a finished (or failed) run."""

    running = 0
    most = 0
    fail: set = set()

    def __init__(self, command, **kwargs):
        self.config_path = Path(command[4])
        self.name = self.config_path.parent.name
        self.polls, self.returncode, self.pid = 0, None, 0
        FakeCellProcess.running += 1
        FakeCellProcess.most = max(FakeCellProcess.most, FakeCellProcess.running)

    def poll(self):
        self.polls += 1
        if self.polls < 2:
            return None
        FakeCellProcess.running -= 1
        run_dir = self.config_path.parent
        if self.name in self.fail:
            (run_dir / "events.jsonl").open("a").write(json.dumps(
                {"time": 1e12, "event": "failed", "step": 1, "strategy": "p", "error": "EngineError: replica-0 died"})
                + "\n")
            self.returncode = 1
            return 1
        cfg = yaml.safe_load(self.config_path.read_text())
        steps = ["vanilla", *[s.strip() for s in cfg["strategy"].split("->")]]
        state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {"steps": []}
        done = {s["index"]: s for s in state["steps"]}
        records = [done.get(i) or {"index": i, "code": c, "strategy": c, "version": None, "program_path": "x",
                                   "dev": {"score": 5.0 * i}, "reused_from": None} for i, c in enumerate(steps)]
        (run_dir / "state.json").write_text(json.dumps({"steps": records, "test": {"score": 42.0}}))
        (run_dir / "config.yaml").write_text(self.config_path.read_text())
        (run_dir / "results.json").write_text(json.dumps({"steps": [{"dev": r["dev"]["score"]} for r in records],
                                                          "test": {"score": 42.0}}))
        self.returncode = 0
        return 0


def run_fake_sweep(monkeypatch, sweep, totals, fail=()):
    monkeypatch.setattr(scheduler.subprocess, "Popen", FakeCellProcess)
    monkeypatch.setattr(scheduler, "POLL_S", 0)
    FakeCellProcess.running, FakeCellProcess.most, FakeCellProcess.fail = 0, 0, set(fail)
    lines = []
    run = SweepRun(sweep, echo=lines.append)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    run._loop(totals, "fake-address")
    run._save()
    return run, lines


def test_cells_run_as_resources_fit_and_children_start_from_their_parents(tmp_path, monkeypatch):
    sweep = load_sweep(write_sweep(tmp_path, strategies=["p", "p -> p", "p -> w"], seeds=[0, 1, 2]))
    run, lines = run_fake_sweep(monkeypatch, sweep, {"CPU": 4.0, "GPU": 0.0})  # each cell holds 2 CPUs
    assert FakeCellProcess.most == 2
    assert all(r.status == "done" and r.test == 42.0 for r in run.rows.values())
    assert len(lines) == 9 and all("done" in line and "test 42.0%" in line for line in lines)
    child = run.rows["iris-smol-p_w-s2"]
    assert child.reused == [{"step": 0, "strategy": "vanilla", "from": "iris-smol-p-s2"},
                            {"step": 1, "strategy": "p", "from": "iris-smol-p-s2"}]
    saved = json.loads((sweep.dir / "sweep.json").read_text())
    assert [c["name"] for c in saved["cells"]] == [c.name for c in sweep.cells]
    summary = run.summary()
    assert "| iris-smol-p_w-s2 | done | 0.0* → 5.0* → 10.0 | 42.0 |" in summary
    assert "9 cells: 9 done; 12 steps computed, 12 reused" in summary


def test_a_failed_cell_is_recorded_and_blocks_only_its_dependants(tmp_path, monkeypatch):
    sweep = load_sweep(write_sweep(tmp_path, strategies=["p", "p -> p"], seeds=[0, 1], max_concurrent=1))
    run, lines = run_fake_sweep(monkeypatch, sweep, {"CPU": 8.0, "GPU": 0.0}, fail={"iris-smol-p-s0"})
    assert FakeCellProcess.most == 1  # max_concurrent
    status = {name: row.status for name, row in run.rows.items()}
    assert status == {"iris-smol-p-s0": "failed", "iris-smol-p-s1": "done", "iris-smol-p_p-s0": "blocked",
                      "iris-smol-p_p-s1": "done"}
    failed = run.rows["iris-smol-p-s0"]
    assert failed.error == "step 1 (p) failed: EngineError: replica-0 died" and failed.log_tail
    assert "its prefix cell iris-smol-p-s0 failed" in run.rows["iris-smol-p_p-s0"].error
    assert any(line.startswith("[1/4]  failed") and "replica-0 died" in line for line in lines)


def test_a_cell_larger_than_the_cluster_fails_naming_the_keys(tmp_path, monkeypatch):
    sweep = load_sweep(write_sweep(tmp_path, seeds=[0]), ["inference.replicas=3"])
    run = SweepRun(sweep, echo=lambda line: None)
    sweep.dir.mkdir(parents=True)
    run._refuse_oversized({"CPU": 2.0, "GPU": 0.0})
    assert all(r.status == "failed" and "inference.replicas" in r.error for r in run.rows.values())


def test_a_run_totals_only_the_steps_it_computed():
    from bt_ray.report import _totals
    from bt_ray.state import StepRecord

    def step(i, reused_from=None):
        return StepRecord(i, "p", "p", None, "", wall_s=10.0 * (i + 1), usage={"requests": 5, "generated_tokens": 50},
                          trained_tokens=7, reused_from=reused_from)

    totals = _totals([step(0, "parent"), step(1, "parent"), step(2)])  # steps 0, 1 computed by the parent cell
    assert totals == {"wall_s": 30.0, "requests": 5, "generated_tokens": 50, "trained_tokens": 7, "reused_steps": 2}
