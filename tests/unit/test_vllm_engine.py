"""The vLLM engine without vLLM: argument mapping, adapter ids and rank checks, and the calls the
compat module makes, against a FAKE `vllm` package (a recorder, labelled as such) on CPU."""

import asyncio
import json
import os
import sys
import types

import pytest

from bt_ray.config import InferenceConfig, VLLMConfig, load_config
from bt_ray.errors import AdapterError, ConfigError, EngineError
from bt_ray.inference.engine import COMPLETION_MARKER, GenerationRequest, SamplingParams, engine_class
from bt_ray.inference.vllm_args import AdapterIds, adapter_rank, check_adapter_fits, engine_kwargs, sampling_kwargs

GPU = ["placement.mode=split", "train.use_gpu=true", "inference.engine=vllm", "inference.gpus_per_replica=1"]


# ---------------------------------------------------------------- pure mapping


def test_engine_kwargs_carry_lora_limits_and_parallelism_from_config():
    inf = InferenceConfig(max_batch_size=128, vllm=VLLMConfig(max_lora_rank=64, max_loras=3, max_model_len=4096))
    kwargs = engine_kwargs(inf, "/models/m", "auto")
    assert kwargs["model"] == kwargs["tokenizer"] == "/models/m"
    assert kwargs["enable_lora"] and (kwargs["max_lora_rank"], kwargs["max_loras"]) == (64, 3)
    assert kwargs["max_cpu_loras"] >= kwargs["max_loras"]
    assert (kwargs["dtype"], kwargs["max_num_seqs"], kwargs["max_model_len"]) == ("bfloat16", 128, 4096)
    assert kwargs["enable_prefix_caching"] and kwargs["enable_sleep_mode"]
    assert "distributed_executor_backend" not in kwargs
    tp = engine_kwargs(InferenceConfig(vllm=VLLMConfig(tensor_parallel_size=2, sleep_level=0)), "/m", "float16")
    assert (tp["tensor_parallel_size"], tp["distributed_executor_backend"], tp["dtype"]) == (2, "mp", "float16")
    assert not tp["enable_sleep_mode"] and "max_model_len" not in tp
    assert "max_cudagraph_capture_size" not in kwargs  # vLLM's default: 2 x max_num_seqs, at most 512
    graphs = engine_kwargs(InferenceConfig(vllm=VLLMConfig(max_cudagraph_capture_size=512)), "/m")
    assert graphs["max_cudagraph_capture_size"] == 512 and "cudagraph_metrics" not in graphs
    counted = engine_kwargs(InferenceConfig(vllm=VLLMConfig(step_stats=True)), "/m")
    assert counted["cudagraph_metrics"]  # each step says how it ran, for engine_steps


def test_sampling_maps_dspy_settings_and_stops_at_the_completion_marker():
    kwargs = sampling_kwargs(SamplingParams(temperature=0.1, top_p=0.9, max_tokens=77, seed=-5))
    assert kwargs["n"] == 1 and kwargs["temperature"] == 0.1 and kwargs["top_p"] == 0.9
    assert kwargs["max_tokens"] == 77 and kwargs["stop"] == [COMPLETION_MARKER]
    assert not kwargs["include_stop_str_in_output"]
    assert 0 <= kwargs["seed"] < 2**63
    assert "seed" not in sampling_kwargs(SamplingParams(seed=None))


def test_dspy_settings_reach_vllm_and_n_candidates_are_n_samples():
    """DSPy 3.4 sends n candidates as n requests to a custom engine (its Config has no n): each must
    reach vLLM with DSPy's temperature and max tokens, the completion marker as a stop, and its own
    seed, so the n candidates are n samples, not one answer n times. FakePool: no model."""
    import dspy

    from bt_ray.inference.lm import pool_lm

    from .fakes import FakePool, unique_tag

    pool = FakePool(responder=lambda r: f"[[ ## answer ## ]]\nseed {r.sampling.seed}\n\n[[ ## completed ## ]]")
    pool.load_adapter("run-v2", "/fake/adapter")
    lm = pool_lm(pool, unique_tag(), "run-v2", temperature=0.7, max_tokens=50)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        answers = dspy.Predict("question -> answer", n=3)(question="2+2?").completions.answer
    assert len(pool.requests) == 3 and len(set(answers)) == 3
    mapped = [sampling_kwargs(r.sampling) for r in pool.requests]
    assert all(r.adapter == "run-v2" for r in pool.requests)
    for kwargs in mapped:
        assert (kwargs["n"], kwargs["temperature"], kwargs["max_tokens"]) == (1, 0.7, 50)
        assert COMPLETION_MARKER in kwargs["stop"]
    assert len({kwargs["seed"] for kwargs in mapped}) == 3
    # With the call's own seed: n different samples still, from seeds that repeat run to run.
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        dspy.Predict("question -> answer", n=3)(question="3+3?", config={"seed": 5})
    assert sorted(r.sampling.seed for r in pool.requests[3:]) == [5, 6, 7]


