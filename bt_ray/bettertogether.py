"""bt_ray.BetterTogether: DSPy 3.4.1's `dspy.BetterTogether`, run on bt-ray.

Same constructor, same `compile(...)` signature, same strategy strings, same validation errors and the
same return contract (`candidate_programs`, best first, earlier steps winning ties). Underneath, every
step runs on bt-ray's phase loop (bt_ray.driver.PhaseLoop), the one `bt-ray run` uses: all model calls
go through the session's inference pool, 'w' trains a LoRA adapter on Ray Train and the program after it
runs on that adapter version, and every step is checkpointed to <output_dir>/<run>/ with a results table.

Where it deliberately differs from DSPy's, and why, is listed in the README ("From dspy.BetterTogether
to bt-ray"); each difference is marked `# differs:` below.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import re
import time
from pathlib import Path
from typing import Any, Callable

from dspy.primitives.module import Module
from dspy.teleprompt.bootstrap_finetune import prepare_student, prepare_teacher
from dspy.teleprompt.teleprompt import Teleprompter

from bt_ray.config import RunConfig
from bt_ray.driver import PhaseLoop
from bt_ray.errors import ConfigError
from bt_ray.inference.lm import PoolEngine
from bt_ray.optimizers import LoRAFinetune, PromptOptimizer, build_step, check_supported
from bt_ray.report import write_results
from bt_ray.session import Session, current_session, init
from bt_ray.state import RunState
from bt_ray.strategy import STEP_CODES
from bt_ray.tasks import Splits

logger = logging.getLogger(__name__)


class BetterTogether(Teleprompter):
    """Alternate prompt optimization and LoRA fine-tuning of a DSPy program, on bt-ray.

        optimizer = bt_ray.BetterTogether(metric=metric)          # p: bt-ray's Π, w: bt-ray's Θ
        compiled = optimizer.compile(student, trainset=trainset, valset=valset, strategy="p -> w -> p")
        compiled.candidate_programs[0]   # {"program", "score", "strategy"}, best on valset first

    Any DSPy Teleprompter can stand behind a key: `BetterTogether(metric, mipro=MIPROv2(...))` and
    strategy="mipro -> w". The run uses the current bt-ray session (`bt_ray.init(...)`), or starts one
    with the default config. After compile, `optimizer.run_dir` holds the run and `optimizer.results`
    its per-step table.
    """

    STRAT_SEP = " -> "

    def __init__(self, metric: Callable, **optimizers: Teleprompter):
        self.metric = metric
        if not optimizers:
            # differs: the defaults are bt-ray's parallel Π and Θ, not BootstrapFewShotWithRandomSearch and
            # BootstrapFinetune (a BootstrapFinetune passed explicitly still runs as bt-ray's Θ).
            logger.info("No optimizers provided. Using bt-ray's defaults: p = prompt optimization (Π), "
                        "w = LoRA fine-tuning (Θ); e.g. strategy='p -> w -> p'.")
            optimizers = {"p": PromptOptimizer(metric=metric), "w": LoRAFinetune(metric=metric)}
        for key, optimizer in optimizers.items():
            if not isinstance(optimizer, Teleprompter):
                raise TypeError(f"Optimizer '{key}' must be a Teleprompter, got {type(optimizer).__name__}")
        self.optimizers: dict[str, Teleprompter] = optimizers
        self.run_dir = None
        self.results: dict[str, Any] | None = None

    def compile(self, student: Module, *, trainset: list, teacher: Module | list[Module] | None = None,
                valset: list | None = None, num_threads: int | None = None, max_errors: int | None = None,
                provide_traceback: bool | None = None, seed: int | None = None, valset_ratio: float = 0.1,
                shuffle_trainset_between_steps: bool = True, strategy: str = "p -> w -> p",
                optimizer_compile_args: dict[str, dict[str, Any]] | None = None) -> Module:
        """Run `strategy` on `student`; return the best program on the validation set (the last without one).

        trainset: every step gets it, shuffled before each step (seeded) unless
            shuffle_trainset_between_steps=False. bt-ray's Π bootstraps on a subsample of it and selects its
            candidate on another (prompt.train_size / prompt.val_size of the session config).
        valset: scores the starting program and every step; selects the returned program. Without one,
            `valset_ratio` of trainset is held out (a seeded random sample); valset_ratio=0: no scoring, the
            last step's program is returned.
        teacher: one program (or a list) of the student's structure. bt-ray's Π bootstraps its demos with it
            (one teacher), bt-ray's Θ trains on its traces (each teacher's); a teacher keeps its own LMs, and
            its predictors without one run on the current version. Custom optimizers that take a teacher get
            it (one module as itself, several as a list).
        num_threads: most program runs in flight at once for scoring and bt-ray's Π and Θ
            (None: the session's inference.max_inflight). Custom optimizers use their own num_threads.
        max_errors: a scoring of the valset in which this many examples raise stops compile
            (None: no limit; such examples score 0 and are counted per step).
        provide_traceback: log the traceback of every example that raised during scoring.
        seed: the valset hold-out, the shuffles, Π's random search and Θ's training order
            (None: the session config's seed).
        optimizer_compile_args: per key, arguments for that optimizer's compile(), checked against its
            signature; trainset / valset / teacher given here replace BetterTogether's for that key.

        A failing step raises (its finished predecessors are checkpointed); see the README for resuming.
        """
        student, teachers = self._prepare_student_and_teacher(student, teacher)
        self._check_trainset_and_ratio(trainset, valset_ratio)
        parsed = self._prepare_strategy(strategy)
        compile_args = self._prepare_optimizer_compile_args(optimizer_compile_args, teachers)
        for key in dict.fromkeys(parsed):
            check_supported(key, self.optimizers[key])

        session = current_session()
        if session is None:
            logger.info("no bt-ray session: starting one with the default config (call bt_ray.init(...) to choose "
                        "the model and cluster); it stays up until bt_ray.shutdown() or the end of the process")
            session = init()
        start_version = _student_version(student, session)
        seed = session.config.seed if seed is None else seed
        trainset, valset = _split(trainset, valset, valset_ratio, seed)
        config = self._run_config(session, student, parsed, seed, has_valset=bool(valset))
        data = Splits(list(trainset), list(valset or []), [], source="BetterTogether.compile(trainset, valset)")
        inputs = {**data.fingerprint(),
                  "optimizers": {key: _settings(self.optimizers[key]) for key in dict.fromkeys(parsed)}}
        state = RunState.open(config.run_dir, config, session.resume, tuple(parsed), inputs)
        self.run_dir = config.run_dir
        logger.info("BetterTogether %r on %s: %d train, %s validation -> %s", config.strategy,
                    type(student).__name__, len(trainset), len(valset) if valset else "no", config.run_dir)

        teacher_arg = teachers[0] if teachers and len(teachers) == 1 else teachers
        steps = {}
        for key in dict.fromkeys(parsed):
            args = {"teacher": teacher_arg, "valset": valset, **compile_args.get(key, {})}
            if isinstance(self.optimizers[key], PromptOptimizer) and "valset" not in compile_args.get(key, {}):
                args.pop("valset")  # differs: the valset that selects between steps does not also pick Π's candidate
            steps[key] = build_step(key, self.optimizers[key], metric=self.metric, config=config, seed=seed,
                                    args=args)
        _check_prompt_sizes(parsed, self.optimizers, config, trainset, compile_args)
        template = _template(student)
        loop = PhaseLoop(session, state, config.run_name, tuple(parsed), steps, build_program=template.deepcopy,
                         metric=self.metric, trainsets=_step_trainsets(trainset, len(parsed), seed,
                                                                       shuffle_trainset_between_steps),
                         dev=valset, max_inflight=num_threads or session.config.inference.max_inflight,
                         start_version=start_version, max_errors=max_errors,
                         provide_traceback=bool(provide_traceback))
        programs = loop.run()
        source = f"BetterTogether.compile: trainset {len(trainset)}, valset {len(valset) if valset else 0}"
        self.results = write_results(config, state, Splits(trainset, valset or [], [], source=source))
        state.sync()  # results to a URI output_dir
        return self._returned(programs, state, parsed, has_valset=bool(valset))

    # ------------------------------------------------------------ DSPy's checks, same messages

    def _prepare_student_and_teacher(self, student: Module, teacher: Any) -> tuple[Module, list | None]:
        student = prepare_student(student)  # "The student program should not be compiled."
        _check_lms(student, "student")
        if not teacher:
            return student, None
        teachers = teacher if isinstance(teacher, list) else [teacher]
        return student, [prepare_teacher(student, t) for t in teachers]

    @staticmethod
    def _check_trainset_and_ratio(trainset: list, valset_ratio: float) -> None:
        if not trainset:
            raise ValueError("trainset cannot be empty")
        if valset_ratio < 0 or valset_ratio >= 1:
            raise ValueError(f"valset_ratio must be in range [0, 1), got {valset_ratio}")

    def _prepare_strategy(self, strategy: str) -> list[str]:
        if not strategy or not strategy.strip():
            raise ValueError("strategy cannot be empty")
        # differs: 'p->w' and the paper's 'Π→Θ→Π' are accepted too ('->' with or without spaces, or '→').
        parsed = [part.strip() for part in re.split(r"->|→", strategy)]
        parsed = [p if p in self.optimizers else STEP_CODES.get(p.lower(), p) for p in parsed]
        invalid_steps = [s for s in parsed if s not in self.optimizers]
        if invalid_steps:
            raise ValueError(f"Strategy contains invalid optimizer keys: {invalid_steps}. "
                             f"Valid keys are: {list(self.optimizers.keys())}")
        return parsed

    def _prepare_optimizer_compile_args(self, optimizer_compile_args: dict | None,
                                        teacher: list | None) -> dict[str, dict[str, Any]]:
        if not optimizer_compile_args:
            return {}
        for optimizer_key, compile_args in optimizer_compile_args.items():
            if optimizer_key not in self.optimizers:
                raise ValueError(f"Invalid optimizer key '{optimizer_key}'. "
                                 f"Valid keys are: {list(self.optimizers.keys())}")
            optimizer = self.optimizers[optimizer_key]
            self._validate_compile_args(optimizer, optimizer_key, compile_args)
            if optimizer.__class__.__name__ == "GEPA" and teacher is not None:
                raise ValueError("GEPA does not accept a teacher argument. Please remove the teacher argument.")
        return optimizer_compile_args

    def _validate_compile_args(self, optimizer: Teleprompter, optimizer_key: str, compile_args: dict) -> None:
        if "student" in compile_args:
            raise ValueError(f"'student' is not allowed in optimizer_compile_args for optimizer '{optimizer_key}'. "
                             "The same student is used throughout compilation.")
        valid_params = inspect.signature(optimizer.compile).parameters
        invalid_args = set(compile_args.keys()) - set(valid_params.keys())
        if invalid_args:
            raise ValueError(f"Invalid compile arguments for optimizer '{optimizer_key}': {sorted(invalid_args)}. "
                             f"{optimizer.__class__.__name__}.compile() accepts: {list(valid_params.keys())}")

    # ------------------------------------------------------------ run and result

    def _run_config(self, session: Session, student: Module, parsed: list[str], seed: int,
                    has_valset: bool) -> RunConfig:
        """The session's config for this run: strategy, seed, run name; recorded in <run>/config.yaml."""
        base = session.config
        name = base.name or _fresh_name(base, parsed, seed)
        return dataclasses.replace(base, strategy=self.STRAT_SEP.join(parsed), seed=seed, name=name,
                                   returned="best_dev" if has_valset else "final",
                                   task=dataclasses.replace(base.task, name=type(student).__name__))

    def _returned(self, programs: dict, state: RunState, parsed: list[str], has_valset: bool) -> Module:
        """DSPy's contract: candidates best first (earlier step wins ties), the best returned (the last without
        a valset), carrying candidate_programs and flag_compilation_error_occurred."""
        candidates = []
        for index in range(len(parsed) + 1):
            record = state.finished(index)
            candidates.append({"score": record.dev["score"], "program": programs[index][0],
                               "strategy": self.STRAT_SEP.join(parsed[:index])})
        order = sorted(range(len(candidates)), key=lambda i: (_sortable(candidates[i]["score"]), -i), reverse=True)
        ranked = [candidates[i] for i in order]
        best = ranked[0] if has_valset else candidates[-1]
        program = best["program"]
        program.candidate_programs = ranked
        # differs: a failing step raises instead of being logged, so a returned program never had one.
        program.flag_compilation_error_occurred = False
        program._compiled = True
        return program


def _check_lms(student: Module, role: str) -> None:
    """differs: predictors without an LM are bound to the session's model (DSPy requires one); an LM that
    is not the pool's is refused, since bt-ray can only optimize for and fine-tune the model it serves."""
    foreign = [f"{name} ({getattr(p.lm, 'model', p.lm)!r})" for name, p in student.named_predictors()
               if p.lm is not None and not isinstance(getattr(p.lm, "engine", None), PoolEngine)]
    if foreign:
        raise ConfigError(f"{role} predictors {', '.join(foreign)} run on a model bt-ray does not serve; bt-ray "
                          f"optimizes and fine-tunes its session's model (model.name): bind them with "
                          f"{role}.set_lm(bt_ray.init(...).lm()) or leave them unset")


def _student_version(student: Module, session: Any) -> str | None:
    """The model version the student is bound to: base unless its predictors run on a loaded adapter."""
    versions = set()
    for name, predictor in student.named_predictors():
        engine = getattr(predictor.lm, "engine", None)
        if engine is None:
            continue
        if engine.pool is not session.pool:
            raise ConfigError(f"student predictor {name!r} is bound to another bt-ray session's pool; bind it "
                              f"with student.set_lm(session.lm()) from the current session")
        versions.add(engine.version)
    if len(versions) > 1:
        raise ConfigError(f"student predictors run on different model versions {sorted(map(str, versions))}; "
                          f"bind them all to one with student.set_lm(session.lm(version))")
    return versions.pop() if versions else None


def _split(trainset: list, valset: list | None, valset_ratio: float, seed: int) -> tuple[list, list | None]:
    trainset = list(trainset)
    if valset:
        return trainset, list(valset)
    if valset_ratio == 0:
        return trainset, None
    # differs: DSPy holds out the first examples; bt-ray a seeded random sample (sorted data stays fair).
    held = set(random.Random(seed).sample(range(len(trainset)), int(valset_ratio * len(trainset))))
    val = [x for i, x in enumerate(trainset) if i in held]
    return [x for i, x in enumerate(trainset) if i not in held], (val or None)


def _step_trainsets(trainset: list, steps: int, seed: int, shuffle: bool) -> list[list]:
    """Each step's trainset, made up front so a resumed run gives the remaining steps the same ones."""
    rng, current, out = random.Random(seed), list(trainset), []
    for _ in range(steps):
        if shuffle:
            rng.shuffle(current)
        out.append(list(current))
    return out


def _check_prompt_sizes(parsed: list[str], optimizers: dict, config: RunConfig, trainset: list,
                        compile_args: dict) -> None:
    for key in dict.fromkeys(parsed):
        optimizer = optimizers[key]
        if not isinstance(optimizer, PromptOptimizer):
            continue
        prompt = dataclasses.replace(config.prompt, **optimizer.overrides)
        args = compile_args.get(key, {})
        given = len(args.get("trainset", trainset))
        need = prompt.train_size + (0 if args.get("valset") else prompt.val_size)
        if given < need:
            raise ConfigError(f"optimizer {key!r} (bt-ray's Π) bootstraps on prompt.train_size={prompt.train_size} "
                              f"and selects on prompt.val_size={prompt.val_size} examples of the trainset, which has "
                              f"{given}; lower them (bt_ray.init(overrides=['prompt.train_size=..', "
                              f"'prompt.val_size=..']) or PromptOptimizer(train_size=.., val_size=..))")


def _template(student: Module) -> Module:
    """The student without LMs: each step's program is loaded into a copy of it on resume."""
    template = student.deepcopy()
    for predictor in template.predictors():
        predictor.lm = None
    return template


def _fresh_name(config: RunConfig, parsed: list[str], seed: int) -> str:
    stem = f"bettertogether-{'-'.join(parsed)}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = stem, 1
    while (Path(config.output_dir).expanduser() / name).exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def _settings(optimizer: Teleprompter) -> str:
    """What a resume must find unchanged behind a key: the optimizer and its keyword settings. For PromptOptimizer
    and LoRAFinetune, the overrides given; for another teleprompter, its constructor's arguments that it keeps
    as plain values under the same name (DSPy's `self.max_bootstrapped_demos = max_bootstrapped_demos`), not
    its metric, LMs or what compile() leaves on it."""
    overrides = getattr(optimizer, "overrides", None)
    if overrides is None:
        try:
            names = inspect.signature(type(optimizer).__init__).parameters
        except (TypeError, ValueError):
            names = {}
        overrides = {name: getattr(optimizer, name) for name in names
                     if name != "self" and _plain(getattr(optimizer, name, optimizer))}
    return type(optimizer).__name__ + f"({', '.join(f'{k}={v!r}' for k, v in sorted(overrides.items()))})"


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _sortable(score: float | None) -> float:
    return float("-inf") if score is None else score
