"""`bt-ray report`: Table 1, step scores, costs, CSVs and plots from results.json files.

TEST DATA: every results.json here is made up by `write_run` (scores, timings and tokens are invented
numbers chosen so means, deviations and costs can be worked out by hand); none comes from a model.
"""

import csv
import json
import statistics

import pytest

from bt_ray import costs
from bt_ray.cli import main
from bt_ray.errors import ConfigError
from bt_ray.table1 import aggregate, find_runs, load_paper, make_report, model_label

PNG = b"\x89PNG\r\n\x1a\n"
LLAMA3 = "meta-llama/Meta-Llama-3-8B-Instruct"
CONFIG = {  # the resources part of a resolved config: 2 replicas x 1 CPU, training 1 worker x 2 CPUs
    "placement": {"mode": "cpu"},
    "inference": {"replicas": 2, "cpus_per_replica": 1.0, "gpus_per_replica": 0.0, "engine": "transformers"},
    "train": {"num_workers": 1, "cpus_per_worker": 2.0, "use_gpu": False, "epochs": 5},
    "prompt": {"num_candidates": 6, "train_size": 15, "val_size": 35},
}


def step(index, strategy, dev, wall_s, generated, trained=0, train_wall_s=None, reused_from=None, train_total=0):
    row = {"step": index, "strategy": strategy, "version": "base", "dev": dev, "dev_n": 10, "dev_errors": 0,
           "wall_s": wall_s, "requests": 5, "generated_tokens": generated, "trained_tokens": trained,
           "details": {"train": {"wall_s": train_wall_s, "total_tokens": train_total}} if train_wall_s else {}}
    if reused_from is not None:
        row["reused_from"] = reused_from
    return row


def write_run(root, name, task, model, strategy, seed, steps, test_score, test_wall_s=4.0, config=CONFIG):
    run_dir = root / "cells" / name
    run_dir.mkdir(parents=True)
    results = {"run": name, "task": task, "data": {"source": "test data", "offline": False}, "model": model,
               "strategy": strategy, "seed": seed, "steps": steps,
               "test": {"score": test_score, "n": 20, "errors": 0, "step": len(steps) - 1, "strategy": strategy,
                        "wall_s": test_wall_s, "generated_tokens": 7},
               "totals": {}, "config": config}
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "state.json").write_text(json.dumps({"steps": [], "test": None}))
    (run_dir / "config.yaml").write_text("seed: 0\n")
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    """iris x Llama-3-8B: vanilla, Π, Π→Θ over seeds 0 and 1 (Π→Θ reuses Π's first two steps, Π reuses
    vanilla's step 0); gsm8k x smollm2-135m: Π, seed 0 only; and a cell still running."""
    root = tmp_path / "sweep"
    for seed, (v, p, pw) in enumerate([(20.0, 40.0, 45.0), (30.0, 50.0, 65.0)]):
        vanilla = f"iris-vanilla-s{seed}"
        write_run(root, vanilla, "iris", LLAMA3, "vanilla", seed, [step(0, "vanilla", v - 5, 10.0, 100)], v)
        write_run(root, f"iris-p-s{seed}", "iris", LLAMA3, "Π", seed,
                  [step(0, "vanilla", v - 5, 10.0, 100, reused_from=vanilla), step(1, "Π", p - 5, 30.0, 300)], p)
        write_run(root, f"iris-p-w-s{seed}", "iris", LLAMA3, "Π→Θ", seed,
                  [step(0, "vanilla", v - 5, 10.0, 100, reused_from=vanilla),
                   step(1, "Π", p - 5, 30.0, 300, reused_from=f"iris-p-s{seed}"),
                   step(2, "Π→Θ", pw - 5, 50.0, 200, trained=1000, train_wall_s=20.0, train_total=12000)], pw)
    write_run(root, "gsm8k-p-s0", "gsm8k", "smollm2-135m", "Π", 0,
              [step(0, "vanilla", 1.0, 8.0, 80), step(1, "Π", 3.0, 16.0, 160)], 2.0)
    running = root / "cells" / "iris-w-s0"
    running.mkdir(parents=True)
    (running / "config.yaml").write_text("seed: 0\n")
    (running / "state.json").write_text(json.dumps({"steps": [{"index": 0}], "test": None}))
    return root


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_table1_means_stds_and_paper_numbers(sweep, tmp_path):
    report = make_report(sweep)
    table = report.table
    column = ("iris", "llama-3-8b-instruct")  # matched to the paper's label through its public model id
    assert table.columns == [("gsm8k", "smollm2-135m"), column]  # the paper's task order
    assert table.strategies == ["vanilla", "Π", "Π→Θ"]  # the paper's order
    cell = table.test[(column, "Π→Θ")]
    assert cell.values == [45.0, 65.0] and cell.seeds == [0, 1]
    assert cell.mean == pytest.approx(55.0) and cell.std == pytest.approx(statistics.stdev([45.0, 65.0]))
    assert table.steps[(column, "Π→Θ", 1)].mean == pytest.approx(40.0)  # (35 + 45) / 2
    rows = {(r["task"], r["strategy"]): r for r in read_csv(report.out / "table1.csv")}
    assert rows[("iris", "Π")]["paper"] == "78.7"  # configs/paper_table1.yaml, llama-3-8b-instruct, Π, iris
    assert float(rows[("iris", "Π")]["mean"]) == pytest.approx(45.0) and rows[("iris", "Π")]["n"] == "2"
    assert rows[("gsm8k", "Π")]["paper"] == "" and rows[("gsm8k", "Π")]["std"] == ""  # one seed: no std
    line = next(line for line in report.markdown.splitlines() if line.startswith("| Π→Θ |"))
    assert line.endswith("| 55.0 ± 14.1 (n=2) | 34.7 |")  # ours beside the paper's Π→Θ on Iris
    assert report.markdown.count("| Π | 2.0 (n=1) | — | 45.0 ± 7.1 (n=2) | 78.7 |") == 1  # smollm2: no paper