def test_per_call_sampling_values_outside_range_fail_that_call():
    import dspy

    from bt_ray.errors import BtRayError, RequestError
    from bt_ray.inference.lm import pool_lm

    from .fakes import FakePool, unique_tag

    pool = FakePool()
    lm = pool_lm(pool, unique_tag(), None, temperature=0.7, max_tokens=50)
    for bad in ({"top_p": 0.0},):  # (DSPy itself refuses temperature outside [0, 2] and top_p > 1)
        with pytest.raises(Exception, match="temperature must be in") as err:  # DSPy wraps it: LMUnexpectedError
            with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
                dspy.Predict("question -> answer")(question="2+2?", config=bad)
        chain, seen = [], err.value
        while seen is not None:  # as the fan-out walks it (phases/fanout.py)
            chain, seen = [*chain, seen], seen.__cause__ or seen.__context__
        assert any(isinstance(e, RequestError) for e in chain) and not any(isinstance(e, BtRayError) for e in chain)
        assert not pool.requests  # refused before any engine saw it


def test_adapter_ids_are_never_reused():
    ids = AdapterIds()
    assert (ids.assign("run-v1"), ids.assign("run-v2")) == (1, 2)
    assert ids.drop("run-v1") == 1
    with pytest.raises(AdapterError, match="already used"):
        ids.assign("run-v1")
    assert ids.assign("run-v3") == 3
    with pytest.raises(AdapterError, match="not loaded"):
        ids.drop("run-v1")


def write_adapter(path, r=32, rank_pattern=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "rank_pattern": rank_pattern or {}}))
    return path


def test_adapter_rank_checked_against_max_lora_rank(tmp_path):
    assert adapter_rank(write_adapter(tmp_path / "a", 16, {"q_proj": 48})) == 48
    assert check_adapter_fits(write_adapter(tmp_path / "b", 32), 32) == 32
    with pytest.raises(AdapterError, match="rank 64.*inference.vllm.max_lora_rank=32; raise"):
        check_adapter_fits(write_adapter(tmp_path / "c", 64), 32)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        check_adapter_fits(tmp_path / "missing", 32)


@pytest.mark.parametrize("overrides, message", [
    (["inference.vllm.max_lora_rank=24"], "inference.vllm.max_lora_rank: vLLM serves only ranks.*set it to 32"),
    (["train.lora_rank=64"], "inference.vllm.max_lora_rank: 32 is below train.lora_rank=64.*raise it to 64"),
    (["inference.gpus_per_replica=2"], "inference.gpus_per_replica: the vllm engine.*set inference.gpus_per_replica=1"),
    (["inference.vllm.gpu_memory_utilization=1.5"], "inference.vllm.gpu_memory_utilization: must be in"),
    (["inference.vllm.max_cudagraph_capture_size=0"], "inference.vllm.max_cudagraph_capture_size: must be >= 1"),
    (["inference.vllm.max_cudagraph_capture_size=512", "inference.vllm.enforce_eager=true"],
     "enforce_eager=true captures no CUDA graphs; set one of them"),
])
def test_vllm_config_problems_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, GPU + overrides)


def test_engine_registry_names_vllm_without_importing_it():
    cls = engine_class("vllm")  # imports the compat module, which must not import vLLM itself
    assert cls.__name__ == "VLLMEngine" and cls.__module__ == "bt_ray.inference.vllm_compat"
    assert "vllm" not in sys.modules


# ---------------------------------------------------------------- the compat module against a fake vllm


