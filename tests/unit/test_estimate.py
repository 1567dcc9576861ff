"""`bt-ray report --estimate`: phases a grid needs after prefix sharing, priced at the measured phase costs.

TEST DATA: the measured runs are the made-up results.json of tests/unit/test_table1.py.
"""

import pytest

from bt_ray import costs
from bt_ray.errors import ConfigError
from bt_ray.estimate import estimate, load_grid, phases_per_seed, price
from bt_ray.strategy import PAPER_STRATEGIES, parse_strategy
from bt_ray.table1 import make_report
from tests.unit.test_table1 import sweep  # noqa: F401  (the fixture)


def test_paper_grid_phases_after_prefix_sharing():
    shared, alone = phases_per_seed([parse_strategy(s) for s in PAPER_STRATEGIES])
    # Prefixes Π, Θ, Π→Π, Θ→Θ, Π→Θ, Θ→Π, Π→Θ→Π: 4 end in Π, 3 in Θ; one vanilla; 8 tests.
    assert shared == {"vanilla": 1, "p": 4, "w": 3, "test": 8}
    assert alone == {"vanilla": 8, "p": 7, "w": 6, "test": 8}


@pytest.mark.parametrize("strategies", [PAPER_STRATEGIES, ["p", "w", "p -> w -> p", "p -> w -> w"], ["w -> p"]])
def test_phase_counts_are_the_steps_the_sweep_computes(tmp_path, strategies):
    from bt_ray.sweep import load_sweep, shared_steps
    from tests.unit.test_sweep import write_sweep

    sweep = load_sweep(write_sweep(tmp_path, strategies=list(strategies), seeds=[0]))
    computed = sum(len(c.strategy) + 1 - shared_steps(sweep, c) for c in sweep.cells)
    shared, alone = phases_per_seed([c.strategy for c in sweep.cells])
    assert sum(shared.values()) - shared["test"] == computed
    assert sum(alone.values()) - alone["test"] == sum(len(c.strategy) + 1 for c in sweep.cells)


def test_grid_priced_at_measured_means(sweep):  # noqa: F811
    report = make_report(sweep)
    grid = load_grid("configs/paper_table1.yaml")
    assert grid.tasks == ["hotpotqa", "gsm8k", "iris"] and len(grid.seeds) == 3
    rows = {(r.task, r.model): r for r in price(grid, report.costs)}
    exact = rows[("iris", "llama-3-8b-instruct")]
    assert set(exact.sources.values()) == {"same task and model"}
    per = costs.per_phase(report.costs)
    key = ("iris", "llama-3-8b-instruct")
    expected = sum(n * per[(*key, kind)].cpu_s for kind, n in exact.phases.items())
    assert exact.phases == {"vanilla": 3, "p": 12, "w": 9, "test": 24}
    assert exact.cpu_s == pytest.approx(expected) and exact.gpu_s == 0
    # gsm8k was measured with another model and without Θ: Θ is priced from the same model on another task.
    other = rows[("gsm8k", "llama-3-8b-instruct")]
    assert other.sources["p"] == "same task, other model" and other.sources["w"] == "same model, other task"
    text = estimate(grid, report.costs, report.table.runs)
    assert "75 A100 GPU-hours" in text and "Measured on CPUs only" in text
    assert f"{sum(r.cpu_s for r in rows.values()) / 3600:.2f} CPU-hours" in text


def test_bad_sweep_file(tmp_path):
    with pytest.raises(ConfigError, match="no such sweep file"):
        load_grid(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: {iris: {}}\nmodels: {}\nstrategies: [p]\nseeds: [0]\n")
    with pytest.raises(ConfigError, match="needs non-empty models"):
        load_grid(bad)
    bad.write_text("tasks: {iris: {}}\nmodels: {m: m}\nstrategies: [q]\nseeds: [0]\n")
    with pytest.raises(ConfigError, match="not a sweep file"):
        load_grid(bad)
