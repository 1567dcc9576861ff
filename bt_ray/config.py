"""Typed run configuration: nested dataclasses <-> YAML, with dotted overrides.

Defaults live here (the paper's values); YAML files in configs/ override only what
differs. Loading is strict: unknown keys, wrong types and bad values are reported
together, each with its dotted path and a fix, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bt_ray.errors import ConfigError


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line meaning (rendered by `bt-ray config`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = opt("smollm2-135m", "'smollm2-135m' (shipped with bt-ray), a local transformers checkpoint dir, "
                    "or a public id org/name (downloaded into cache_dir unless HF_HUB_OFFLINE=1)")
    cache_dir: str = opt("~/.cache/bt-ray/models", "where the shipped model is converted to a transformers checkpoint "
                         "and public ids are downloaded")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "inference dtype; auto = float32 on CPU (faster than bf16 there, measured), bfloat16 on GPU")


@dataclass
class TaskConfig:
    name: str = opt("iris", "built-in task: iris, gsm8k, hotpotqa; or a label for your own (task.program)")
    program: str | None = opt(None, "your own program by import path, pkg.module:build_program "
                              "(with task.data and task.metric)")
    data: str | None = opt(None, "your splits: pkg.module:load_splits, called as load_splits(task_config, seed)")
    metric: str | None = opt(None, "your metric: pkg.module:metric, called as metric(example, prediction, trace)")
    source: Literal["auto", "real", "offline"] = opt(
        "auto", "auto: the real data if downloaded to task.data_dir, else the shipped offline stand-in (the run "
        "says which); real: fail if not downloaded; offline: always the stand-in")
    data_dir: str = opt("~/.cache/bt-ray/data", "where `bt-ray data download` puts GSM8K, HotPotQA and the "
                        "wiki abstracts")
    train_size: int | None = opt(None, "examples in the train split (None = the task's paper size)")
    dev_size: int | None = opt(None, "examples in the dev split, used to score every step")
    test_size: int | None = opt(None, "examples in the test split, used once on the returned program")
    retriever: Literal["bm25", "colbertv2"] = opt(
        "bm25", "HotPotQA search: bm25 (local index over task.corpus) or colbertv2 (task.retriever_url)")
    corpus: str | None = opt(None, "passages file for bm25 (None: the downloaded wiki abstracts for real "
                             "data, the shipped Wikipedia lead paragraphs offline)")
    retriever_url: str | None = opt(None, "ColBERTv2 endpoint in the wiki17 abstracts server format")


# vLLM accepts only these LoRA ranks (vllm.config.lora.MaxLoRARanks in 0.26).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class VLLMConfig:
    max_lora_rank: int = opt(32, "largest LoRA rank a replica can serve (one of 1, 8, 16, 32, 64, 128, 256, 320, 512); "
                             ">= train.lora_rank")
    max_loras: int = opt(2, "adapter versions one batch can mix (the current one plus the one before)")
    tensor_parallel_size: int = opt(1, "GPUs per replica; more only for a model that does not fit one GPU")
    gpu_memory_utilization: float = opt(0.85, "share of each GPU's memory a replica may take (weights + KV cache)")
    max_model_len: int | None = opt(None, "longest prompt + answer in tokens (None = the model's own limit)")
    sleep_level: int = opt(1, "placement timeshare: 1 = weights to CPU memory during Θ; 0 = sleep mode off "
                           "(2 is refused: broken with LoRA in vLLM 0.26)")
    load_format: Literal["auto", "safetensors", "dummy"] = opt(
        "auto", "how weights load; dummy = random weights of the right shapes (benchmarks only)")
    enforce_eager: bool = opt(False, "no CUDA graphs: faster start, slower decoding")
    max_cudagraph_capture_size: int | None = opt(
        None, "largest engine step (tokens) run as a CUDA graph (None = vLLM's default: 2 x max_batch_size, at "
        "most 512); a step above it, e.g. decodes plus a new prompt's tokens, runs without graphs")
    step_stats: bool = opt(False, "count the engine's steps (requests running per step, ms per step, steps "
                           "finishing a prefill, CUDA graph mode) in the replicas' health; turns on vLLM's stat "
                           "logging and cudagraph_metrics (a little CPU per step)")


@dataclass
class InferenceConfig:
    engine: Literal["transformers", "vllm", "fake"] = opt(
        "transformers", "replica engine: transformers (CPU) | vllm (GPU) | fake (canned answers, tests only)")
    replicas: int = opt(1, "number of inference replica actors")
    cpus_per_replica: float = opt(1.0, "Ray CPUs reserved per replica")
    gpus_per_replica: float = opt(0.0, "Ray GPUs reserved per replica")
    torch_threads: int = opt(0, "torch threads per replica; 0 = all cores of its node")
    max_batch_size: int = opt(16, "most requests decoded together in one forward pass (vLLM's max_num_seqs; "
                              "GPU configs set 256)")
    batch_wait_ms: float = opt(5.0, "how long an idle replica waits for more requests before starting a batch")
    continuous_batching: bool = opt(
        True, "waiting requests join the running batch between decode steps; false = each batch runs to its "
        "last row first (static, for comparison)")
    prefix_cache_tokens: int = opt(16384, "KV-cache budget (tokens) for shared prompt prefixes per replica")
    temperature: float = opt(0.1, "sampling temperature for bootstrapping and evaluation (paper: 0.1)")
    top_p: float = opt(1.0, "nucleus sampling cutoff")
    max_tokens: int = opt(256, "most tokens generated per call")
    max_inflight: int = opt(64, "most program runs in flight at once across the pool (fan-out bound)")
    disk_cache: bool = opt(True, "DSPy's response cache also on disk in the run dir, so a resumed phase "
                           "reuses the calls it finished; false = memory only, about half the driver's "
                           "CPU per call (for replicas that answer hundreds of calls/s)")
    request_timeout_s: float = opt(600.0, "a request not answered in this time fails, naming the replica, "
                                              "unless that replica is still making progress (a long queue); a "
                                              "replica that does not answer an adapter load, sleep or wake in "
                                              "this time is replaced")
    request_retries: int = opt(2, "times a request whose replica died is resent to a live replica")
    replica_restarts: int = opt(3, "dead, hung or unwakeable replicas (and ones a failed adapter version could "
                                   "not be unloaded from) the pool replaces in one run before it gives up")
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class PromptConfig:
    train_size: int = opt(100, "train subsample for bootstrapping (paper: 100; Iris: 15)")
    val_size: int = opt(250, "validation subsample that scores candidates (paper: 250; Iris: 35)")
    max_bootstrapped_demos: int = opt(3, "most bootstrapped demos per predictor")
    max_labeled_demos: int = opt(3, "most demos per predictor, bootstrapped + labeled (DSPy's semantics)")
    num_candidates: int = opt(6, "candidate programs: zero-shot, labeled-only, unshuffled, then random (>= 3)")
    metric_threshold: float | None = opt(None, "a trace passes when metric >= this (None: metric is truthy)")


@dataclass
class TrainConfig:
    num_workers: int = opt(1, "Ray Train workers (data parallel)")
    cpus_per_worker: float = opt(1.0, "Ray CPUs per training worker")
    use_gpu: bool = opt(False, "train on GPUs (NCCL) instead of CPUs (gloo)")
    torch_threads: int = opt(0, "torch threads per CPU worker; 0 = this node's cores / workers")
    lora_rank: int = opt(32, "LoRA rank (paper: 32)")
    lora_alpha: int = opt(64, "LoRA alpha (paper: 64)")
    lora_dropout: float = opt(0.0, "LoRA dropout (paper: 0)")
    target_modules: list[str] = opt(["q_proj", "k_proj"], "modules LoRA adapts (paper: q_proj, k_proj)")
    epochs: int = opt(5, "passes over the bootstrapped data (paper: 5)")
    learning_rate: float = opt(1e-5, "AdamW learning rate (paper: 1e-5)")
    batch_size: int = opt(8, "effective batch size = micro_batch_size x grad accumulation x workers (paper: 8)")
    micro_batch_size: int = opt(1, "sequences per worker per forward pass")
    bf16: bool = opt(True, "train in bfloat16 where the device supports it (paper: bf16)")
    max_seq_len: int = opt(2048, "longer training examples are dropped, with a warning")
    metric_threshold: float = opt(1.0, "a trace is kept for training when metric >= this")
    include_demos: bool = opt(False, "keep the predictor's demos in the training prompt")
    max_failures: int = opt(0, "Ray Train retries after a worker failure")
    distributed: Literal["ddp", "zero2", "zero3"] = opt(
        "ddp", "data parallelism on GPUs: ddp, or DeepSpeed ZeRO stage 2 / 3 (shards optimizer state / also weights)")


@dataclass
class PlacementConfig:
    mode: Literal["cpu", "split", "timeshare"] = opt(
        "cpu", "cpu: no GPUs | split: replicas and training on separate GPUs | timeshare: replicas sleep during Θ "
        "and training uses their GPUs")
    timeout_s: float = opt(300.0, "how long to wait for the cluster to place the replicas, and each Θ's "
                           "training workers, before failing")


@dataclass
class RunConfig:
    strategy: str = opt("p -> w -> p", "phases: 'p' prompt optimization, 'w' LoRA; '->' separated, or Π→Θ→Π")
    seed: int = opt(0, "drives the data splits and prompt optimization's random search")
    output_dir: str = opt("runs", "runs are written to output_dir/name: a path (on a cluster, a shared filesystem) "
                          "or an object-store URI (s3://, gs://, abfs://), credentials from the environment")
    name: str | None = opt(None, "run name (None = <task>-<strategy>-s<seed>)")
    ray_address: str | None = opt(None, "Ray cluster to join (None: RAY_ADDRESS, else start a local one)")
    returned: Literal["final", "best_dev"] = opt(
        "final", "program scored on test: the last step's (the paper) or the best on dev (DSPy's BetterTogether)")
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        from bt_ray.strategy import strategy_slug

        return f"{self.task.name}-{strategy_slug(self.strategy)}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        """output_dir/name, or for a URI output_dir the run's local working copy (bt_ray.storage)."""
        from bt_ray.storage import local_run_dir

        return local_run_dir(self.output_dir, self.run_name)