def test_steps_csv_has_every_step_of_every_strategy(sweep):
    report = make_report(sweep)
    rows = read_csv(report.out / "steps.csv")
    pw = [r for r in rows if r["task"] == "iris" and r["strategy"] == "Π→Θ"]
    assert [r["step"] for r in pw] == ["0", "1", "2"]
    assert [float(r["mean"]) for r in pw] == pytest.approx([20.0, 40.0, 50.0])
    assert pw[2]["seeds"] == "0 1"


def test_reused_steps_are_counted_once(sweep):
    report = make_report(sweep)
    counted = [c for c in report.costs if c.counted]
    # iris: per seed vanilla (10 s), Π (30 s) and Θ (50 s, 20 s of it training) computed once, 3 tests (4 s).
    pool, train = 2 * 1.0, 1 * 2.0
    iris_cpu = 2 * (pool * (10 + 30 + 50) + train * 20 + 3 * pool * 4)
    gsm8k_cpu = pool * (8 + 16 + 4)
    assert costs.total(report.costs)["cpu_s"] == pytest.approx(iris_cpu + gsm8k_cpu)
    assert costs.total(report.costs)["generated_tokens"] == 2 * (100 + 300 + 200 + 3 * 7) + 80 + 160 + 7
    assert sum(1 for c in report.costs if c.reused_from and not c.counted) == 6
    assert len(counted) == len(report.costs) - 6
    by_phase = costs.per_phase(report.costs)
    assert by_phase[("iris", "llama-3-8b-instruct", "p")].count == 2  # one Π per seed, not one per cell
    assert by_phase[("iris", "llama-3-8b-instruct", "w")].cpu_s == pytest.approx(pool * 50 + train * 20)
    rows = read_csv(report.out / "costs.csv")
    reused = [r for r in rows if r["reused_from"]]
    assert reused and all(r["counted"] == "False" for r in reused)
    # A strategy's own cost counts its reused steps at their recorded cost: Π→Θ as if run alone.
    mean, reused_steps = costs.per_strategy(report.costs)[("iris", "llama-3-8b-instruct", "Π→Θ")]
    assert mean.wall_s == pytest.approx(10 + 30 + 50 + 4) and reused_steps == 4


def test_reuse_chains_and_origins_outside_the_report(tmp_path):
    root = tmp_path / "chain"
    write_run(root, "a", "iris", "m", "Π", 0, [step(0, "vanilla", 1.0, 10.0, 1), step(1, "Π", 2.0, 20.0, 2)], 1.0)
    write_run(root, "b", "iris", "m", "Π→Π", 0, [step(0, "vanilla", 1.0, 10.0, 1, reused_from="a"),
                                                   step(1, "Π", 2.0, 20.0, 2, reused_from="a"),
                                                   step(2, "Π→Π", 3.0, 5.0, 3)], 1.0)
    write_run(root, "c", "iris", "m", "Π→Π→Π", 0, [step(0, "vanilla", 1.0, 10.0, 1, reused_from="b"),
                                                     step(1, "Π", 2.0, 20.0, 2, reused_from="b"),
                                                     step(2, "Π→Π", 3.0, 5.0, 3, reused_from="b"),
                                                     step(3, "Π→Π→Π", 3.0, 6.0, 4)], 1.0)
    for name in ("d", "e"):  # both reuse a run that is not in this directory: counted once between them
        write_run(root, name, "iris", "m", "Π", 1, [step(0, "vanilla", 1.0, 9.0, 1, reused_from="elsewhere"),
                                                     step(1, "Π", 2.0, 1.0, 2)], 1.0)
    runs, _ = find_runs(root, {})
    phase = costs.phase_costs(runs)
    steps_counted = sorted((c.run, c.step) for c in phase if c.counted and c.step is not None)
    assert steps_counted == [("a", 0), ("a", 1), ("b", 2), ("c", 3), ("d", 0), ("d", 1), ("e", 1)]


