"""Chat messages -> token ids: the one place a prompt is rendered.

The inference engine and the LoRA trainer both call these functions, so the
prompt a model is trained on is, token for token, the prompt it sees at
inference (tests/unit/test_chat.py checks this against DSPy's adapter).
"""

from __future__ import annotations

from typing import Any, Sequence

Messages = Sequence[dict[str, str]]


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of the prompt for `messages`, ending where the assistant's answer begins."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return _as_list(ids)


def prompt_ids_batch(tokenizer: Any, conversations: Sequence[Messages]) -> list[list[int]]:
    """`prompt_ids` of each conversation, in one call: the tokenizer encodes the batch in Rust
    without holding the GIL (a single encode holds it)."""
    if not conversations:
        return []
    ids = tokenizer.apply_chat_template([list(m) for m in conversations], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return [_as_list(x) for x in ids]


def prefix_ids(tokenizer: Any, messages: Messages, full: list[int]) -> list[int]:
    """Ids of the part shared by every call with the same instructions and demos.

    That is the rendering of all messages but the last (system + demo turns), when it
    is a token-exact prefix of `full`; otherwise nothing is shared.
    """
    if len(messages) < 2:
        return []
    ids = _as_list(tokenizer.apply_chat_template(list(messages[:-1]), tokenize=True))
    return ids if full[: len(ids)] == ids and len(ids) < len(full) else []


def training_ids(tokenizer: Any, messages: Messages) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a conversation ending in the assistant's answer.

    The prompt part is exactly `prompt_ids(messages[:-1])`; labels are -100 there,
    so the loss covers only the assistant's tokens (answer + end-of-turn).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training example must end with an assistant message")
    prompt = prompt_ids(tokenizer, messages[:-1])
    prompt_text = tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the full conversation; "
                         "bt-ray cannot separate the answer tokens for this tokenizer")
    answer = _as_list(tokenizer.encode(full_text[len(prompt_text):], add_special_tokens=False))
    return prompt + answer, [-100] * len(prompt) + answer


def _as_list(ids: Any) -> list[int]:
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)