# ---------------------------------------------------------------- loading


def read_mapping(path: Path, what: str, hint: str, shape: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist; {hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be {shape}, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML (optional), apply `a.b=c` overrides, validate. Raises ConfigError listing every problem."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_mapping(Path(path), "config file", "shipped configs are in configs/", "a mapping of keys")
        if {"tasks", "strategies"} <= set(raw) and "task" not in raw:
            raise ConfigError(f"{path} is a sweep file (tasks x models x strategies x seeds), not a run config: "
                              f"run it with `bt-ray sweep {path}` (`--dry-run` lists its cells)")
    problems: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: write it as dotted.key=value, e.g. train.epochs=2")
            continue
        _set_dotted(raw, key.strip(), _parse_value(value))
    config = _build(RunConfig, raw, "", problems)
    bad = {p.split(":")[0] for p in problems}  # a key with a type error is not also range-checked
    problems.extend(p for p in validate(config) if p.split(":")[0] not in bad)
    if problems:
        raise ConfigError(problems)
    return config


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """A RunConfig from a saved resolved config (results.json, config.yaml), defaults for missing keys;
    keys a newer bt-ray no longer knows are ignored (old runs stay readable)."""
    return _build(RunConfig, raw, "", [])


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            node = {}
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{prefix or '<root>'}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = _closest(key, list(fields))
            hint = f"; did you mean {close!r}?" if close else ""
            problems.append(f"{prefix}{key}: unknown key{hint} (valid: {', '.join(fields)})")
    kwargs = {}
    for name in fields:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", problems)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".", problems)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return []
        return [_coerce(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{path}: expected true or false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{path}: expected an integer, got {value!r}")
        return 0
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        problems.append(f"{path}: expected a number, got {value!r}")
        return 0.0
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{path}: expected a string, got {value!r}")
        return ""
    return value


def _closest(word: str, options: list[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return found[0] if found else None


# ---------------------------------------------------------------- validation


def validate(config: RunConfig) -> list[str]:
    """Value checks that need no model, no data and no cluster."""
    from bt_ray.storage import uri_problems
    from bt_ray.strategy import StrategyError, parse_strategy
    from bt_ray.tasks import TASKS

    problems = []
    try:
        parse_strategy(config.strategy)
    except StrategyError as exc:
        problems.append(f"strategy: {exc}")
    problems.extend(_task_problems(config.task, TASKS))
    problems.extend(uri_problems(config.output_dir))
    for name in ("train_size", "dev_size", "test_size"):
        value = getattr(config.task, name)
        if value is not None and value < 1:
            problems.append(f"task.{name}: must be >= 1 (or null for the task's default), got {value}")
    inf, pr, tr = config.inference, config.prompt, config.train
    _positive(problems, "inference", inf, ["replicas", "max_batch_size", "max_tokens", "max_inflight"])
    _positive(problems, "prompt", pr, ["train_size", "val_size"])
    _positive(problems, "train", tr, ["num_workers", "lora_rank", "lora_alpha", "epochs", "batch_size",
                                      "micro_batch_size", "max_seq_len"])
    if inf.request_retries < 0 or inf.replica_restarts < 0:
        problems.append("inference.request_retries / replica_restarts: must be >= 0 (0 = a dead replica fails "
                        "its requests / is not replaced)")
    if inf.cpus_per_replica < 0 or inf.gpus_per_replica < 0:
        problems.append("inference.cpus_per_replica / gpus_per_replica: must be >= 0")
    _non_negative(problems, "inference", inf, ["torch_threads", "batch_wait_ms", "prefix_cache_tokens"])
    _non_negative(problems, "train", tr, ["torch_threads", "max_failures", "cpus_per_worker"])
    if not tr.use_gpu and not tr.cpus_per_worker > 0:
        problems.append(f"train.cpus_per_worker: CPU training workers need CPUs; set it > 0 (e.g. 1), got "
                        f"{tr.cpus_per_worker}")
    _finite_positive(problems, "inference.request_timeout_s", inf.request_timeout_s)
    if not 0 <= inf.temperature <= 2:
        problems.append(f"inference.temperature: must be in [0, 2], got {inf.temperature}")
    if not 0 < inf.top_p <= 1:
        problems.append(f"inference.top_p: must be in (0, 1], got {inf.top_p}")
    if pr.num_candidates < 3:
        problems.append(f"prompt.num_candidates: must be >= 3 (zero-shot, labeled-only, unshuffled), "
                        f"got {pr.num_candidates}")
    if pr.max_bootstrapped_demos < 1 or pr.max_labeled_demos < 0:
        problems.append("prompt.max_bootstrapped_demos must be >= 1 and prompt.max_labeled_demos >= 0")
    if tr.batch_size % (tr.micro_batch_size * tr.num_workers):
        problems.append(f"train.batch_size: {tr.batch_size} is not a multiple of micro_batch_size x num_workers "
                        f"= {tr.micro_batch_size * tr.num_workers}; set train.batch_size to a multiple of it")
    if not 0 <= tr.lora_dropout < 1:
        problems.append(f"train.lora_dropout: must be in [0, 1), got {tr.lora_dropout}")
    _finite_positive(problems, "train.learning_rate", tr.learning_rate)
    if not tr.target_modules:
        problems.append("train.target_modules: name at least one module, e.g. [q_proj, k_proj]")
    if config.name is not None and ("/" in config.name or config.name.strip() in ("", ".", "..")):
        problems.append(f"name: {config.name!r} must be a plain, non-empty directory name")
    problems.extend(_validate_vllm(config))
    problems.extend(_validate_placement(config))
    return problems


def _validate_vllm(config: RunConfig) -> list[str]:
    inf, v = config.inference, config.inference.vllm
    problems = []
    if v.max_lora_rank not in VLLM_LORA_RANKS:
        larger = [r for r in VLLM_LORA_RANKS if r >= v.max_lora_rank]
        problems.append(f"inference.vllm.max_lora_rank: vLLM serves only ranks {', '.join(map(str, VLLM_LORA_RANKS))}; "
                        f"got {v.max_lora_rank}, set it to {larger[0] if larger else 512}")
    _positive(problems, "inference.vllm", v, ["max_loras", "tensor_parallel_size"])
    if not 0 < v.gpu_memory_utilization <= 1:
        problems.append(f"inference.vllm.gpu_memory_utilization: must be in (0, 1], got {v.gpu_memory_utilization}")
    if v.max_model_len is not None and v.max_model_len < 1:
        problems.append(f"inference.vllm.max_model_len: must be >= 1 or null, got {v.max_model_len}")
    if v.max_cudagraph_capture_size is not None and v.max_cudagraph_capture_size < 1:
        problems.append(f"inference.vllm.max_cudagraph_capture_size: must be >= 1 or null, got "
                        f"{v.max_cudagraph_capture_size}")
    elif v.max_cudagraph_capture_size is not None and v.enforce_eager:
        problems.append("inference.vllm.max_cudagraph_capture_size: inference.vllm.enforce_eager=true captures no "
                        "CUDA graphs; set one of them (max_cudagraph_capture_size=null or enforce_eager=false)")
    if v.sleep_level == 2:
        problems.append("inference.vllm.sleep_level: 2 does not work with LoRA adapters in vLLM 0.26 (vLLM issue "
                        "#39934: its weight reload fails on LoRA-wrapped layers); set 1")
    elif v.sleep_level not in (0, 1):
        problems.append(f"inference.vllm.sleep_level: must be 0 (off) or 1, got {v.sleep_level}")
    if inf.engine != "vllm":
        return problems
    if config.train.lora_rank > v.max_lora_rank:
        problems.append(f"inference.vllm.max_lora_rank: {v.max_lora_rank} is below train.lora_rank="
                        f"{config.train.lora_rank}, so replicas could not load the adapters Θ trains; raise it to "
                        f"{next((r for r in VLLM_LORA_RANKS if r >= config.train.lora_rank), 512)}")
    if inf.gpus_per_replica != v.tensor_parallel_size:
        problems.append(f"inference.gpus_per_replica: the vllm engine runs each replica on "
                        f"inference.vllm.tensor_parallel_size={v.tensor_parallel_size} GPU(s); set "
                        f"inference.gpus_per_replica={v.tensor_parallel_size}")
    return problems


def _validate_placement(config: RunConfig) -> list[str]:
    mode, inf, tr = config.placement.mode, config.inference, config.train
    problems = []
    _finite_positive(problems, "placement.timeout_s", config.placement.timeout_s)
    if tr.distributed != "ddp" and not tr.use_gpu:
        # a GPU option; on CPU it runs only in tests (tests/integration/test_deepspeed_on_cpu.py, TrainConfig directly)
        problems.append(f"train.distributed: {tr.distributed} (DeepSpeed) is for GPU training; set "
                        "train.use_gpu=true, or train.distributed=ddp on CPU")
    if mode == "cpu":
        if inf.gpus_per_replica or tr.use_gpu or inf.engine == "vllm":
            problems.append("placement.mode: 'cpu' uses no GPUs; set placement.mode=split or timeshare for "
                            "inference.gpus_per_replica > 0, train.use_gpu=true or inference.engine=vllm")
        return problems
    if not tr.use_gpu:
        problems.append(f"train.use_gpu: placement.mode={mode} trains on GPUs; set train.use_gpu=true "
                        "(or placement.mode=cpu)")
    if mode == "split" and inf.gpus_per_replica < 1:
        problems.append("inference.gpus_per_replica: placement.mode=split gives each replica its own GPU(s); "
                        "set inference.gpus_per_replica >= 1")
    if mode == "timeshare":
        if inf.gpus_per_replica != 1:
            problems.append(f"inference.gpus_per_replica: placement.mode=timeshare shares each GPU between one "
                            f"replica and one trainer; set inference.gpus_per_replica=1 (got {inf.gpus_per_replica:g}) "
                            f"or use placement.mode=split")
        if inf.engine == "vllm" and inf.vllm.sleep_level == 0:
            problems.append("inference.vllm.sleep_level: placement.mode=timeshare needs vLLM's sleep mode; set 1")
    return problems


def _task_problems(task: TaskConfig, known: dict) -> list[str]:
    from bt_ray.tasks import load_callable

    own = {key: getattr(task, key) for key in ("program", "data", "metric")}
    if not any(own.values()):
        if task.name not in known:
            return [f"task.name: unknown task {task.name!r}; built-in tasks: {', '.join(known)}; for your own "
                    f"program set task.program, task.data and task.metric (pkg.module:function)"]
        problems = []
    else:
        problems = [f"task.{key}: missing; your own task needs task.program, task.data and task.metric"
                    for key, value in own.items() if not value]
        for key, value in own.items():
            if value:
                try:
                    load_callable(value)
                except ValueError as exc:
                    problems.append(f"task.{key}: {exc}")
    if task.retriever == "colbertv2" and not task.retriever_url:
        problems.append("task.retriever_url: task.retriever=colbertv2 needs the endpoint's URL, e.g. "
                        "task.retriever_url=http://host:port/wiki17_abstracts")
    return problems


def _positive(problems: list[str], section: str, obj: Any, names: list[str]) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            problems.append(f"{section}.{name}: must be >= 1, got {getattr(obj, name)}")


def _non_negative(problems: list[str], section: str, obj: Any, names: list[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (value >= 0 and math.isfinite(value)):  # NaN fails every comparison
            problems.append(f"{section}.{name}: must be a number >= 0, got {value}")


def _finite_positive(problems: list[str], key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        problems.append(f"{key}: must be a number > 0, got {value}")


# ---------------------------------------------------------------- saving and docs


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) for every field; the README's config reference is made from this."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows
