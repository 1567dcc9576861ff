"""Scoring K candidate programs on one dev set: bt-ray's pool against what a DSPy user runs today.

Baseline: `dspy.Evaluate(num_threads=8)` once per candidate (as DSPy's random search does), over a
plain transformers `dspy.LM`: DSPy 3.4's engine hook with one `model.generate` per request, the way
a user would wire a local model without bt-ray. bt-ray: every candidate x example in flight at once
through the inference pool (one replica on this machine's cores: batching + shared-prefix KV reuse).

Same model (the shipped SmolLM2-135M, fp32), same K Iris programs (3 labeled demos each, different
demos per candidate), same dev examples, greedy decoding, DSPy's cache off. Prints examples/s of
each, the ratio, and both sides' per-candidate scores (they should agree: greedy, same prompts).

    python bench/candidate_eval.py                      # K=6 candidates x 12 dev examples
    python bench/candidate_eval.py --dev-size 24 --threads 8
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

from _common import PlainGenerateEngine, model_dir, plain_lm  # noqa: E402 (sets the offline environment first)

import dspy  # noqa: E402

from bt_ray.config import load_config  # noqa: E402
from bt_ray.phases.fanout import Job, run_jobs  # noqa: E402
from bt_ray.session import Session, chat_adapter  # noqa: E402
from bt_ray.tasks import get_task  # noqa: E402


def candidates(task, train: list, k: int, seed: int) -> list:
    programs = []
    for i in range(k):
        program = task.build_program()
        demos = random.Random(seed * 1000 + i).sample(train, 3)
        for predictor in program.predictors():
            predictor.demos = demos
        programs.append(program)
    return programs


def run_dspy(programs: list, dev: list, metric, model_dir: str, threads: int, max_tokens: int) -> tuple[float, list]:
    engine = PlainGenerateEngine(model_dir)
    lm = plain_lm(engine, temperature=0.0, max_tokens=max_tokens)
    scores = []
    started = time.perf_counter()
    with dspy.context(lm=lm, adapter=chat_adapter()):
        for program in programs:
            result = dspy.Evaluate(devset=dev, metric=metric, num_threads=threads, display_progress=False,
                                   max_errors=len(dev) * 10)(program)
            scores.append(round(float(result.score), 1))
    return time.perf_counter() - started, scores


def run_bt_ray(programs: list, dev: list, metric, out_dir: str, max_tokens: int) -> tuple[float, list, dict]:
    config = load_config(None, [f"output_dir={out_dir}", "inference.cpus_per_replica=1", "inference.temperature=0",
                                f"inference.max_tokens={max_tokens}"])
    with Session(config, "bench-eval") as session:
        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
        lm = session.lm(None)
        bound = []
        for program in programs:
            program = program.deepcopy()
            program.set_lm(lm)
            bound.append(program)
        jobs = [Job(p, ex, tag=i) for i, p in enumerate(bound) for ex in dev]
        started = time.perf_counter()
        outcomes = run_jobs(jobs, metric, adapter=session.adapter, max_inflight=64, desc="bt-ray: scoring")
        seconds = time.perf_counter() - started
        (health,) = session.pool.health()
    scores = [round(100.0 * sum(o.score for o in outcomes if o.job.tag == i) / len(dev), 1)
              for i in range(len(programs))]
    return seconds, scores, health


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--dev-size", type=int, default=12)
    parser.add_argument("--threads", type=int, default=8, help="dspy.Evaluate num_threads (baseline)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from bt_ray.config import TaskConfig

    task = get_task("iris")
    splits = task.load_splits(TaskConfig(), args.seed)
    dev = splits.dev[: args.dev_size]
    programs = candidates(task, splits.train, args.candidates, args.seed)
    calls = len(programs) * len(dev)
    print(f"{len(programs)} Iris candidates (3 labeled demos each) x {len(dev)} dev examples = {calls} program "
          f"calls; SmolLM2-135M fp32, greedy, max_tokens {args.max_tokens}, {os.cpu_count()} CPU cores")

    with tempfile.TemporaryDirectory() as out:
        bt_s, bt_scores, health = run_bt_ray(programs, dev, task.metric, out, args.max_tokens)
    dspy_s, dspy_scores = run_dspy(programs, dev, task.metric, model_dir(), args.threads, args.max_tokens)

    print(f"\n{'run':48} {'seconds':>8} {'examples/s':>11} {'x baseline':>11}")
    print(f"{f'dspy.Evaluate(num_threads={args.threads}), plain generate':48} {dspy_s:8.1f} "
          f"{calls / dspy_s:11.3f} {1.0:11.2f}")
    print(f"{'bt-ray pool, all candidates at once':48} {bt_s:8.1f} {calls / bt_s:11.3f} {dspy_s / bt_s:11.2f}")
    print(f"\nper-candidate dev score (%), DSPy: {dspy_scores}")
    print(f"per-candidate dev score (%), bt-ray: {bt_scores}")
    print(f"bt-ray replica: mean batch {health['mean_batch_size']:.1f} rows/step, prompt tokens from prefix cache "
          f"{health['cached_prompt_tokens'] / max(1, health['prompt_tokens']):.0%}")


if __name__ == "__main__":
    main()
