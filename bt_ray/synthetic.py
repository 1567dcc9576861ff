"""Models that need no download, for GPU tests and benchmarks (like DSPy's DummyLM, shipped with the package).

    word_tokenizer(out_dir, vocab_size)      a word-level tokenizer with a chat template
    random_model(out_dir, config, ...)       a random-weight checkpoint of any Llama-type config (CPU or a device)
    write_config_only(out_dir, config, ...)  config + tokenizer, no weights (vLLM load_format=dummy)
    random_lora(out_dir, config, rank)       a peft-format adapter of random values for that config

Words are "w0", "w1", ...; one word is one token, so prompt lengths are exact. The chat
template renders the prompt as a prefix of the whole conversation, as bt-ray's trainer needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def words(ids: list[int] | range) -> str:
    return " ".join(f"w{i}" for i in ids)


def word_tokenizer(out_dir: str | Path, vocab_size: int) -> Path:
    """A fast tokenizer of `vocab_size` entries (specials, roles, then w0, w1, ...) saved to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fixed = SPECIALS + ROLES
    if vocab_size <= len(fixed):
        raise ValueError(f"vocab_size must exceed {len(fixed)}")
    vocab = {token: i for i, token in enumerate(fixed)}
    vocab.update({f"w{i}": len(fixed) + i for i in range(vocab_size - len(fixed))})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out


def _llama_config(config: dict[str, Any], vocab_size: int) -> Any:
    from transformers import LlamaConfig

    values = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "dtype")}
    values.update(vocab_size=vocab_size, bos_token_id=SPECIALS.index("<|im_start|>"),
                  eos_token_id=SPECIALS.index("<|im_end|>"), pad_token_id=SPECIALS.index("<pad>"))
    llama = LlamaConfig(**values)
    llama.architectures = ["LlamaForCausalLM"]
    return llama


def write_config_only(out_dir: str | Path, config: dict[str, Any], tokenizer_vocab: int | None = None) -> Path:
    """config.json (the given architecture) + a word tokenizer: enough for vLLM with load_format=dummy."""
    out = Path(out_dir)
    vocab = int(config["vocab_size"])
    word_tokenizer(out, tokenizer_vocab or vocab)
    llama = _llama_config(config, vocab)
    llama.dtype = "bfloat16"
    llama.save_pretrained(out)
    return out


def random_model(out_dir: str | Path, config: dict[str, Any], vocab_size: int = 512, seed: int = 0,
                 device: str | None = None) -> Path:
    """A random-weight LlamaForCausalLM checkpoint (bf16) with a word tokenizer, saved to `out_dir`.

    `device=None` builds it on the CPU in fp32, then casts to bf16. A device ("cuda", "cpu") builds it
    directly in bf16 on that device: no fp32 copy, so an 8B model needs 16 GB and seconds, not 32 GB and
    minutes (for the same seed its values need not match the device=None ones)."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    word_tokenizer(out, vocab_size)
    torch.manual_seed(seed)
    if device is None:
        model = LlamaForCausalLM(_llama_config(config, vocab_size)).to(torch.bfloat16)
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16 (works with transformers 4 and 5)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(_llama_config(config, vocab_size))
        finally:
            torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = SPECIALS.index("<|im_end|>")
    model.save_pretrained(out)
    if device is not None and torch.device(device).type == "cuda":
        del model
        torch.cuda.empty_cache()  # give the memory back to whoever loads the checkpoint next (a training worker)
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def random_lora(out_dir: str | Path, config: dict[str, Any], rank: int, targets: tuple[str, ...] = ("q_proj", "k_proj"),
                seed: int = 0) -> Path:
    """A peft-format LoRA adapter of random values for a Llama-type `config` (no model needed)."""
    import torch
    from safetensors.torch import save_file

    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // int(config["num_attention_heads"]))
    out_features = {"q_proj": int(config["num_attention_heads"]) * head_dim,
                    "k_proj": int(config["num_key_value_heads"]) * head_dim,
                    "v_proj": int(config["num_key_value_heads"]) * head_dim}
    unknown = set(targets) - set(out_features)
    if unknown:
        raise ValueError(f"random_lora supports {sorted(out_features)}, not {sorted(unknown)}")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(config["num_hidden_layers"])):
        for target in targets:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features[target], rank, generator=generator) * 0.01
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "base_model_name_or_path": None}))
    return out
