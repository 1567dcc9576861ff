"""bt_ray.BetterTogether keeps dspy.BetterTogether's contract (fake engine and fake trainer, labelled; no Ray)."""

import dspy
import pytest
from dspy.teleprompt import BootstrapFinetune
from dspy.teleprompt.bootstrap_finetune import FinetuneTeleprompter
from dspy.teleprompt.teleprompt import Teleprompter

import bt_ray
from bt_ray.bettertogether import _split
from bt_ray.config import TaskConfig, load_config
from bt_ray.errors import BtRayError, ConfigError
from bt_ray.tasks.iris import IrisProgram, load_splits, metric

from bt_ray.inference.lm import pool_lm

from .fakes import FakePool, FakeSession, unique_tag
from .test_driver import fake_trainer  # noqa: F401  (fixture)
from .test_prompt_phase import noisy_classifier

SPLITS = load_splits(TaskConfig(), seed=0)
TRAIN, VAL = SPLITS.train, SPLITS.dev[:20]


class Same(Teleprompter):
    """Returns the student unchanged, recording what it was given and the LM it ran with."""

    def __init__(self):
        self.calls = []

    def compile(self, student, *, trainset, valset=None, teacher=None, rounds=1):
        self.calls.append({"trainset": trainset, "valset": valset, "teacher": teacher, "rounds": rounds,
                           "settings_lm": dspy.settings.lm.model,
                           "student_lms": {p.lm.model for p in student.predictors()}})
        return student


@pytest.fixture
def session(monkeypatch, tmp_path):
    config = load_config("configs/iris.yaml", [f"output_dir={tmp_path}", "prompt.train_size=10",
                                               "prompt.val_size=10", "prompt.num_candidates=4"])
    fake = FakeSession(noisy_classifier, config=config)
    monkeypatch.setattr("bt_ray.session._current", fake)
    return fake


@pytest.fixture
def no_session(monkeypatch):
    """Validation must fail before a session (Ray, the model) would start."""

    def refuse(*args, **kwargs):
        raise AssertionError("a session was started before the input was checked")

    monkeypatch.setattr("bt_ray.session._current", None)
    monkeypatch.setattr("bt_ray.bettertogether.init", refuse)


# ------------------------------------------------------------ constructor


def test_default_optimizers_are_bt_rays_pi_and_theta():
    optimizer = bt_ray.BetterTogether(metric=metric)
    assert optimizer.metric is metric
    assert isinstance(optimizer.optimizers["p"], bt_ray.PromptOptimizer)
    assert isinstance(optimizer.optimizers["w"], bt_ray.LoRAFinetune)
    custom = Same()
    assert bt_ray.BetterTogether(metric=metric, mipro=custom).optimizers == {"mipro": custom}
    with pytest.raises(TypeError, match="Optimizer 'p' must be a Teleprompter, got str"):
        bt_ray.BetterTogether(metric=metric, p="not_a_teleprompter")
    with pytest.raises(TypeError, match="unknown settings"):
        bt_ray.PromptOptimizer(metric, num_candidate=8)


# ------------------------------------------------------------ DSPy's validation errors, before any work


@pytest.mark.parametrize("kwargs, error, message", [
    ({"trainset": []}, ValueError, "trainset cannot be empty"),
    ({"valset_ratio": 1.0}, ValueError, r"valset_ratio must be in range \[0, 1\), got 1.0"),
    ({"valset_ratio": -0.1}, ValueError, r"valset_ratio must be in range \[0, 1\), got -0.1"),
    ({"strategy": ""}, ValueError, "strategy cannot be empty"),
    ({"strategy": "   "}, ValueError, "strategy cannot be empty"),
    ({"strategy": "p -> x -> w"}, ValueError, r"invalid optimizer keys: \['x'\]. Valid keys are: \['p', 'w'\]"),
    ({"optimizer_compile_args": {"q": {}}}, ValueError, "Invalid optimizer key 'q'"),
    ({"optimizer_compile_args": {"p": {"student": None}}}, ValueError, "'student' is not allowed"),
    ({"optimizer_compile_args": {"w": {"valset": VAL}}}, ValueError, r"Invalid compile arguments .* \['valset'\]"),
])
def test_bad_input_raises_dspys_errors(no_session, kwargs, error, message):
    args = {"trainset": TRAIN, **kwargs}
    with pytest.raises(error, match=message):
        bt_ray.BetterTogether(metric=metric).compile(IrisProgram(), **args)


