"""Strategy strings: 'p -> w -> p' (DSPy's notation) or 'Π→Θ→Π' (the paper's).

A strategy is a sequence of steps, each 'p' (prompt optimization, Π) or 'w'
(LoRA weight fine-tuning, Θ). 'vanilla' (or '') is the empty strategy: the
zero-shot program. Any length is allowed.
"""

from __future__ import annotations

import re

STEP_CODES = {"p": "p", "π": "p", "w": "w", "θ": "w"}
VANILLA = ("vanilla", "zero-shot", "none", "")
PAPER_STRATEGIES = ("vanilla", "p", "w", "p -> p", "w -> w", "p -> w", "w -> p", "p -> w -> p")


class StrategyError(ValueError):
    pass


def parse_strategy(text: str) -> tuple[str, ...]:
    """'p -> w -> p' or 'Π→Θ→Π' -> ('p', 'w', 'p'); 'vanilla' -> ()."""
    if not isinstance(text, str):
        raise StrategyError(f"must be a string like 'p -> w -> p', got {text!r}")
    cleaned = text.strip()
    if cleaned.lower() in VANILLA:
        return ()
    parts = [part.strip() for part in re.split(r"->|→", cleaned)]
    steps = []
    for i, part in enumerate(parts):
        code = STEP_CODES.get(part.lower())
        if code is None:
            shown = part if part else "<empty>"
            raise StrategyError(
                f"step {i + 1} of {text!r} is {shown!r}; each step must be 'p' (prompts, Π) or 'w' "
                f"(weights, Θ), joined by '->' or '→', e.g. 'p -> w -> p'; use 'vanilla' for zero-shot")
        steps.append(code)
    return tuple(steps)


def split_strategy(text: str) -> tuple[str, ...]:
    """Like parse_strategy, but keys other than p/w ('mipro -> w', from the Python API) are kept as they are."""
    if text.strip().lower() in VANILLA:
        return ()
    return tuple(STEP_CODES.get(part.strip().lower(), part.strip()) for part in re.split(r"->|→", text))


def format_strategy(steps: tuple[str, ...], style: str = "code") -> str:
    """('p', 'w') -> 'p -> w' (code) or 'Π→Θ' (paper); () -> 'vanilla'. Other keys ('mipro') stay as they are."""
    if not steps:
        return "vanilla"
    if style == "paper":
        return "→".join({"p": "Π", "w": "Θ"}.get(s, s) for s in steps)
    return " -> ".join(steps)


def paper_notation(strategy: str) -> str:
    """Any spelling of a strategy ('p -> w', 'p->w', 'Π→Θ') -> the paper's ('Π→Θ'); '' -> 'vanilla'."""
    return format_strategy(split_strategy(strategy), "paper")


def strategy_slug(text: str) -> str:
    """A directory-safe name: 'p -> w -> p' -> 'p-w-p'."""
    try:
        steps = parse_strategy(text)
    except StrategyError:
        return "invalid"
    return "-".join(steps) or "vanilla"
