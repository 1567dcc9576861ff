import pytest

from bt_ray.strategy import PAPER_STRATEGIES, StrategyError, format_strategy, parse_strategy, strategy_slug


@pytest.mark.parametrize("text, steps", [
    ("p -> w -> p", ("p", "w", "p")),
    ("Π→Θ→Π", ("p", "w", "p")),
    ("π → θ", ("p", "w")),
    ("p->w", ("p", "w")),
    ("  w  ", ("w",)),
    ("vanilla", ()),
    ("", ()),
    ("p -> p -> p -> w -> w", ("p", "p", "p", "w", "w")),
])
def test_parse(text, steps):
    assert parse_strategy(text) == steps


@pytest.mark.parametrize("text", ["p -> x", "p ->", "-> w", "p -> -> w", "pw", "p, w", "Π→", None])
def test_bad_strategies_name_the_step(text):
    with pytest.raises(StrategyError) as err:
        parse_strategy(text)
    assert "p -> w -> p" in str(err.value)


def test_all_paper_strategies_parse_and_round_trip():
    assert len(PAPER_STRATEGIES) == 8
    for text in PAPER_STRATEGIES:
        steps = parse_strategy(text)
        assert parse_strategy(format_strategy(steps)) == steps
        assert parse_strategy(format_strategy(steps, "paper")) == steps


def test_formats():
    assert format_strategy(("p", "w", "p"), "paper") == "Π→Θ→Π"
    assert format_strategy(()) == "vanilla"
    assert strategy_slug("Π→Θ→Π") == "p-w-p"
    assert strategy_slug("vanilla") == "vanilla"