class FakeAsyncLLM:
    """FAKE vllm AsyncLLM: records calls, answers every prompt with a fixed completion in one FAKE engine step
    (given to its stat loggers as vLLM's frontend would: one request running, 3 tokens, the prompt's)."""

    def __init__(self, args, stat_loggers=None):
        self.args, self.calls, self.loras = args, [], {}
        self.stat_loggers = [factory(None, 0) for factory in stat_loggers or []]

    @classmethod
    def from_engine_args(cls, args, stat_loggers=None):
        return cls(args, stat_loggers)

    async def generate(self, prompt, params, request_id, *, lora_request=None):
        self.calls.append(("generate", prompt, params, request_id, lora_request))
        text = f"answer from {lora_request.lora_name if lora_request else 'base'}"
        completion = types.SimpleNamespace(text=text, token_ids=[1, 2, 3], finish_reason="stop")
        for logger in self.stat_loggers:
            logger.record(types.SimpleNamespace(num_running_reqs=1, num_waiting_reqs=0),
                          types.SimpleNamespace(num_generation_tokens=3,
                                                num_prompt_tokens=len(prompt["prompt_token_ids"])))
        yield types.SimpleNamespace(outputs=[completion], num_cached_tokens=4, finished=True)

    async def add_lora(self, request):
        self.calls.append(("add_lora", request))
        self.loras[request.lora_int_id] = request
        return True

    async def remove_lora(self, lora_id):
        self.calls.append(("remove_lora", lora_id))
        return self.loras.pop(lora_id, None) is not None

    async def sleep(self, level=1, mode="abort"):
        self.calls.append(("sleep", level))

    async def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method))

    async def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset_prefix_cache",))
        return True

    def shutdown(self):
        self.calls.append(("shutdown",))


