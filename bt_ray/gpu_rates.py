"""`bt-ray report DIR --estimate GRID --gpu-rates BENCH.json ...`: the grid's GPU time at measured GPU rates.

The phases measured in DIR say how many tokens each phase generates and trains on; the GPU benchmarks
(bench/gpu_serving.py, bench/gpu_train.py, their --json output) say how fast one GPU generates and trains.
Their quotient is the GPU time the grid keeps its GPUs busy:

    serving GPU-s  = generated tokens / generated tokens per s per GPU  (the slowest measured serving arm)
    training GPU-s = tokens trained through (all epochs) / training tokens per s per GPU
    start-up GPU-s = one engine start per cell + one training start (worker start, model load) per Θ

It is busy time, not reserved time: a replica waiting on DSPy's driver, or held through Θ, costs more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bt_ray.errors import ConfigError

HOW = "bench/gpu_serving.py --json FILE or bench/gpu_train.py --json FILE on the GPU"


@dataclass
class Rates:
    """What one GPU does per second, from the benchmarks' JSON files."""

    serve_tokens_per_s: float | None = None
    serve_arm: str = ""  # which arm of bench/gpu_serving.py the rate is
    engine_start_s: float | None = None
    train_tokens_per_s: float | None = None
    train_start_s: float | None = None
    sources: list[str] = field(default_factory=list)  # one line per file: GPU, model shapes, settings


ARMS = {"raw": "raw vLLM", "bt_ray": "bt-ray replica + router", "lora": "bt-ray with a rank-32 LoRA adapter"}


def load_rates(paths: list[str]) -> Rates:
    rates = Rates()
    for path in paths:
        data = _read(path)
        if any(isinstance(data.get(arm), dict) for arm in ARMS):  # gpu_train.py's 'lora' is a string
            if rates.serve_tokens_per_s is not None:
                raise ConfigError(f"--gpu-rates: two serving benchmarks ({path}); give one of each kind")
            _serving(rates, data, path)
        elif "tokens_per_s" in data and "train_s" in data:
            if rates.train_tokens_per_s is not None:
                raise ConfigError(f"--gpu-rates: two training benchmarks ({path}); give one of each kind")
            rates.train_tokens_per_s = float(data["tokens_per_s"])
            if data.get("fit_wall_s") is not None:
                rates.train_start_s = max(0.0, float(data["fit_wall_s"]) - float(data["train_s"]))
            rates.sources.append(f"training: {data['tokens_per_s']:,.0f} tokens/s on {data.get('gpu', '?')}, "
                                 f"{data.get('model', '?')}, {data.get('lora', '?')}, {data.get('distributed', '?')} "
                                 f"({path})")
        else:
            raise ConfigError(f"--gpu-rates {path}: not the JSON of a GPU benchmark (no 'raw'/'bt_ray'/'lora' "
                              f"arms, no 'tokens_per_s' + 'train_s'); write one with {HOW}")
    return rates


