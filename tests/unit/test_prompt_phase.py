"""Π gives the same candidates and scores as DSPy's BootstrapFewShotWithRandomSearch (fake engine, no Ray)."""

import hashlib

import dspy
import pytest
from dspy.teleprompt import BootstrapFewShotWithRandomSearch

from bt_ray.config import PromptConfig, TaskConfig
from bt_ray.inference.lm import pool_lm
from bt_ray.phases.prompt import _subsample, optimize_prompts
from bt_ray.session import chat_adapter
from bt_ray.tasks.iris import IrisProgram, load_splits, metric

from .fakes import FakePool, unique_tag


def noisy_classifier(request):
    """A deterministic fake model: a rule on the petals, wrong on ~40% of distinct prompts."""
    last = request.messages[-1]["content"]
    petal_length = float(last.split("[[ ## petal_length ## ]]\n")[1].split("\n")[0])
    guess = "setosa" if petal_length < 2.5 else ("versicolour" if petal_length < 4.9 else "virginica")
    flip = int(hashlib.sha256(repr(request.messages).encode()).hexdigest(), 16) % 10 < 4
    if flip:
        guess = {"setosa": "virginica", "versicolour": "setosa", "virginica": "versicolour"}[guess]
    return f"[[ ## reasoning ## ]]\nlength {petal_length}\n\n[[ ## answer ## ]]\n{guess}\n\n"


def _demos(program):
    return [[dict(d.items()) for d in pred.demos] for pred in program.predictors()]


@pytest.fixture
def setup():
    pool = FakePool(responder=noisy_classifier)
    lm = pool_lm(pool, unique_tag(), None, temperature=0.1, max_tokens=64)
    splits = load_splits(TaskConfig(), seed=0)
    config = PromptConfig(train_size=15, val_size=35, num_candidates=6)
    return pool, lm, splits, config


def test_same_candidates_and_scores_as_dspy(setup):
    pool, lm, splits, config = setup
    ours = optimize_prompts(IrisProgram(), splits.train, metric, lm=lm, adapter=chat_adapter(), config=config,
                            seed=0, max_inflight=16)

    train, val = _subsample(splits.train, config, seed=0)
    student = IrisProgram()
    student.set_lm(lm)
    with dspy.context(adapter=chat_adapter(), lm=lm):
        theirs = BootstrapFewShotWithRandomSearch(metric=metric, max_bootstrapped_demos=3, max_labeled_demos=3,
                                                  num_candidate_programs=3, num_threads=4).compile(
            student, trainset=train, valset=val)
    by_seed = {c["seed"]: c for c in theirs.candidate_programs}
    assert sorted(by_seed) == [row["seed"] for row in ours.candidates] == [-3, -2, -1, 0, 1, 2]
    for row in ours.candidates:
        assert row["score"] == pytest.approx(by_seed[row["seed"]]["score"]), row
    assert _demos(ours.program) == _demos(theirs)
    # every candidate got its own demos, bootstrapped ones first, at most max_labeled_demos in all
    assert {row["demos"] for row in ours.candidates if row["seed"] >= -2} <= {1, 2, 3}
    assert ours.candidates[0]["demos"] == 0


def test_best_candidate_is_bound_to_the_given_version(setup):
    pool, _, splits, config = setup
    pool.load_adapter("run-v1", "/nowhere")
    lm_v1 = pool_lm(pool, unique_tag(), "run-v1", temperature=0.1, max_tokens=64)
    result = optimize_prompts(IrisProgram(), splits.train, metric, lm=lm_v1, adapter=chat_adapter(),
                              config=config, seed=0, max_inflight=16)
    assert {r.adapter for r in pool.requests} == {"run-v1"}  # bootstrapping and scoring used v1 only
    assert all(pred.lm.model.endswith("@run-v1") for pred in result.program.predictors())


def test_subsample_needs_enough_examples(setup):
    _, lm, splits, _ = setup
    with pytest.raises(ValueError, match="prompt.train_size"):
        optimize_prompts(IrisProgram(), splits.train[:20], metric, lm=lm, adapter=chat_adapter(),
                         config=PromptConfig(train_size=15, val_size=35), seed=0, max_inflight=4)


def test_a_request_the_engine_refuses_fails_its_example_not_the_phase(setup):
    """A prompt too long for the model (RequestError from an engine) is one failed example, as DSPy's Evaluate
    counts it; a pool failure (EngineError) still stops the phase. FAKE engine."""
    from bt_ray.errors import EngineError, RequestError
    from bt_ray.phases.evaluate import evaluate

    def responder(failure):
        def answer(request):
            if "[[ ## petal_length ## ]]\n1.4" in request.messages[-1]["content"]:
                raise failure
            return noisy_classifier(request)
        return answer

    program, examples = IrisProgram(), setup[2].dev[:20]
    refused = sum("1.4" == str(ex.petal_length) for ex in examples)
    assert 0 < refused < 20
    for failure, expected in ((RequestError("prompt of 9000 tokens does not fit"), None),
                              (EngineError("replica-0 failed request r1"), EngineError)):
        pool = FakePool(responder(failure))
        program.set_lm(pool_lm(pool, unique_tag(), None, temperature=0.1, max_tokens=64))
        if expected:
            with pytest.raises(expected, match="replica-0"):
                evaluate(program, examples, metric, adapter=chat_adapter(), max_inflight=4)
            continue
        result = evaluate(program, examples, metric, adapter=chat_adapter(), max_inflight=4)
        assert result.n == 20 and result.errors == refused
