"""A dspy.BetterTogether script moved to bt-ray: one import changed, plus a session for the cluster.

    python examples/bettertogether_iris.py                   # Π→Θ→Π on Iris with the shipped SmolLM2-135M
    python examples/bettertogether_iris.py --strategy "p -> w"
    python examples/bettertogether_iris.py --strategy "mipro -> w" --prompt-model openai/gpt-4o-mini
        # DSPy's MIPROv2 behind the key "mipro"; its program runs through the pool, its instruction proposer on
        # --prompt-model (a LiteLLM id; the key from the environment). Left out, the proposer is the shipped
        # 135M model, which does not follow MIPROv2's proposal format: the step fails with AdapterParseError.
    RAY_ADDRESS=auto python examples/bettertogether_iris.py  # join a running Ray cluster instead of starting one

Subsamples are small so the laptop run takes a few minutes; drop the overrides for the paper's Iris sizes.
"""

import argparse
import logging

import dspy

import bt_ray  # was: nothing; dspy.BetterTogether below becomes bt_ray.BetterTogether
from bt_ray.config import TaskConfig
from bt_ray.tasks.iris import IrisProgram, load_splits, metric

SMALL = [
    "prompt.train_size=10", "prompt.val_size=10", "prompt.num_candidates=4",  # Π: the paper uses 15 / 35 / 6
    "inference.max_tokens=96",  # the base model rambles; a cap keeps a wrong answer cheap
    # Θ on a few dozen traces: 2 epochs at 1e-4 move the loss (the paper's 1e-5 does not, measured)
    "train.epochs=2", "train.learning_rate=1e-4", "train.batch_size=4", "train.metric_threshold=0",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategy", default="p -> w -> p")
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--mipro-trials", type=int, default=4, help="MIPROv2 trials when the strategy uses 'mipro'")
    parser.add_argument("--prompt-model", help="LiteLLM model id for MIPROv2's instruction proposals")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("dspy", "LiteLLM", "httpx", "filelock"):  # one line per unparsable answer is too many
        logging.getLogger(noisy).setLevel(logging.ERROR)

    splits = load_splits(TaskConfig(), seed=0)  # scikit-learn's Iris, 50 / 50 / 50
    trainset, valset, testset = splits.train[:30], splits.dev[:15], splits.test[:20]

    with bt_ray.init(None, [*SMALL, f"output_dir={args.output_dir}"]) as session:  # Ray, model, inference pool
        student = IrisProgram()
        student.set_lm(session.lm())  # was: student.set_lm(dspy.LM(...)); the pool is a dspy.LM

        optimizers, compile_args = {}, {}
        if "mipro" in args.strategy:  # any DSPy Teleprompter can stand behind a key; its calls go through the pool
            lm = session.lm()  # MIPROv2 wants a task and a prompt model; bt-ray rebinds the task to each step's version
            proposer = dspy.LM(args.prompt_model) if args.prompt_model else lm
            optimizers["mipro"] = dspy.MIPROv2(metric, prompt_model=proposer, task_model=lm, auto=None,
                                               num_candidates=3, max_bootstrapped_demos=2, max_labeled_demos=2,
                                               num_threads=16)
            compile_args["mipro"] = {"num_trials": args.mipro_trials, "minibatch": False}
            # as in DSPy, passing optimizers replaces the defaults: keep bt-ray's Π and Θ under p and w
            optimizers.update(p=bt_ray.PromptOptimizer(), w=bt_ray.LoRAFinetune())
        optimizer = bt_ray.BetterTogether(metric=metric, **optimizers)  # was: dspy.BetterTogether(metric=metric)
        compiled = optimizer.compile(student, trainset=trainset, valset=valset, strategy=args.strategy,
                                     optimizer_compile_args=compile_args or None)

        for candidate in compiled.candidate_programs:  # best on valset first, as in DSPy
            print(f"{candidate['strategy'] or '(zero-shot)':>12}  valset {candidate['score']:5.1f}")
        # The valset chose this program, so its valset score flatters it: score it once on held-out examples.
        with dspy.context(adapter=session.adapter):
            test = dspy.Evaluate(devset=testset, metric=metric, num_threads=16, display_progress=False)(compiled)
        print(f"returned: {compiled.candidate_programs[0]['strategy'] or '(zero-shot)'}, test {test.score:.1f} "
              f"on {len(testset)} held-out examples")
        print(f"per-step table, checkpoints and adapters: {optimizer.run_dir}/results.md")


if __name__ == "__main__":
    main()
