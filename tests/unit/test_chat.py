"""The training prompt equals what DSPy's adapter sends at inference, token for token."""

import dspy
import pytest

from bt_ray.inference import chat
from bt_ray.inference.lm import pool_lm, request_messages
from bt_ray.phases.finetune import trace_messages
from bt_ray.session import chat_adapter
from bt_ray.tasks.iris import IrisProgram

from .fakes import FakePool, unique_tag

ANSWER = "[[ ## reasoning ## ]]\nPetals are long.\n\n[[ ## answer ## ]]\nvirginica\n\n"


def _run_and_capture(program, adapter):
    pool = FakePool(responder=lambda request: ANSWER)
    program.set_lm(pool_lm(pool, unique_tag(), None, temperature=0.1, max_tokens=64))
    with dspy.context(trace=[], adapter=adapter):
        program(petal_length="5.1", petal_width="2.0", sepal_length="6.5", sepal_width="3.0")
        trace = list(dspy.settings.trace)
    return pool.requests, trace


@pytest.mark.parametrize("with_demos", [False, True])
def test_training_prompt_matches_inference_tokens(tokenizer, with_demos):
    adapter = chat_adapter()
    program = IrisProgram()
    if with_demos:
        program.pred.predict.demos = [
            dspy.Example(petal_length="1.4", petal_width="0.2", sepal_length="5.1", sepal_width="3.5",
                         reasoning="Small petals.", answer="setosa"),
            dspy.Example(petal_length="4.7", petal_width="1.4", sepal_length="7.0", sepal_width="3.2",
                         answer="versicolour"),
        ]
    requests, trace = _run_and_capture(program, adapter)
    assert len(requests) == 1 and len(trace) == 1

    inference_ids = chat.prompt_ids(tokenizer, requests[0].messages)
    [(name, messages)] = trace_messages(program, trace, adapter, include_demos=with_demos)
    input_ids, labels = chat.training_ids(tokenizer, messages)
    n_prompt = labels.index(next(label for label in labels if label != -100))

    assert name == "pred.predict"
    assert input_ids[:n_prompt] == inference_ids  # token for token
    answer = tokenizer.decode(input_ids[n_prompt:])
    assert answer.startswith("[[ ## reasoning ## ]]\nPetals are long.") and "[[ ## completed ## ]]" in answer
    assert all(label == -100 for label in labels[:n_prompt])
    assert labels[n_prompt:] == input_ids[n_prompt:]


def test_demos_left_out_of_training_prompt_by_default(tokenizer):
    adapter = chat_adapter()
    program = IrisProgram()
    program.pred.predict.demos = [dspy.Example(petal_length="1.4", petal_width="0.2", sepal_length="5.1",
                                               sepal_width="3.5", reasoning="Small.", answer="setosa")]
    requests, trace = _run_and_capture(program, adapter)
    [(_, without)] = trace_messages(program, trace, adapter, include_demos=False)
    [(_, with_demos)] = trace_messages(program, trace, adapter, include_demos=True)
    assert len(without) == 3 and len(with_demos) == 5  # system, user, assistant (+ one demo pair)
    assert with_demos[:-1] == list(requests[0].messages)


def test_prefix_ids_cover_system_and_demos(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    full = chat.prompt_ids(tokenizer, messages)
    prefix = chat.prefix_ids(tokenizer, messages, full)
    assert 0 < len(prefix) < len(full) and full[: len(prefix)] == prefix
    assert "q2" not in tokenizer.decode(prefix) and "a1" in tokenizer.decode(prefix)


def test_request_round_trip_keeps_system_first():
    from dspy.lm15 import Message, Request

    request = Request(model="m", messages=(Message.user("hi"),), system="be brief")
    assert request_messages(request) == ({"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "hi"})