class Recorded:
    """FAKE stand-in for vllm's argument classes: keeps the keyword arguments it was built with."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    modules = {name: types.ModuleType(name) for name in
               ["vllm", "vllm.lora", "vllm.lora.request", "vllm.sampling_params", "vllm.v1", "vllm.v1.engine",
                "vllm.v1.engine.async_llm"]}
    modules["vllm"].__version__ = "0.26.0-fake"
    modules["vllm"].AsyncEngineArgs = type("AsyncEngineArgs", (Recorded,), {})
    modules["vllm"].SamplingParams = type("SamplingParams", (Recorded,), {})
    modules["vllm.lora.request"].LoRARequest = type("LoRARequest", (Recorded,), {})
    modules["vllm.sampling_params"].RequestOutputKind = types.SimpleNamespace(FINAL_ONLY="final-only")
    modules["vllm.v1.engine.async_llm"].AsyncLLM = FakeAsyncLLM
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


def make_engine(model_dir, **vllm):
    from bt_ray.inference.vllm_compat import VLLMEngine

    return VLLMEngine(model_dir, InferenceConfig(engine="vllm", vllm=VLLMConfig(**vllm)))


def test_engine_builds_async_llm_from_the_mapped_args(fake_vllm, model_dir):
    engine = make_engine(model_dir, max_lora_rank=64)
    assert engine.llm.args.max_lora_rank == 64 and engine.llm.args.model == model_dir
    assert engine.llm.args.enable_lora


def test_generate_sends_chat_token_ids_and_returns_the_text(fake_vllm, model_dir, tokenizer):
    from bt_ray.inference.chat import prompt_ids

    engine = make_engine(model_dir)
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"})
    result = asyncio.run(engine.generate(GenerationRequest(messages, SamplingParams(max_tokens=9), None, "r1")))
    _, prompt, params, _, lora = engine.llm.calls[-1]
    assert prompt == {"prompt_token_ids": prompt_ids(tokenizer, messages)}
    assert params.max_tokens == 9 and params.stop == [COMPLETION_MARKER] and params.output_kind == "final-only"
    assert lora is None
    assert (result.text, result.completion_tokens, result.cached_prompt_tokens) == ("answer from base", 3, 4)
    assert result.prompt_tokens == len(prompt["prompt_token_ids"]) and result.request_id == "r1"
    health = asyncio.run(engine.health())
    assert health["served"] == 1 and health["render_s"] > 0  # the wait for the prompt's ids is counted
    assert engine.llm.stat_loggers == [] and "engine_steps" not in health  # vLLM's stat logging stays off


def test_step_stats_count_the_engines_steps_in_health(fake_vllm, model_dir):
    engine = make_engine(model_dir, step_stats=True)
    [logger] = engine.llm.stat_loggers  # vLLM built its logger from the factory bt-ray passed
    messages = ({"role": "user", "content": "2+2?"},)
    for i in range(3):
        asyncio.run(engine.generate(GenerationRequest(messages, SamplingParams(max_tokens=9), None, f"r{i}")))
    steps = asyncio.run(engine.health())["engine_steps"]
    assert logger is engine.steps and steps["steps"] == 3 and steps["generated_tokens"] == 9
    assert steps["prefill_steps"] == 3 and steps["running"] == 3


def test_each_adapter_version_gets_a_new_name_and_id(fake_vllm, model_dir, tmp_path):
    engine = make_engine(model_dir)
    v1, v2 = write_adapter(tmp_path / "v1"), write_adapter(tmp_path / "v2")
    asyncio.run(engine.load_adapter("run-v1", str(v1)))
    asyncio.run(engine.load_adapter("run-v2", str(v2)))
    added = [c[1] for c in engine.llm.calls if c[0] == "add_lora"]
    assert [(r.lora_name, r.lora_int_id, r.lora_path) for r in added] == [("run-v1", 1, str(v1)),
                                                                         ("run-v2", 2, str(v2))]
    messages = ({"role": "user", "content": "hi"},)
    result = asyncio.run(engine.generate(GenerationRequest(messages, adapter="run-v2")))
    assert engine.llm.calls[-1][4].lora_int_id == 2 and result.text == "answer from run-v2"
    asyncio.run(engine.unload_adapter("run-v1"))
    assert engine.llm.calls[-1] == ("remove_lora", 1)
    with pytest.raises(AdapterError, match="already used"):
        asyncio.run(engine.load_adapter("run-v1", str(v1)))
    with pytest.raises(AdapterError, match="not loaded"):
        asyncio.run(engine.generate(GenerationRequest(messages, adapter="run-v1")))


def test_an_adapter_above_max_lora_rank_never_reaches_vllm(fake_vllm, model_dir, tmp_path):
    engine = make_engine(model_dir, max_lora_rank=16)
    with pytest.raises(AdapterError, match="inference.vllm.max_lora_rank=16"):
        asyncio.run(engine.load_adapter("run-v1", str(write_adapter(tmp_path / "big", 32))))
    assert not [c for c in engine.llm.calls if c[0] == "add_lora"]


def test_sleep_and_wake_use_vllm_sleep_mode(fake_vllm, model_dir):
    engine = make_engine(model_dir, sleep_level=1)
    asyncio.run(engine.sleep())
    with pytest.raises(EngineError, match="asleep"):
        asyncio.run(engine.generate(GenerationRequest(({"role": "user", "content": "x"},))))
    asyncio.run(engine.wake())
    assert engine.llm.calls == [("sleep", 1), ("wake_up", None), ("reset_prefix_cache",)]


def test_sleep_level_2_is_refused_with_lora(fake_vllm, model_dir):
    with pytest.raises(EngineError, match="sleep_level=2.*set inference.vllm.sleep_level=1"):
        make_engine(model_dir, sleep_level=2)


def test_an_aborted_request_is_an_error_not_an_answer(fake_vllm, model_dir):
    engine = make_engine(model_dir)

    async def aborted(prompt, params, request_id, *, lora_request=None):
        completion = types.SimpleNamespace(text="partial", token_ids=[1], finish_reason="abort")
        yield types.SimpleNamespace(outputs=[completion], num_cached_tokens=0, finished=True)

    engine.llm.generate = aborted
    with pytest.raises(EngineError, match="finish_reason='abort'"):
        asyncio.run(engine.generate(GenerationRequest(({"role": "user", "content": "x"},))))


def test_a_prompt_vllm_refuses_is_a_request_error_of_that_request_only(fake_vllm, model_dir):
    from bt_ray.errors import BtRayError, RequestError

    engine = make_engine(model_dir)

    async def too_long(prompt, params, request_id, *, lora_request=None):  # as vLLM 0.26's input processor
        raise ValueError("The decoder prompt (length 9161) is longer than the maximum model length of 2048.")
        yield

    engine.llm.generate = too_long
    with pytest.raises(RequestError, match="vLLM refused request long-0 .*maximum model length of 2048") as err:
        asyncio.run(engine.generate(GenerationRequest(({"role": "user", "content": "x"},), request_id="long")))
    assert not isinstance(err.value, BtRayError)


def test_sleep_without_sleep_mode_names_the_setting(fake_vllm, model_dir):
    with pytest.raises(EngineError, match="inference.vllm.sleep_level=1"):
        asyncio.run(make_engine(model_dir, sleep_level=0).sleep())


def test_missing_vllm_is_a_clear_engine_error(monkeypatch, model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(EngineError, match="needs vLLM.*gpu"):
        make_engine(model_dir)


@pytest.mark.parametrize("flashinfer, expected", [(False, "0"), (True, None)])
def test_flashinfer_sampler_is_turned_off_only_where_flashinfer_is_missing(monkeypatch, flashinfer, expected):
    import importlib.util

    from bt_ray.inference import vllm_compat

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flashinfer" and flashinfer else
                        None if name == "flashinfer" else find_spec(name, *a))
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    vllm_compat.engine_env()
    assert os.environ.get("VLLM_USE_FLASHINFER_SAMPLER") == expected
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
