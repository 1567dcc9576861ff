"""LoRA training on one GPU through Ray Train: optimizer step time and tokens/s.

An architecture from bench/models/ (--arch: smollm2-135m, the model bt-ray ships, by default; or
llama-3-8b) with random weights and its own vocab_size, LoRA r32 on q_proj,k_proj (the paper's),
bf16, NCCL, effective batch 8 as 2 micro-batches of 4; 64 examples of ~600 prompt + 60 answer
tokens. With CUDA the random checkpoint is built directly in bf16 on the GPU (Llama-3-8B: 16 GB,
not 32 GB of fp32 on the CPU); its build-and-save time is model_build_s. Prints wall time of fit()
(worker start-up and model load included), the time inside the training loop, seconds per
optimizer step and tokens/s (all tokens, and trained = answer tokens). Not a test: numbers depend
on the GPU.

    python bench/gpu_train.py                       # SmolLM2-135M shapes, DDP (train.distributed=ddp), 2 epochs
    python bench/gpu_train.py --distributed zero2   # DeepSpeed ZeRO-2, needs deepspeed
    python bench/gpu_train.py --arch llama-3-8b --epochs 1 --examples 32
    python bench/gpu_train.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(key, value)

from bt_ray.config import TrainConfig  # noqa: E402
from bt_ray.synthetic import ROLES, SPECIALS, random_model, read_config, words  # noqa: E402

MODELS = Path(__file__).resolve().parent / "models"
ARCHS = sorted(path.stem for path in MODELS.glob("*.json"))


def examples(n: int, vocab_size: int) -> list[list[dict]]:
    """400 shared system words, 200 user words of each example's own, 60 answer words; word ids wrap
    around so that every word is in the word tokenizer's vocabulary (no <unk>)."""
    span = vocab_size - len(SPECIALS) - len(ROLES)  # words w0 .. w{span-1}

    def text(ids: range) -> str:
        return words([i % span for i in ids])

    return [[{"role": "system", "content": text(range(100, 500))},
             {"role": "user", "content": text(range(1000 + 200 * i, 1200 + 200 * i))},
             {"role": "assistant", "content": text(range(20000 + i, 20060 + i))}] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="smollm2-135m", choices=ARCHS, help="architecture from bench/models/")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--distributed", default="ddp", choices=["ddp", "zero2", "zero3"])
    parser.add_argument("--max-seq-len", type=int, default=1024, help="train.max_seq_len")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    import ray
    import torch

    from bt_ray.inference.placement import connect
    from bt_ray.train.trainer import train_lora

    work = Path(tempfile.mkdtemp(prefix="bt-ray-train-bench-"))
    arch = read_config(MODELS / f"{args.arch}.json")
    vocab_size = int(arch["vocab_size"])
    device = "cuda" if torch.cuda.is_available() else None  # bf16 straight on the GPU: no fp32 copy on the CPU
    start = time.perf_counter()
    model_dir = str(random_model(work / f"{args.arch}-random", arch, vocab_size=vocab_size, device=device))
    build_s = time.perf_counter() - start
    config = TrainConfig(use_gpu=True, num_workers=1, epochs=args.epochs, batch_size=8, micro_batch_size=4,
                         learning_rate=1e-4, max_seq_len=args.max_seq_len, distributed=args.distributed)
    connect(None)
    try:
        result = train_lora(examples(args.examples, vocab_size), config, model_dir, str(work / "runs"), "bench",
                            seed=0)
    finally:
        ray.shutdown()
    out = {"gpu": torch.cuda.get_device_name(0), "model": f"{args.arch} shapes, random weights, bf16",
           "vocab_size": vocab_size, "max_seq_len": args.max_seq_len, "model_build_s": round(build_s, 1),
           "lora": "r32 q_proj,k_proj", "distributed": args.distributed, "examples": result.examples,
           "steps": result.steps, "fit_wall_s": round(result.wall_s, 1), "train_s": round(result.train_s, 2),
           "s_per_step": round(result.train_s / result.steps, 3),
           "tokens_per_s": round(result.total_tokens / result.train_s),
           "trained_tokens_per_s": round(result.trained_tokens / result.train_s),
           "first_loss": round(result.losses[0], 3), "last_loss": round(result.losses[-1], 3)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
