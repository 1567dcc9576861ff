"""Π's trace bootstrapping: bt-ray's fanned-out bootstrapping against DSPy's, one candidate after another.

Both sides bootstrap the demos of the same bootstrapped candidates of BootstrapFewShotWithRandomSearch
(seeds -1 .. num_candidates-4: the unshuffled one, then shuffled train orders with a random demo budget
1..max_bootstrapped_demos) from the same train subsample, with the same teacher (the Iris program with
3 labeled demos), the same model (the shipped SmolLM2-135M, fp32), temperature and max_tokens.

DSPy: what BootstrapFewShotWithRandomSearch.compile does for those seeds, minus the scoring: one
`BootstrapFewShot(...).compile(student, trainset=shuffled copy)` per seed, one after another, each
running the teacher on one train example at a time until it has its demos, over a plain transformers
`dspy.LM` (one `model.generate` per request; bench/_common.py).
bt-ray: bt_ray.phases.prompt's bootstrap: every seed's teacher runs in waves of its own, all seeds at once, through
the inference pool (one replica: batching + shared-prefix KV reuse), then each seed's demos are assembled
as BootstrapFewShot does. bt-ray may run a few more teacher calls than needed (a wave asks for up to twice
the demos still missing); they are counted.

DSPy's response cache is off on both sides. Prints wall time, model calls, passing traces, calls/s and
the ratio, then per seed which train examples became bootstrapped demos on each side. At temperature 0.1
the two sides draw different samples (different RNGs), so a trace can pass on one side and fail on the
other: the comparison is of the demo *selection* (which examples' traces passed, in which order), and
of the demo text; --temperature 0 makes both greedy, where they should agree up to fp32 batching noise.

    python bench/bootstrap.py                        # 15 train examples, 4 bootstrapped candidates
    python bench/bootstrap.py --train-size 10 --candidates 5 --temperature 0
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

from _common import PlainGenerateEngine, load_average, model_dir, plain_lm  # sets the offline environment first

import dspy  # noqa: E402
import torch  # noqa: E402

from bt_ray.config import TaskConfig, load_config  # noqa: E402
from bt_ray.phases.prompt import _assemble, _bootstrap, _plan  # noqa: E402
from bt_ray.session import Session, chat_adapter  # noqa: E402
from bt_ray.tasks import get_task  # noqa: E402


def run_dspy(student, train: list, seeds: list[int], metric, engine, args) -> tuple[float, dict, dict]:
    """BootstrapFewShotWithRandomSearch's bootstrapping loop (random_search.py), seed after seed."""
    lm = plain_lm(engine, temperature=args.temperature, max_tokens=args.max_tokens)
    programs, calls = {}, {}
    started = time.perf_counter()
    with dspy.context(lm=lm, adapter=chat_adapter()):
        for seed in seeds:
            trainset = list(train)
            size = args.max_bootstrapped_demos
            if seed >= 0:
                random.Random(seed).shuffle(trainset)
                size = random.Random(seed).randint(1, args.max_bootstrapped_demos)
            before = engine.total_calls
            # max_errors: DSPy stops after dspy.settings.max_errors (10) unparsable answers, which the small
            # model gives often; bt-ray counts them as failed traces, so DSPy gets the same allowance.
            optimizer = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=size,
                                              max_labeled_demos=args.max_labeled_demos, max_rounds=1,
                                              max_errors=len(trainset) + 1)
            programs[seed] = optimizer.compile(student, trainset=trainset)
            calls[seed] = engine.total_calls - before
    return time.perf_counter() - started, programs, calls


def run_bt_ray(student, train: list, seeds: list[int], metric, out_dir: str, args) -> tuple[float, dict, dict]:
    config = load_config(None, [f"output_dir={out_dir}", "inference.cpus_per_replica=1",
                                f"inference.temperature={args.temperature}", f"inference.max_tokens={args.max_tokens}",
                                f"prompt.max_bootstrapped_demos={args.max_bootstrapped_demos}",
                                f"prompt.max_labeled_demos={args.max_labeled_demos}",
                                f"inference.request_timeout_s={args.request_timeout}",
                                f"inference.torch_threads={args.torch_threads}"])
    with Session(config, "bench-bootstrap") as session:
        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
        lm = session.lm(None)
        started = time.perf_counter()
        plans = [_plan(s, train, config.prompt, 0, student.reset_copy(), lm) for s in seeds]
        _bootstrap(plans, metric, config.prompt, session.adapter, config.inference.max_inflight, [])
        programs = {plan.seed: _assemble(student, plan, config.prompt) for plan in plans}
        seconds = time.perf_counter() - started
        calls = {plan.seed: len(plan.results) for plan in plans}
        (health,) = session.pool.health()
    if "mean_batch_size" in health:  # the transformers engine's counters
        print(f"bt-ray replica: mean batch {health['mean_batch_size']:.1f} rows/step, prompt tokens from prefix "
              f"cache {health['cached_prompt_tokens'] / max(1, health['prompt_tokens']):.0%}")
    return seconds, programs, calls