def test_what_bt_ray_cannot_run_is_refused_before_work(no_session):
    student = IrisProgram()
    student.set_lm(dspy.LM("openai/gpt-4o-mini"))
    with pytest.raises(ConfigError, match="does not serve"):
        bt_ray.BetterTogether(metric=metric).compile(student, trainset=TRAIN)

    class ProviderFinetune(FinetuneTeleprompter):
        def compile(self, student, trainset, teacher=None):
            return student

    with pytest.raises(ConfigError, match="Ray Train"):
        bt_ray.BetterTogether(metric=metric, w=ProviderFinetune()).compile(IrisProgram(), trainset=TRAIN,
                                                                            strategy="w")
    with pytest.raises(ConfigError, match="train_kwargs"):
        bt_ray.BetterTogether(metric=metric, w=BootstrapFinetune(metric, train_kwargs={"lr": 1})).compile(
            IrisProgram(), trainset=TRAIN, strategy="w")
    compiled = IrisProgram()
    compiled._compiled = True
    with pytest.raises(ValueError, match="should not be compiled"):
        bt_ray.BetterTogether(metric=metric).compile(compiled, trainset=TRAIN)


# ------------------------------------------------------------ the return contract


def test_p_w_returns_best_with_dspys_candidate_programs(session, fake_trainer):
    optimizer = bt_ray.BetterTogether(metric=metric)
    compiled = optimizer.compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="p -> w")
    candidates = compiled.candidate_programs
    assert sorted(c["strategy"] for c in candidates) == ["", "p", "p -> w"]
    order = ["", "p", "p -> w"]
    keys = [(c["score"], -order.index(c["strategy"])) for c in candidates]
    assert keys == sorted(keys, reverse=True)  # best first, the earlier step on ties
    assert compiled is candidates[0]["program"] and compiled.flag_compilation_error_occurred is False
    steps = {s["step"]: s for s in optimizer.results["steps"]}
    assert [steps[order.index(c["strategy"])]["dev"] for c in candidates] == [c["score"] for c in candidates]
    assert all(s["dev_n"] == len(VAL) for s in steps.values())
    # 'w' collected traces on base, trained once, and the program after it is scored on the new version
    run = optimizer.run_dir.name
    assert fake_trainer == [f"{run}-v1"] and set(steps[2]["requests_by_version"]) == {"base", f"{run}-v1"}
    after_w = next(c["program"] for c in candidates if c["strategy"] == "p -> w")
    assert {p.lm.model.split("@")[1] for p in after_w.predictors()} == {f"{run}-v1"}
    assert (optimizer.run_dir / "results.md").exists() and (optimizer.run_dir / "state.json").exists()


def test_ties_go_to_the_earlier_step_and_custom_keys_run(session):
    a, b = Same(), Same()
    compiled = bt_ray.BetterTogether(metric=metric, a=a, b=b).compile(
        IrisProgram(), trainset=TRAIN, valset=VAL, strategy="a -> b -> a")
    assert [c["strategy"] for c in compiled.candidate_programs] == ["", "a", "a -> b", "a -> b -> a"]
    assert len({c["score"] for c in compiled.candidate_programs}) == 1  # unchanged programs score the same
    assert compiled is compiled.candidate_programs[0]["program"]  # so the starting program is returned
    assert len(a.calls) == 2 and len(b.calls) == 1


def test_without_valset_nothing_is_scored_and_the_last_program_returns(session):
    marks = []

    class Mark(Teleprompter):
        def compile(self, student, *, trainset):
            program = student.deepcopy()
            program.mark = len(marks)
            marks.append(program)
            return program

    compiled = bt_ray.BetterTogether(metric=metric, m=Mark()).compile(
        IrisProgram(), trainset=TRAIN, valset_ratio=0, strategy="m -> m")
    assert [c["score"] for c in compiled.candidate_programs] == [None, None, None]
    assert compiled.mark == 1 and [c["strategy"] for c in compiled.candidate_programs] == ["", "m", "m -> m"]
    assert session.pool.requests == []  # no scoring at all


def test_custom_optimizer_gets_dspys_arguments_and_the_current_model_version(session, fake_trainer):
    same, teacher = Same(), IrisProgram()
    optimizer = bt_ray.BetterTogether(metric=metric, w=bt_ray.LoRAFinetune(), mipro=same)
    optimizer.compile(IrisProgram(), trainset=TRAIN, valset_ratio=0.2, seed=3, strategy="mipro -> w -> mipro",
                      optimizer_compile_args={"mipro": {"rounds": 2, "teacher": teacher}})
    first, second = same.calls
    assert first["rounds"] == 2 and first["teacher"] is teacher
    assert len(first["valset"]) == 10 and len(first["trainset"]) == 40  # 20% of 50 held out, seeded
    assert {id(x) for x in first["trainset"]} == {id(x) for x in second["trainset"]}
    assert not {id(x) for x in first["valset"]} & {id(x) for x in first["trainset"]}
    assert first["settings_lm"].endswith("@base") and first["student_lms"] == {first["settings_lm"]}
    version = f"{optimizer.run_dir.name}-v1"
    assert second["settings_lm"].endswith(f"@{version}") and second["student_lms"] == {second["settings_lm"]}


