"""A run's results as JSON, a markdown table and a PNG, all made from RunState (never from logs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bt_ray.config import RunConfig, to_dict
from bt_ray.costs import held
from bt_ray.strategy import paper_notation


def write_results(config: RunConfig, state: Any, splits: Any) -> dict[str, Any]:
    run_dir = Path(state.run_dir)
    results = {
        "run": config.run_name,
        "task": config.task.name,
        "data": {"source": splits.source, "offline": splits.offline, **splits.sizes()},
        "model": config.model.name,
        "strategy": paper_notation(config.strategy),
        "seed": config.seed,
        "steps": [_step_row(s) for s in state.steps],
        "test": state.test,
        "totals": _totals(state.steps),
        "resources": held(to_dict(config)),  # what the run reserved; costs.py turns it into CPU-/GPU-seconds
        "config": to_dict(config),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    (run_dir / "results.md").write_text(markdown(results))
    plot_steps(results, run_dir / "scores.png")
    return results


def _step_row(step: Any) -> dict[str, Any]:
    usage = step.usage or {}
    return {
        "step": step.index,
        "strategy": paper_notation(step.strategy),
        "version": step.version or "base",
        "dev": step.dev.get("score"),
        "dev_n": step.dev.get("n"),
        "dev_errors": step.dev.get("errors"),
        "wall_s": step.wall_s,
        "requests": usage.get("requests", 0),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "cached_prompt_tokens": usage.get("cached_prompt_tokens", 0),
        "generated_tokens": usage.get("generated_tokens", 0),
        "truncated": usage.get("truncated", 0),
        "trained_tokens": step.trained_tokens,
        "requests_by_version": usage.get("by_version", {}),
        "details": step.details,
        "reused_from": step.reused_from,
        "resources": step.resources,
    }


def _totals(steps: list) -> dict[str, Any]:
    """What this run computed: steps reused from another run (a sweep's shared prefix) count there."""
    own = [s for s in steps if not s.reused_from]
    return {
        "wall_s": round(sum(s.wall_s for s in own), 1),
        "requests": sum((s.usage or {}).get("requests", 0) for s in own),
        "generated_tokens": sum((s.usage or {}).get("generated_tokens", 0) for s in own),
        "trained_tokens": sum(s.trained_tokens for s in own),
        "reused_steps": len(steps) - len(own),
    }


def markdown(results: dict[str, Any]) -> str:
    data = results["data"]
    lines = [
        f"# {results['run']}: {results['strategy']} on {results['task']}",
        "",
        f"model `{results['model']}`, seed {results['seed']}; data: "
        f"{'**OFFLINE stand-in** ' if data.get('offline') else ''}{data['source']} "
        f"(train {data['train']} / dev {data['dev']} / test {data['test']})",
        "",
        "| step | strategy | model version | dev % | errors | wall s | requests | generated tok | trained tok |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["steps"]:
        dev = "—" if row["dev"] is None else f"{row['dev']:.1f}"
        lines.append(f"| {row['step']} | {row['strategy']} | {row['version']} | {dev} | "
                     f"{row['dev_errors']}/{row['dev_n']} | {row['wall_s']:.0f} | {row['requests']} | "
                     f"{row['generated_tokens']} | {row['trained_tokens']} |")
    totals = results["totals"]
    reused = totals.get("reused_steps", 0)
    label = f"**total** (without the {reused} reused)" if reused else "**total**"
    lines.append(f"| | {label} | | | | {totals['wall_s']:.0f} | {totals['requests']} | "
                 f"{totals['generated_tokens']} | {totals['trained_tokens']} |")
    lines += ["", "*errors*: dev examples where the program raised (for a small model, mostly answers that do not "
                  "follow DSPy's output format); they score 0."]
    test = results.get("test")
    if test:
        returned = paper_notation(test["strategy"])
        lines += ["", f"**Test: {test['score']:.1f}%** (n={test['n']}, {test['errors']} errors) for the program "
                      f"returned by step {test['step']} ({returned})."]
    return "\n".join(lines) + "\n"


def plot_steps(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["steps"]
    labels = [r["strategy"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 1), 3.2))
    bars = ax.bar(range(len(rows)), [r["dev"] or 0.0 for r in rows], color=["#999" if i == 0 else "#3a7" for i in
                                                                     range(len(rows))])
    ax.bar_label(bars, labels=["—" if r["dev"] is None else f"{r['dev']:.1f}" for r in rows])  # — : not scored
    if results.get("test"):
        test = results["test"]
        ax.axhline(test["score"], color="#c33", linestyle="--", label=f"test (returned): {test['score']:.1f}")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("dev accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['task']} · {results['model']} · seed {results['seed']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
