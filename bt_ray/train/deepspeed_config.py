"""The DeepSpeed config for train.distributed=zero2 / zero3 (plain data; DeepSpeed is imported by the trainer).

bt-ray keeps its own gradient accumulation (the recipe's micro-batches, token-mean loss), so
DeepSpeed runs with gradient_accumulation_steps=1 and the recipe marks the last micro-batch of
each optimizer step as the accumulation boundary. The optimizer is torch's AdamW passed in by
the recipe (no DeepSpeed CUDA ops to build on the node), hence zero_allow_untested_optimizer.
"""

from __future__ import annotations

from typing import Any

STAGES = {"zero2": 2, "zero3": 3}


def deepspeed_config(distributed: str, micro_batch_size: int, world_size: int, bf16: bool) -> dict[str, Any]:
    if distributed not in STAGES:
        raise ValueError(f"train.distributed={distributed!r} is not a DeepSpeed mode ({', '.join(STAGES)})")
    zero: dict[str, Any] = {
        "stage": STAGES[distributed],
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
    }
    if zero["stage"] == 3:
        # Saving gathers the LoRA tensors explicitly (deepspeed.zero.GatheredParameters); a
        # plain state_dict() under ZeRO-3 holds empty partitions: the known empty-adapter bug.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # bt-ray logs its own losses
        "wall_clock_breakdown": False,
    }