def test_custom_optimizer_may_not_move_the_program_to_another_model(session):
    class Elsewhere(Teleprompter):
        def compile(self, student, *, trainset):
            student.set_lm(dspy.LM("openai/gpt-4o-mini"))
            return student

    class Unbound(Teleprompter):
        def compile(self, student, *, trainset):
            program = student.deepcopy()
            for predictor in program.predictors():
                predictor.lm = None
            return program

    compiled = bt_ray.BetterTogether(metric=metric, u=Unbound()).compile(IrisProgram(), trainset=TRAIN, strategy="u")
    assert all(p.lm is not None and p.lm.model.endswith("@base") for p in compiled.predictors())
    with pytest.raises(BtRayError, match="only bt-ray's weight steps change the model"):
        bt_ray.BetterTogether(metric=metric, x=Elsewhere()).compile(IrisProgram(), trainset=TRAIN, strategy="x")


def test_dspys_bootstrap_finetune_runs_as_bt_rays_theta(session, fake_trainer):
    optimizer = bt_ray.BetterTogether(metric=metric, w=BootstrapFinetune(metric=metric, exclude_demos=True))
    student = IrisProgram()
    student.predictors()[0].demos = [TRAIN[0]]
    compiled = optimizer.compile(student, trainset=TRAIN, valset=VAL, strategy="w")
    after = next(c["program"] for c in compiled.candidate_programs if c["strategy"] == "w")
    assert fake_trainer == [f"{optimizer.run_dir.name}-v1"] and after.predictors()[0].demos == []


def test_max_errors_stops_compile_and_none_counts_them(session):
    session.pool.engine.responder = lambda request: "not DSPy's format"
    with pytest.raises(BtRayError, match="max_errors=5"):
        bt_ray.BetterTogether(metric=metric, a=Same()).compile(IrisProgram(), trainset=TRAIN, valset=VAL,
                                                                strategy="a", max_errors=5)
    compiled = bt_ray.BetterTogether(metric=metric, a=Same()).compile(IrisProgram(), trainset=TRAIN, valset=VAL,
                                                                       strategy="a")
    assert [c["score"] for c in compiled.candidate_programs] == [0.0, 0.0]


def test_teacher_bootstraps_pi_and_gives_theta_its_traces(session, monkeypatch):
    """A teacher on its own (fake) model that answers from the labels: Π bootstraps with it and Θ's
    training examples are its answers, not the student's."""
    fields = ("petal_length", "petal_width", "sepal_length", "sepal_width")
    labels = {tuple(ex[f] for f in fields): ex.answer for ex in TRAIN}

    def knows(request):
        last = request.messages[-1]["content"]
        key = tuple(last.split(f"[[ ## {f} ## ]]\n")[1].split("\n")[0] for f in fields)
        return f"[[ ## reasoning ## ]]\nknown\n\n[[ ## answer ## ]]\n{labels.get(key, 'none')}\n\n"

    teacher, teacher_pool = IrisProgram(), FakePool(knows)
    teacher.set_lm(pool_lm(teacher_pool, unique_tag(), None, temperature=0.1, max_tokens=64))
    trained = []
    monkeypatch.setattr("bt_ray.phases.finetune.train_lora",
                        lambda examples, *a, **k: trained.append(examples) or fake_trainer_result(k["name"]))
    optimizer = bt_ray.BetterTogether(metric=metric)
    optimizer.compile(IrisProgram(), trainset=TRAIN, valset=VAL, teacher=teacher, strategy="p")
    pi_calls = optimizer.results["steps"][1]["details"]["bootstrap_calls"]
    assert pi_calls > 0 and len(teacher_pool.requests) == pi_calls  # Π bootstrapped on the teacher's model only
    optimizer.compile(IrisProgram(), trainset=TRAIN, valset=VAL, teacher=teacher, strategy="w")
    assert len(trained[0]) >= len(TRAIN) - 2  # (nearly) every teacher trace passed
    assert all("known" in messages[-1]["content"] for messages in trained[0])
    with pytest.raises(ConfigError, match="one teacher"):
        optimizer.compile(IrisProgram(), trainset=TRAIN, teacher=[teacher, teacher.deepcopy()], strategy="p")