def test_resources_held_per_placement():
    split = costs.held({"placement": {"mode": "split"}, "inference": {"replicas": 2, "cpus_per_replica": 4,
                                                                      "gpus_per_replica": 1},
                        "train": {"num_workers": 2, "cpus_per_worker": 4, "use_gpu": True}})
    assert split["pool"] == {"CPU": 8, "GPU": 2} and split["train"] == {"CPU": 8, "GPU": 2}
    timeshare = costs.held({"placement": {"mode": "timeshare"}, "inference": {"replicas": 2, "cpus_per_replica": 4,
                                                                              "gpus_per_replica": 0.6},
                            "train": {"num_workers": 2, "cpus_per_worker": 4, "use_gpu": True}})
    assert timeshare["pool"]["GPU"] == 2 and timeshare["train"]["GPU"] == 0  # training reuses the replicas' GPUs


def test_gpu_seconds_from_a_recorded_reservation(tmp_path):
    config = {"placement": {"mode": "split"}}
    run_dir = write_run(tmp_path, "g", "gsm8k", "m", "Θ", 0, [step(0, "vanilla", 1.0, 10.0, 1),
                                                              step(1, "Θ", 2.0, 100.0, 2, train_wall_s=60.0)], 1.0,
                        config=config)
    results = json.loads((run_dir / "results.json").read_text())
    results["resources"] = {"placement": "split", "pool": {"CPU": 2, "GPU": 1}, "train": {"CPU": 4, "GPU": 2}}
    (run_dir / "results.json").write_text(json.dumps(results))
    theta = next(c for c in costs.phase_costs(find_runs(tmp_path, {})[0]) if c.phase == "w")
    assert theta.gpu_s == pytest.approx(1 * 100 + 2 * 60) and theta.cpu_s == pytest.approx(2 * 100 + 4 * 60)


def test_model_labels():
    models = load_paper(None).models
    assert model_label("meta-llama/Meta-Llama-3-8B-Instruct", models) == "llama-3-8b-instruct"
    assert model_label("/data/models/mistral-7b-instruct-v0.2/", models) == "mistral-7b-instruct-v0.2"
    assert model_label("/data/llama-2-7b-chat-hf", models) == "llama-2-7b-chat"
    assert model_label("smollm2-135m", models) == "smollm2-135m"  # not in the paper
    paper = load_paper(None)
    assert paper.score("llama-2-7b-chat", "Θ", "iris") == (True, None)  # the paper reports none
    assert paper.score("smollm2-135m", "Π", "iris") == (False, None)


def test_pngs_are_written(sweep):
    report = make_report(sweep, out=sweep / "elsewhere")
    for name in ("scores.png", "phases.png"):
        data = (sweep / "elsewhere" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000


def test_unfinished_cells_are_listed_not_errors(sweep):
    report = make_report(sweep)
    assert [p.name for p in report.unfinished] == ["iris-w-s0"]
    assert "iris-w-s0 (1 step(s) finished)" in report.markdown


def test_directory_without_results(tmp_path):
    with pytest.raises(ConfigError, match="found no results.json.*bt-ray run.*bt-ray sweep"):
        find_runs(tmp_path, {})
    (tmp_path / "cells" / "x").mkdir(parents=True)
    (tmp_path / "cells" / "x" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "cells" / "x" / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match="unfinished.*cells/x"):
        find_runs(tmp_path, {})
    with pytest.raises(ConfigError, match="no such directory"):
        find_runs(tmp_path / "missing", {})


@pytest.mark.parametrize("text, problem", [("{not json", "not a readable results.json"),
                                           ('{"run": "x"}', "lacks task, model, strategy, seed, steps, test")])
def test_malformed_results_name_the_file(sweep, text, problem):
    bad = sweep / "cells" / "broken" / "results.json"
    bad.parent.mkdir()
    bad.write_text(text)
    with pytest.raises(ConfigError, match=problem) as info:
        make_report(sweep)
    assert str(bad) in str(info.value)


def test_cli_report_and_bad_input(sweep, tmp_path, capsys):
    assert main(["report", str(sweep), "--estimate", "configs/paper_table1.yaml"]) == 0
    out = capsys.readouterr().out
    assert "# Table 1" in out and "## Grid estimate: paper-table1" in out
    assert (sweep / "report" / "estimate.md").read_text() in out
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["report", str(sweep), "--paper", str(tmp_path / "nope.yaml")]) == 2


