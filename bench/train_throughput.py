"""LoRA training throughput on CPU: 1 vs 2 Ray Train workers on the same examples, in one run.

    python bench/train_throughput.py                  # 1 vs 2 workers (Ray Train, gloo)
    python bench/train_throughput.py --dtype-probe    # fp32 vs bf16 fwd+bwd+AdamW step, no Ray

Prints wall time (fit(), with worker start-up and model load), the time inside the training
loop, and trained (assistant) tokens/s for each; the ratio is from the same run, so it is
comparable even when the machine is noisy. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MODEL_DIR = os.path.expanduser("~/.cache/bt-ray/models/SmolLM2-135M-Instruct")
SPECIES = ["setosa", "versicolor", "virginica"]
INSTRUCTIONS = ("Your input fields are:\n1. `petal_length` (float)\n2. `petal_width` (float)\n"
                "3. `sepal_length` (float)\n4. `sepal_width` (float)\nYour output fields are:\n"
                "1. `reasoning` (str)\n2. `answer` (str): one of setosa, versicolor, virginica\n"
                "Given the measurements of an iris flower, name its species.")


def iris_like_examples(n: int) -> list[list[dict]]:
    """Chat examples shaped like DSPy ChatAdapter Iris calls (no demos): ~200 tokens, ~40 answer tokens."""
    out = []
    for i in range(n):
        fields = {"petal_length": 1.2 + 0.11 * i, "petal_width": 0.2 + 0.05 * i,
                  "sepal_length": 4.8 + 0.07 * i, "sepal_width": 3.1 - 0.02 * i}
        user = "\n\n".join(f"[[ ## {k} ## ]]\n{v:.1f}" for k, v in fields.items())
        species = SPECIES[i % 3]
        answer = (f"[[ ## reasoning ## ]]\nThe petal length is {fields['petal_length']:.1f} cm and the petal "
                  f"width {fields['petal_width']:.1f} cm, which fits {species}.\n\n"
                  f"[[ ## answer ## ]]\n{species}\n\n[[ ## completed ## ]]")
        out.append([{"role": "system", "content": INSTRUCTIONS},
                    {"role": "user", "content": user + "\n\nRespond with the fields in order."},
                    {"role": "assistant", "content": answer}])
    return out


def bench_workers(args: argparse.Namespace) -> None:
    import ray

    from bt_ray.config import TrainConfig
    from bt_ray.train.trainer import train_lora

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    examples = iris_like_examples(args.examples)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for workers in args.workers:
            config = TrainConfig(num_workers=workers, epochs=args.epochs, learning_rate=1e-4, max_seq_len=512,
                                 bf16=args.bf16, torch_threads=args.torch_threads)
            result = train_lora(examples, config, MODEL_DIR, out, name=f"bench-w{workers}")
            rows.append((workers, result))
            print(f"workers={workers} (torch threads {config.torch_threads or 'cores/workers'}): wall {result.wall_s:.1f}s, training loop {result.train_s:.1f}s, "
                  f"{result.steps} steps, {result.trained_tokens} trained / {result.total_tokens} total tokens, "
                  f"{result.trained_tokens / result.train_s:.1f} trained tok/s "
                  f"({result.total_tokens / result.train_s:.1f} total tok/s) in the loop, "
                  f"{result.trained_tokens / result.wall_s:.1f} trained tok/s wall, final loss {result.losses[-1]:.4f}",
                  flush=True)
    ray.shutdown()
    (w0, base), *others = rows
    for workers, result in others:
        print(f"{workers} vs {w0} workers: loop speed-up {base.train_s / result.train_s:.2f}x, "
              f"wall speed-up {base.wall_s / result.wall_s:.2f}x")


def dtype_probe(args: argparse.Namespace) -> None:
    """Best-of-reps seconds of one LoRA fwd+bwd+AdamW step at micro-batch 1, fp32 vs bf16 base, interleaved."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    models = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "k_proj"],
                                                 task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        models[name] = (model, opt)
    for length in args.lengths:
        ids = torch.randint(100, 40000, (1, length))
        times = {name: [] for name in models}
        for rep in range(args.reps + 1):  # the first round warms up
            for name, (model, opt) in models.items():
                start = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
                if rep:
                    times[name].append(time.perf_counter() - start)
        med = {name: min(t) for name, t in times.items()}  # best of reps: the least disturbed by other load
        print(f"seq {length:4d}, {args.threads} threads: " + ", ".join(
            f"{name} {med[name]:.2f}s/step ({length / med[name]:.0f} tok/s)" for name in med)
            + f"; bf16/fp32 time {med['bf16'] / med['fp32']:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype-probe", action="store_true", help="fp32 vs bf16 step time, no Ray")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="train.bf16 (on CPU the trainer decides; see CPU_BF16 in bt_ray/train/trainer.py)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="train.torch_threads per worker (0: the node's cores / workers)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    dtype_probe(args) if args.dtype_probe else bench_workers(args)


if __name__ == "__main__":
    main()
