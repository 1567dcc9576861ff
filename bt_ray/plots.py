"""The report's pictures (matplotlib, Agg): test score per strategy beside the paper's, dev score after each phase."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OURS, PAPER = "#3a7", "#bbb"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt: Any, count: int, width: float) -> tuple[Any, list]:
    cols = min(count, 3)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _seeds(stats: list) -> str:
    seeds = sorted({s for stat in stats for s in stat.seeds})
    return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"


def plot_scores(table: Any, paper: Any, path: Path) -> None:
    """One panel per task x model: grouped bars per strategy, ours (mean ± std over seeds) beside the paper's."""
    plt = _pyplot()
    fig, axes = _panels(plt, len(table.columns), max(4.5, 0.9 * len(table.strategies) + 1.5))
    for ax, column in zip(axes, table.columns):
        strategies = [s for s in table.strategies if (column, s) in table.test]
        stats = [table.test[(column, s)] for s in strategies]
        ours = [s.mean if s.values else 0.0 for s in stats]
        errs = [s.std or 0.0 for s in stats]
        theirs = [paper.score(column[1], s, column[0])[1] for s in strategies]
        x = range(len(strategies))
        shift = 0.2 if any(v is not None for v in theirs) else 0.0  # ours beside the paper's, or centred
        bars = ax.bar([i - shift for i in x], ours, 0.4, yerr=errs, capsize=3, color=OURS, label="bt-ray (mean ± std)")
        ax.bar_label(bars, labels=[f"{v:.1f}" if s.values else "" for v, s in zip(ours, stats)], fontsize=7)
        if shift:
            bars = ax.bar([i + shift for i in x], [v or 0.0 for v in theirs], 0.4, color=PAPER, label="paper (Table 1)")
            ax.bar_label(bars, labels=["" if v is None else f"{v:.1f}" for v in theirs], fontsize=7, color="#666")
        ax.set_xticks(list(x), strategies, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.7, len(strategies) - 0.3)
        ax.set_ylim(0, 105)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{column[0]} · {column[1]}\n{_seeds(stats)}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Test score per strategy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_phases(table: Any, path: Path) -> None:
    """One panel per task x model: dev score after each step, one line per strategy (mean, shaded ± std)."""
    plt = _pyplot()
    fig, axes = _panels(plt, len(table.columns), 5.0)
    for ax, column in zip(axes, table.columns):
        depth = 0
        used = []
        series = [(s, sorted((i, stat) for (c, name, i), stat in table.steps.items() if c == column and name == s))
                 for s in table.strategies]
        series = [(s, points) for s, points in series if points]
        for k, (strategy, points) in enumerate(series):
            # Strategies sharing a prefix share its scores: a small shift keeps every line visible.
            xs = [i + 0.04 * (k - (len(series) - 1) / 2) for i, _ in points]
            means = [stat.mean for _, stat in points]
            stds = [stat.std or 0.0 for _, stat in points]
            (line,) = ax.plot(xs, means, marker="os^Dv<>p"[k % 8], label=strategy)
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.15)
            depth = max(depth, points[-1][0])
            used += [stat for _, stat in points]
        ax.set_xticks(range(depth + 1), ["0\nvanilla", *(str(i) for i in range(1, depth + 1))])
        ax.set_xlabel("after step")
        ax.set_ylabel("dev accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{column[0]} · {column[1]}\n{_seeds(used)}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle("Dev score after each phase (mean over seeds, shaded ± std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