def test_aggregate_orders_unknown_strategies_last(tmp_path):
    for strategy in ("mipro→Θ", "Π→Θ→Π", "Θ"):
        write_run(tmp_path, strategy, "iris", "m", strategy, 0, [step(0, "vanilla", 1.0, 1.0, 1)], 1.0)
    assert aggregate(find_runs(tmp_path, {})[0]).strategies == ["Θ", "Π→Θ→Π", "mipro→Θ"]


def test_columns_keep_apart_what_shares_a_task_name_or_a_basename(tmp_path):
    root = tmp_path / "sweep"
    one = [step(0, "vanilla", 1.0, 1.0, 1)]
    # Two sweep task labels running one task.name, told apart by the sweep's sweep.json.
    write_run(root, "iris-m-p-s0", "iris", "m", "Π", 0, one, 80.0)
    write_run(root, "iris-nodemos-m-p-s0", "iris", "m", "Π", 0, one, 20.0)
    rows = [{"name": "iris-m-p-s0", "task": "iris", "model": "m"},
            {"name": "iris-nodemos-m-p-s0", "task": "iris-nodemos", "model": "m"}]
    (root / "sweep.json").write_text(json.dumps({"cells": rows}))
    # Two local checkpoints with one basename, outside any sweep: their full names.
    write_run(tmp_path / "mine", "a", "iris", "/ckpts/a/final", "Π", 0, one, 70.0)
    write_run(tmp_path / "mine", "b", "iris", "/ckpts/b/final", "Π", 0, one, 30.0)
    table = aggregate(find_runs(tmp_path, {})[0])
    assert table.columns == [("iris", "/ckpts/a/final"), ("iris", "/ckpts/b/final"), ("iris", "m"),
                             ("iris-nodemos", "m")]
    assert [table.test[(c, "Π")].values for c in table.columns] == [[70.0], [30.0], [80.0], [20.0]]


def test_a_seed_twice_in_one_column_is_refused(tmp_path):
    for name in ("run-1", "run-2"):  # e.g. two `bt-ray run`s of one config, not two seeds
        write_run(tmp_path, name, "iris", "m", "Π", 0, [step(0, "vanilla", 1.0, 1.0, 1)], 50.0)
    with pytest.raises(ConfigError, match="both task iris, model m, strategy Π, seed 0.*Report their directories"):
        aggregate(find_runs(tmp_path, {})[0])


def test_report_of_a_run_the_driver_wrote(tmp_path):
    """A results.json written by the real Driver (over the labelled FakeSession: fake engine, no Ray, no model)."""
    from bt_ray.config import load_config
    from bt_ray.driver import Driver

    from .fakes import FakeSession
    from .test_prompt_phase import noisy_classifier

    config = load_config("configs/iris.yaml", [f"output_dir={tmp_path}", "name=t", "strategy=p",
                                               "inference.replicas=2", "inference.cpus_per_replica=0.5"])
    results = Driver(config).run(session=FakeSession(noisy_classifier))
    assert results["resources"]["pool"] == {"CPU": 1.0, "GPU": 0.0}
    test = results["test"]
    # Requests: at most one per test example (DSPy's cache answers repeated identical calls itself).
    assert 0 < test["requests"] <= test["n"] and test["wall_s"] > 0 and test["generated_tokens"] > 0
    report = make_report(tmp_path / "t")
    assert report.table.test[(("iris", "smollm2-135m"), "Π")].values == [test["score"]]
    rows = read_csv(report.out / "costs.csv")
    assert [r["phase"] for r in rows] == ["vanilla", "p", "test"]
    assert float(rows[1]["cpu_s"]) == pytest.approx(1.0 * results["steps"][1]["wall_s"], abs=0.1)


def test_report_of_a_sweep_in_object_storage(sweep, tmp_path, monkeypatch):
    """output_dir may be an object-store URI: the report downloads results, states and configs (file:// here)."""
    monkeypatch.setattr("bt_ray.storage.RUN_CACHE", str(tmp_path / "cache"))
    report = make_report(f"file://{sweep}", out=tmp_path / "out")
    assert len(report.table.runs) == 7 and [p.name for p in report.unfinished] == ["iris-w-s0"]
    assert str(report.table.runs[0].dir).startswith(str(tmp_path / "cache"))
    assert report.markdown == make_report(sweep).markdown.replace(str(sweep), str(report.unfinished[0].parents[1]))


def test_a_run_without_a_test_set_has_no_test_phase_cost(tmp_path):
    run_dir = write_run(tmp_path, "bt", "iris", "m", "Π", 0, [step(0, "vanilla", 1.0, 2.0, 1)], 1.0)
    results = json.loads((run_dir / "results.json").read_text())
    (run_dir / "results.json").write_text(json.dumps({**results, "test": None}))  # BetterTogether.compile's
    assert [c.phase for c in costs.phase_costs(find_runs(tmp_path, {})[0])] == ["vanilla"]