def demo_keys(program, input_keys: list[str]) -> tuple[tuple, tuple]:
    """(bootstrapped demos, labeled demos) of the program's predictor, each as the inputs of its example."""
    (predictor,) = program.predictors()
    key = lambda d: tuple(str(d.get(k)) for k in input_keys)  # noqa: E731
    return (tuple(key(d) for d in predictor.demos if d.get("augmented")),
            tuple(key(d) for d in predictor.demos if not d.get("augmented")))


def demo_texts(program) -> tuple:
    (predictor,) = program.predictors()
    return tuple(tuple(sorted((k, str(v)) for k, v in d.items())) for d in predictor.demos if d.get("augmented"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=15, help="train subsample bootstrapped from (quickstart: 15)")
    parser.add_argument("--candidates", type=int, default=4,
                        help="bootstrapped candidates (seeds -1..N-2; quickstart's 6 candidates have 4)")
    parser.add_argument("--max-bootstrapped-demos", type=int, default=3)
    parser.add_argument("--max-labeled-demos", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="data split seed")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch threads for each side (0: all cores); 1 avoids OpenMP collapse on a busy machine")
    parser.add_argument("--request-timeout", type=float, default=3600.0,
                        help="bt-ray's inference.request_timeout_s (a busy shared machine can exceed the default 600)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    task = get_task("iris")
    splits = task.load_splits(TaskConfig(), args.seed)
    train = list(splits.train)
    random.Random(args.seed).shuffle(train)
    train = train[: args.train_size]
    student = task.build_program()
    input_keys = list(train[0].inputs().keys())
    seeds = list(range(-1, args.candidates - 1))
    print(f"bootstrapping {len(seeds)} candidates (seeds {seeds}) from {len(train)} Iris train examples, "
          f"<= {args.max_bootstrapped_demos} bootstrapped + {args.max_labeled_demos} labeled demos; SmolLM2-135M fp32, "
          f"temperature {args.temperature}, max_tokens {args.max_tokens}")

    load_before = load_average()
    print(f"before bt-ray: {load_before}")
    with tempfile.TemporaryDirectory() as out:
        bt_s, bt_programs, bt_calls = run_bt_ray(student, train, seeds, task.metric, out, args)
    print(f"bt-ray: {bt_s:.1f} s, {sum(bt_calls.values())} calls", flush=True)
    print(f"before DSPy: {load_average()}")
    engine = PlainGenerateEngine(model_dir())
    dspy_s, dspy_programs, dspy_calls = run_dspy(student, train, seeds, task.metric, engine, args)
    load_after = load_average()

    rows = []
    for name, seconds, programs, calls in (("DSPy BootstrapFewShot per seed, plain generate", dspy_s, dspy_programs,
                                            dspy_calls),
                                           ("bt-ray Π bootstrap, all seeds at once", bt_s, bt_programs, bt_calls)):
        traces = sum(len(demo_keys(p, input_keys)[0]) for p in programs.values())
        rows.append((name, seconds, sum(calls.values()), traces))
    print(f"\n{'run':48} {'seconds':>8} {'calls':>6} {'traces':>7} {'calls/s':>8} {'traces/s':>9} {'speedup':>8}")
    for name, seconds, calls, traces in rows:
        print(f"{name:48} {seconds:8.1f} {calls:6d} {traces:7d} {calls / seconds:8.3f} {traces / seconds:9.3f} "
              f"{dspy_s / seconds:8.2f}")
    print("(calls: teacher runs = model calls; traces: passing traces kept as bootstrapped demos; "
          "speedup: DSPy's wall time / this one's, for the same candidates)")

    same_selection = same_text = both_bootstrapped = 0
    print(f"\n{'seed':>4} {'budget':>6}  {'DSPy calls':>10} {'bt-ray calls':>12}  bootstrapped demos (train index), "
          f"DSPy | bt-ray")
    index = {tuple(str(x.get(k)) for k in input_keys): i for i, x in enumerate(train)}
    for seed in seeds:
        d_boot, d_lab = demo_keys(dspy_programs[seed], input_keys)
        b_boot, b_lab = demo_keys(bt_programs[seed], input_keys)
        same_selection += (d_boot, d_lab) == (b_boot, b_lab)
        if d_boot and b_boot:
            both_bootstrapped += 1
            same_text += demo_texts(dspy_programs[seed]) == demo_texts(bt_programs[seed])
        budget = args.max_bootstrapped_demos if seed < 0 else random.Random(seed).randint(1, args.max_bootstrapped_demos)
        print(f"{seed:4d} {budget:6d}  {dspy_calls[seed]:10d} {bt_calls[seed]:12d}  "
              f"{[index.get(k) for k in d_boot]} | {[index.get(k) for k in b_boot]}"
              f"{'' if (d_boot, d_lab) == (b_boot, b_lab) else '   (differ)'}")
    print(f"\n{same_selection}/{len(seeds)} candidates got the same demo set (same bootstrapped examples in the same "
          f"order, same labeled fill-ins); of the {both_bootstrapped} with bootstrapped demos on both sides, "
          f"{same_text} have the same generated reasoning text.")
    if args.temperature:
        print(f"At temperature {args.temperature} each side samples with its own RNG, so a trace can pass on one "
              f"side and fail on the other; rerun with --temperature 0 for a greedy comparison.")
    print(f"\nload: before {load_before}; after {load_after}")


if __name__ == "__main__":
    main()
