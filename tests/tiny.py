"""A tiny random-weight Llama, a fixed-answer dataset and the adapter shapes it must give: shared by the
GPU tests and the CPU DeepSpeed tests."""

from pathlib import Path

from bt_ray.synthetic import words

# A small random-weight Llama: vLLM starts it in seconds; LoRA learns a fixed answer in a few steps.
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 2048}

# LoRA settings whose tensors ZeRO-3 really splits on TINY: rank 512 puts q's and k's lora_A and q's
# lora_B (131,072 elements) above DeepSpeed's 1e5-element stage3_param_persistence_threshold (rank 8 kept
# every tensor whole, and the gather before saving went untested); k's lora_B (65,536) stays whole.
ZERO3_SPLIT_LORA = {"lora_rank": 512, "lora_alpha": 1024, "learning_rate": 3e-4}


def examples(answer_word: int) -> list[list[dict]]:
    """16 prompts (the test prompt among them), all answered with the same four words."""
    prompts = [words([100, 101, 102])] + [words([i, i + 1, i + 2]) for i in range(20, 35)]
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": words([answer_word] * 4)}]
            for p in prompts]


def assert_full_size_adapter(adapter_dir: str, rank: int) -> dict:
    """The saved q,k LoRA tensors of TINY have their full shapes (ZeRO-3's local partitions are empty)."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    hidden, kv = TINY["hidden_size"], TINY["num_key_value_heads"] * TINY["head_dim"]
    expected = {"q_proj.lora_A": (rank, hidden), "q_proj.lora_B": (hidden, rank),
                "k_proj.lora_A": (rank, hidden), "k_proj.lora_B": (kv, rank)}
    assert len(tensors) == 4 * TINY["num_hidden_layers"], sorted(tensors)
    for name, tensor in tensors.items():
        key = next(k for k in expected if k in name)
        assert tuple(tensor.shape) == expected[key], (name, tuple(tensor.shape))
    return tensors
