"""bt_ray.synthetic: the no-download tokenizer, config and adapter that GPU tests and benchmarks use."""

import json

from bt_ray.inference.chat import prompt_ids, training_ids
from bt_ray.inference.vllm_args import adapter_rank
from bt_ray.synthetic import random_lora, word_tokenizer, words, write_config_only

ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "vocab_size": 300,
        "_comment": "dropped", "rope_theta": 10000.0}


def test_one_word_is_one_token_and_the_prompt_is_a_prefix_of_the_conversation(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(word_tokenizer(tmp_path, 300))
    messages = [{"role": "user", "content": words([1, 2, 3])}, {"role": "assistant", "content": words([7, 7])}]
    prompt = prompt_ids(tokenizer, messages[:1])
    ids, labels = training_ids(tokenizer, messages)  # raises if the template broke the prefix property
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 3  # w7 w7 <|im_end|>
    assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[len(prompt):], skip_special_tokens=True) == "w7 w7"
    assert len(tokenizer) == 300


def test_config_only_checkpoint_keeps_the_architecture(tmp_path):
    out = write_config_only(tmp_path, ARCH)
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_key_value_heads"], config["vocab_size"]) == (64, 2, 300)
    assert config["architectures"] == ["LlamaForCausalLM"] and "_comment" not in config
    assert not list(out.glob("*.safetensors"))  # no weights: vLLM's load_format=dummy makes them


def test_random_lora_has_peft_names_and_shapes(tmp_path):
    from safetensors.torch import load_file

    out = random_lora(tmp_path, ARCH, rank=8)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert adapter_rank(out) == 8 and len(tensors) == 2 * 2 * 2  # layers x (q, k) x (A, B)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (2 * 16, 8)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