def _read(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--gpu-rates {path}: no such file; write it with {HOW}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--gpu-rates {path}: not readable JSON ({exc}); write it with {HOW}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--gpu-rates {path}: expected a JSON object; write it with {HOW}")
    return data


def _serving(rates: Rates, data: dict[str, Any], path: str) -> None:
    arms = {arm: data[arm] for arm in ARMS if isinstance(data.get(arm), dict) and data[arm].get("tokens_per_s")}
    if not arms:
        raise ConfigError(f"--gpu-rates {path}: no arm of bench/gpu_serving.py has a tokens_per_s; rerun it")
    arm = min(arms, key=lambda a: arms[a]["tokens_per_s"])  # the slowest: most of a grid runs on adapters
    rates.serve_tokens_per_s, rates.serve_arm = float(arms[arm]["tokens_per_s"]), ARMS[arm]
    starts = [float(a["engine_start_s"]) for a in arms.values() if a.get("engine_start_s") is not None]
    rates.engine_start_s = max(starts) if starts else None
    measured = ", ".join(f"{ARMS[a]} {v['tokens_per_s']:,.0f}" for a, v in arms.items())
    rates.sources.append(f"serving: generated tokens/s per GPU on {data.get('gpu', '?')}, {data.get('model', '?')}, "
                         f"{data.get('concurrency', '?')} requests in flight: {measured} ({path})")


@dataclass
class Busy:
    """GPU-seconds one task x model of the grid keeps its GPUs busy."""

    task: str
    model: str
    generated: float  # tokens
    trained: float  # tokens trained through, all epochs
    serve_s: float | None
    train_s: float | None
    start_s: float | None
    tokens_from: str  # where the phases' tokens were measured (as the estimate's 'priced from')


def busy(rows: list, cells_per_row: int, rates: Rates) -> list[Busy]:
    """`rows`: estimate.Priced, whose phases' tokens were summed at the measured means like their costs."""
    out = []
    for row in rows:
        generated, trained = row.generated_tokens, row.train_total_tokens
        serve = generated / rates.serve_tokens_per_s if rates.serve_tokens_per_s else None
        train = trained / rates.train_tokens_per_s if rates.train_tokens_per_s else None
        start = None  # what is measured (an unmeasured start-up adds 0); the section names what is not
        if rates.engine_start_s is not None or rates.train_start_s is not None:
            start = (cells_per_row * (rates.engine_start_s or 0.0)
                     + row.phases.get("w", 0) * (rates.train_start_s or 0.0))
        sources = set(row.sources.values())
        tokens_from = sources.pop() if len(sources) == 1 else "mixed: see 'priced from' above"
        out.append(Busy(row.task, row.model, generated, trained, serve, train, start, tokens_from))
    return out


def section(rows: list[Busy], rates: Rates, runs: list) -> list[str]:
    """The estimate's markdown lines for GPU time at the measured rates."""
    lines = ["### GPU time at measured GPU rates", "", *(f"- {s}" for s in rates.sources), "",
             "| task · model | tokens from | generated tokens | tokens trained through | serving GPU-h | "
             "training GPU-h | start-up GPU-h | GPU-h |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        parts = [row.serve_s, row.train_s, row.start_s]
        lines.append(f"| {row.task} · {row.model} | {row.tokens_from} | {row.generated:,.0f} | {row.trained:,.0f} | "
                     + " | ".join(_h(p) for p in parts) + f" | {_h(sum(p or 0.0 for p in parts))} |")
    columns = [[getattr(r, k) for r in rows if getattr(r, k) is not None] for k in ("serve_s", "train_s", "start_s")]
    totals = [sum(c) if c else None for c in columns]  # a column nothing measured stays —, not 0
    lines.append(f"| **grid** | | {sum(r.generated for r in rows):,.0f} | {sum(r.trained for r in rows):,.0f} | "
                 + " | ".join(_h(t) for t in totals) + f" | **{_h(sum(t or 0.0 for t in totals))}** |")
    missing = [f"{name} ({bench})" for name, value, bench in (
        ("serving", rates.serve_tokens_per_s, "bench/gpu_serving.py --json"),
        ("training", rates.train_tokens_per_s, "bench/gpu_train.py --json"),
        ("engine start-up", rates.engine_start_s, "bench/gpu_serving.py --json"),
        ("training start-up", rates.train_start_s, "bench/gpu_train.py --json")) if value is None]
    lines += ["", f"Busy time: tokens over what one GPU did per second in the benchmark, plus one engine start per "
              f"cell (one replica's: more replicas start side by side) and one training start per Θ. Serving is "
              f"priced at the slowest measured arm ({rates.serve_arm or 'none'}). The tokens are the measured runs' "
              f"({', '.join(sorted({r.label for r in runs})) or '?'}): a 7-8B model writes longer or shorter answers "
              f"than these, and the benchmark's shapes stand for the grid's models. Reserved GPU-hours are higher: "
              f"replicas wait on the driver between requests and stay held through Θ."]
    if missing:
        lines += ["", f"Not measured, so — in the table and left out of the GPU-h totals: {', '.join(missing)}, "
                  "on the GPU."]
    return lines


def _h(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 3600:.2f}"
