"""`bt-ray report --estimate GRID --gpu-rates BENCH.json`: the grid's measured tokens at the GPU benchmarks' rates.

TEST DATA: the benchmark JSON files here are made up (round numbers, in the format bench/gpu_serving.py and
bench/gpu_train.py write); the measured runs are the made-up results.json of tests/unit/test_table1.py.
"""

import json

import pytest

from bt_ray.cli import main
from bt_ray.errors import ConfigError
from bt_ray.estimate import estimate, load_grid, price
from bt_ray.gpu_rates import busy, load_rates
from bt_ray.table1 import make_report
from tests.unit.test_table1 import sweep  # noqa: F401  (the fixture)

SERVING = {"gpu": "Test GPU", "model": "Llama-3-8B shapes, dummy weights, bf16", "concurrency": 64,
           "raw": {"tokens_per_s": 1000.0, "engine_start_s": 50.0},
           "bt_ray": {"tokens_per_s": 900.0, "engine_start_s": 60.0},
           "lora": {"tokens_per_s": 600.0}}
TRAIN = {"gpu": "Test GPU", "model": "llama-3-8b shapes", "lora": "r32 q_proj,k_proj", "distributed": "ddp",
         "tokens_per_s": 2000, "fit_wall_s": 30.0, "train_s": 10.0}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_rates_take_the_slowest_serving_arm_and_the_training_rate(tmp_path):
    rates = load_rates([write(tmp_path, "serving.json", SERVING), write(tmp_path, "train.json", TRAIN)])
    assert rates.serve_tokens_per_s == 600.0 and rates.serve_arm == "bt-ray with a rank-32 LoRA adapter"
    assert rates.engine_start_s == 60.0  # the slower start of the measured engines
    assert rates.train_tokens_per_s == 2000 and rates.train_start_s == 20.0  # fit wall time - training loop
    assert len(rates.sources) == 2 and "Test GPU" in rates.sources[0]


def test_paper_grid_busy_time(sweep, tmp_path):  # noqa: F811
    report = make_report(sweep)
    grid = load_grid("configs/paper_table1.yaml")
    rates = load_rates([write(tmp_path, "serving.json", SERVING), write(tmp_path, "train.json", TRAIN)])
    rows = price(grid, report.costs)
    cells = len(grid.strategies) * len(grid.seeds)  # 24 cells per task x model
    got = {(b.task, b.model): b for b in busy(rows, cells, rates)}
    iris = got[("iris", "llama-3-8b-instruct")]
    # 3 vanilla x 100 + 12 Π x 300 + 9 Θ x 200 + 24 tests x 7 generated tokens; 9 Θ x 12000 trained through
    assert iris.generated == 3 * 100 + 12 * 300 + 9 * 200 + 24 * 7 and iris.trained == 9 * 12000
    assert iris.serve_s == pytest.approx(iris.generated / 600.0)
    assert iris.train_s == pytest.approx(9 * 12000 / 2000)
    assert iris.start_s == pytest.approx(24 * 60.0 + 9 * 20.0)
    text = estimate(grid, report.costs, report.table.runs, rates)
    total = sum(b.serve_s + b.train_s + b.start_s for b in got.values())
    assert "### GPU time at measured GPU rates" in text and f"**{total / 3600:.2f}**" in text
    assert "Not measured" not in text.split("### GPU time")[1]


def test_an_unmeasured_rate_is_named_not_guessed(sweep, tmp_path):  # noqa: F811
    report = make_report(sweep)
    grid = load_grid("configs/paper_table1.yaml")
    rates = load_rates([write(tmp_path, "serving.json", {"gpu": "Test GPU", "raw": {"tokens_per_s": 1000.0}})])
    rows = busy(price(grid, report.costs), 24, rates)
    assert all(r.train_s is None and r.start_s is None for r in rows)
    section = estimate(grid, report.costs, report.table.runs, rates).split("### GPU time")[1]
    assert "training (bench/gpu_train.py --json), engine start-up" in section and "| — | — |" in section
    grid_row = next(line for line in section.splitlines() if line.startswith("| **grid**"))
    assert grid_row.split(" | ")[-3:-1] == ["—", "—"]  # the grid's training and start-up columns: not 0.00


def test_start_up_counts_what_was_measured_and_names_the_rest(sweep, tmp_path):  # noqa: F811
    report = make_report(sweep)
    grid = load_grid("configs/paper_table1.yaml")
    for files, start in (([SERVING], 24 * 60.0), ([{**SERVING, "bt_ray": {"tokens_per_s": 900.0}, "raw": {
            "tokens_per_s": 1000.0}}, TRAIN], 9 * 20.0)):
        rates = load_rates([write(tmp_path, f"f{i}.json", data) for i, data in enumerate(files)])
        iris = next(r for r in busy(price(grid, report.costs), 24, rates) if r.task == "iris")
        assert iris.start_s == pytest.approx(start)  # 24 engine starts, or 9 training starts (one per Θ)
        missing = estimate(grid, report.costs, report.table.runs, rates).split("Not measured")[1]
        assert ("training start-up" in missing) == (TRAIN not in files)
        assert ("engine start-up" in missing) == (TRAIN in files)


def test_bad_rates_files(sweep, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="no such file; write it with bench/gpu_serving.py"):
        load_rates([str(tmp_path / "none.json")])
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_rates([write(tmp_path, "bad.json", "{")])
    with pytest.raises(ConfigError, match="not the JSON of a GPU benchmark"):
        load_rates([write(tmp_path, "other.json", {"score": 1})])
    with pytest.raises(ConfigError, match="no arm of bench/gpu_serving.py has a tokens_per_s"):
        load_rates([write(tmp_path, "empty.json", {"raw": {"wall_s": 1.0}})])
    serving = write(tmp_path, "serving.json", SERVING)
    with pytest.raises(ConfigError, match="two serving benchmarks"):
        load_rates([serving, serving])
    assert main(["report", str(sweep), "--gpu-rates", serving]) == 2  # no grid to price
    assert main(["report", str(sweep), "--estimate", "configs/paper_table1.yaml", "--gpu-rates", serving]) == 0
    assert "GPU time at measured GPU rates" in (sweep / "report" / "estimate.md").read_text()