def fake_trainer_result(name):
    from types import SimpleNamespace

    return SimpleNamespace(adapter_dir=f"/fake/{name}", examples=1, dropped=0, trained_tokens=1, total_tokens=1,
                           steps=1, losses=[1.0], wall_s=0.0, workers=1)


def test_valset_hold_out_is_seeded_and_keeps_train_order():
    train, val = _split(TRAIN, None, 0.1, seed=1)
    assert len(val) == 5 and len(train) == 45 and _split(TRAIN, None, 0.1, seed=1) == (train, val)
    assert train == [x for x in TRAIN if x not in val]
    assert _split(TRAIN, None, 0.0, seed=1) == (TRAIN, None)
    assert _split(TRAIN, VAL, 0.5, seed=1) == (TRAIN, VAL)


def test_a_failing_step_raises_and_resume_continues_after_the_last_finished_one(session):
    session.config.name = "mine"
    a, calls = Same(), []

    class Flaky(Teleprompter):
        def compile(self, student, *, trainset):
            calls.append(len(trainset))
            if len(calls) == 1:
                raise RuntimeError("killed")
            return student

    optimizer = bt_ray.BetterTogether(metric=metric, a=a, b=Flaky())
    with pytest.raises(RuntimeError, match="killed"):
        optimizer.compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="a -> b")
    with pytest.raises(ConfigError, match="already holds a run"):
        optimizer.compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="a -> b")
    session.resume = True
    compiled = optimizer.compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="a -> b")
    assert len(a.calls) == 1 and len(calls) == 2  # 'a' was not run again
    assert [c["strategy"] for c in compiled.candidate_programs] == ["", "a", "a -> b"]
    assert optimizer.run_dir.name == "mine"
    # A resume that changes what stands behind a finished key, or the data, is refused.
    changed = bt_ray.BetterTogether(metric=metric, a=bt_ray.PromptOptimizer(num_candidates=9), b=Flaky())
    with pytest.raises(ConfigError, match=r"other optimizer settings \(a: Same\(\) -> PromptOptimizer\(num_candidates=9\)"):
        changed.compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="a -> b")
    with pytest.raises(ConfigError, match="made on other data"):
        optimizer.compile(IrisProgram(), trainset=TRAIN[:-1], valset=VAL, strategy="a -> b")


def test_pi_selects_on_a_trainset_subsample_unless_given_a_valset_for_its_key(session):
    optimizer = bt_ray.BetterTogether(metric=metric)
    optimizer.compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="p")
    assert optimizer.results["steps"][1]["details"]["val_size"] == 10  # prompt.val_size, not the 20 of valset
    optimizer.compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="p",
                      optimizer_compile_args={"p": {"valset": VAL[:5]}})
    assert optimizer.results["steps"][1]["details"]["val_size"] == 5
    with pytest.raises(ConfigError, match="which has 7"):  # the key's own trainset is the one Π gets
        optimizer.compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="p",
                          optimizer_compile_args={"p": {"valset": VAL[:5], "trainset": TRAIN[:7]}})


def test_resume_sees_a_dspy_teleprompters_changed_settings_but_not_what_its_compile_left(session):
    """A DSPy teleprompter's constructor settings stand behind its key; its metric and compile() state do not."""
    session.config.name = "fs-run"
    fs = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=2, max_labeled_demos=2)
    bt_ray.BetterTogether(metric=metric, fs=fs).compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="fs")
    session.resume = True
    again = bt_ray.BetterTogether(metric=metric, fs=fs)  # the same instance, compiled once already
    again.compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="fs")
    fresh = dspy.BootstrapFewShot(metric=lambda *a, **k: True, max_bootstrapped_demos=2, max_labeled_demos=2)
    bt_ray.BetterTogether(metric=metric, fs=fresh).compile(IrisProgram(), trainset=TRAIN, valset=VAL, strategy="fs")
    more = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=3, max_labeled_demos=2)
    with pytest.raises(ConfigError, match=r"fs: BootstrapFewShot\(.*max_bootstrapped_demos=2.* -> "
                                          r"BootstrapFewShot\(.*max_bootstrapped_demos=3"):
        bt_ray.BetterTogether(metric=metric, fs=more).compile(IrisProgram(), trainset=TRAIN, valset=VAL,
                                                              strategy="fs")
