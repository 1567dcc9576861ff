"""LoRA fine-tuning on Ray Train: `train_lora` (driver side) and `LoraRecipe` (one per worker).

    examples --tokenize--> TorchTrainer(num_workers) --fit--> checkpoint --copy+verify--> <out>/<name>/adapter

Each worker runs the same recipe (torchtune's lifecycle: setup -> train -> save_checkpoint):
base model + peft LoRA, DDP via `ray.train.torch.prepare_model` (gloo on CPU, NCCL on GPU) or, with
train.distributed=zero2/zero3, a DeepSpeed engine (deepspeed_config.py; GPUs only),
rank-strided shards of a seeded shuffle (`data.plan_epoch`), AdamW, gradient accumulation so
micro_batch_size x accumulation x num_workers == batch_size, and a loss that is the mean token
cross-entropy over the assistant tokens of the whole effective batch. Every epoch ends with a
checkpoint (adapter + optimizer + losses), so a retried run (`train.max_failures`) resumes from
the last finished epoch instead of starting over (under DeepSpeed the optimizer state is not kept:
a resumed epoch restarts AdamW's moments). The saved adapter is checked against its initial
values (`verify_adapter`) before anyone loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bt_ray import storage
from bt_ray.config import TrainConfig
from bt_ray.errors import ResourceError, TrainingError
from bt_ray.state import EXECUTION_ONLY
from bt_ray.train.data import (IGNORE, TokenizedExample, TrainData, pad_id_of, plan_epoch, steps_per_epoch,
                               tokenize)

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STATE_FILE = "train_state.json"  # epoch, per-step losses and the run fingerprint, in every checkpoint
OPTIMIZER_FILE = "optimizer.pt"
PROGRESS_LINES = 10  # rank 0 logs about this many step lines per epoch
POLL_INTERVAL_S = 0.2  # Ray Train controller polls (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; Ray's default 2 s)
_LOGS_HINT = "Worker tracebacks: the driver's output, or /tmp/ray/session_latest/logs/ on the worker's node"

# Test-only fault injection: when set to a file path, rank 0 raises once after the first epoch's
# checkpoint (and creates the file, so the retried attempt goes on). Used by the retry test.
CRASH_ONCE_ENV = "BT_RAY_TEST_CRASH_ONCE_MARKER"

# Training dtype on CPU when train.bf16 is on. Measured here (2-core Xeon with AVX512-BF16 + AMX,
# SmolLM2-135M, LoRA r32 q/k, micro-batch 1, best-of-4 fwd+bwd+AdamW step, 2 threads;
# `python bench/train_throughput.py --dtype-probe`):
#   seq   64: fp32 0.29 s, bf16 0.21 s      seq  256: fp32 0.79 s, bf16 0.50 s
#   seq  512: fp32 1.59 s, bf16 0.91 s      seq 1024: fp32 3.45 s, bf16 1.93 s
# so bf16 trains 1.4-1.8x faster on a CPU with native bf16 (unlike decoding, where fp32 won; see
# DESIGN.md section 4). A CPU without native bf16 (AVX512-BF16) would emulate it (not measured
# here), so such CPUs train in fp32.
# peft keeps the adapter weights themselves in fp32 (autocast_adapter_dtype), so small updates are
# not lost to bf16 rounding; only the frozen base runs in bf16.


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str  # <output_dir>/<name>/adapter: adapter_config.json + adapter_model.safetensors
    examples: int  # examples trained on (after dropping too-long ones)
    dropped: int  # examples longer than train.max_seq_len
    trained_tokens: int  # assistant (label) tokens x epochs
    total_tokens: int  # all non-padding tokens x epochs
    steps: int  # optimizer steps
    losses: list[float]  # mean token cross-entropy of each optimizer step
    wall_s: float  # fit() wall time, workers' start-up and model load included
    workers: int
    train_s: float = 0.0  # time inside rank 0's training loop (all attempts), start-up excluded


def train_lora(examples: list[list[dict]], config: TrainConfig, base_model_dir: str, output_dir: str,
               name: str, seed: int = 0, init_adapter_dir: str | None = None,
               gpus_per_worker: float | None = None, placement_timeout_s: float = 300.0) -> TrainResult:
    """Fit a LoRA adapter on chat examples with Ray Train; Ray must already be initialised.

    `init_adapter_dir` continues training an earlier adapter (Θ after Θ) instead of starting a new one.
    `gpus_per_worker` is each worker's GPU share when train.use_gpu (default 1; placement timeshare
    gives less, see placement.train_gpus_per_worker). Workers the cluster cannot place within
    `placement_timeout_s` (placement.timeout_s) fail with a ResourceError naming what was asked and
    what is free, instead of Ray Train waiting for them forever.

    A run with the same `output_dir`/`name` and the same inputs resumes from its last epoch checkpoint.
    Raises TrainingError when there is nothing to train on, when fit() fails after
    `train.max_failures` retries, or when the saved adapter is empty or unchanged.
    """
    import ray

    if not examples:
        raise TrainingError(f"no traces passed the metric; nothing to fine-tune for {name!r}: lower "
                            f"train.metric_threshold (now {config.metric_threshold:g}) or run 'p' first "
                            f"(e.g. strategy 'p -> w') so more traces pass")
    if not ray.is_initialized():
        raise TrainingError("train_lora needs a running Ray (ray.init(...) or bt_ray.inference.placement.connect)")
    tokenizer = _load_tokenizer(base_model_dir)
    data = _tokenize(tokenizer, examples, config)
    loop_config = _loop_config(data.examples, config, base_model_dir, seed, pad_id_of(tokenizer), init_adapter_dir)
    logger.info("LoRA %s: r%d on %d examples (%d dropped), %d epochs x %d steps, %d worker(s)", name,
                config.lora_rank, len(data.examples), data.dropped, config.epochs,
                steps_per_epoch(len(data.examples), config.batch_size), config.num_workers)
    start = time.perf_counter()
    gpus = (1.0 if gpus_per_worker is None else gpus_per_worker) if config.use_gpu else 0.0
    resources = _worker_resources(config, gpus)
    _check_placeable(config, resources, name, placement_timeout_s)
    result = _fit(loop_config, config, output_dir, name, resources, placement_timeout_s)
    wall_s = time.perf_counter() - start
    if result.checkpoint is None:
        raise TrainingError(f"LoRA run {name!r} finished without a checkpoint. {_LOGS_HINT}")
    adapter_dir = Path(output_dir).expanduser().resolve() / name / "adapter"
    state = _publish(result.checkpoint, adapter_dir)
    verify_adapter(adapter_dir, state.get("initial_digests"))
    losses = [float(x) for x in state["losses"]]
    logger.info("LoRA %s: %d steps in %.1fs, loss %.4f -> %.4f, adapter %s", name, len(losses), wall_s,
                losses[0], losses[-1], adapter_dir)
    return TrainResult(str(adapter_dir), len(data.examples), data.dropped, data.trained_tokens(config.epochs),
                       data.total_tokens(config.epochs), len(losses), losses, wall_s, config.num_workers,
                       float(state.get("train_s", 0.0)))


def _load_tokenizer(base_model_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_model_dir)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the base model's tokenizer from {base_model_dir!r}: {exc}") from exc


def _tokenize(tokenizer: Any, examples: list, config: TrainConfig) -> TrainData:
    try:
        data = tokenize(tokenizer, examples, config.max_seq_len)
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"could not tokenize the training examples: {exc}") from exc
    if not data.examples:
        raise TrainingError(f"all {data.dropped} training examples are longer than train.max_seq_len="
                            f"{config.max_seq_len} tokens; raise train.max_seq_len")
    return data


def _loop_config(examples: list[TokenizedExample], config: TrainConfig, base_model_dir: str,
                 seed: int, pad_id: int, init_adapter_dir: str | None = None) -> dict[str, Any]:
    """Everything a worker needs, as plain data (the examples are small)."""
    loop = {"examples": [(ex.input_ids, ex.labels) for ex in examples], "train": dataclasses.asdict(config),
            "base_model_dir": str(base_model_dir), "seed": seed, "pad_id": pad_id,
            "init_adapter_dir": str(init_adapter_dir) if init_adapter_dir else None}
    # What a resume may change (state.EXECUTION_ONLY: max_failures, cpus_per_worker, ...) keeps the checkpoint.
    same = {**loop, "train": {k: v for k, v in loop["train"].items() if f"train.{k}" not in EXECUTION_ONLY}}
    loop["fingerprint"] = hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]
    loop["crash_once_marker"] = os.environ.get(CRASH_ONCE_ENV)
    return loop


def _worker_resources(config: TrainConfig, gpus: float) -> dict[str, float]:
    return {"CPU": config.cpus_per_worker, **({"GPU": gpus} if config.use_gpu else {})}


def _check_placeable(config: TrainConfig, resources: dict[str, float], name: str, timeout_s: float) -> None:
    """Reserve the workers' resources once and give them back: a ResourceError now, naming what was asked
    and what is free, rather than a TorchTrainer that waits forever for a worker group that never fits."""
    from bt_ray.inference import placement

    bundles = [resources] * config.num_workers
    group = placement.reserve(bundles, f"{name}-train-check", timeout_s, _workers(config, name), fix=TRAIN_FIX)
    placement.release(group)


TRAIN_FIX = "Lower train.num_workers or train.cpus_per_worker, wait for other jobs to free the cluster, or add nodes."


def _workers(config: TrainConfig, name: str) -> str:
    return f"{config.num_workers} LoRA training worker(s) for {name!r}"


def startup_retries(timeout_s: float) -> int:
    """Ray Train's worker-group start attempts that fit in `timeout_s`: each waits
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) and, by default, is retried forever."""
    attempt_s = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return max(1, math.ceil(timeout_s / attempt_s))


def _fit(loop_config: dict, config: TrainConfig, output_dir: str, name: str, resources: dict[str, float],
         timeout_s: float):
    from ray.exceptions import RayError
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError  # ray is pinned (pyproject)

    from bt_ray.inference import placement

    # Ray Train's controller takes a worker's report (one at a time) when it polls, every 2 s by default;
    # each epoch's checkpoint and the end of fit() waited for a poll (measured: 4.8 s of a tiny 5-epoch
    # loop, 1.0 s at 0.1 s). Read when fit() starts; a value the user set is kept.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(POLL_INTERVAL_S))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage.train_storage_path(output_dir), name=name,
                             failure_config=FailureConfig(max_failures=config.max_failures,
                                                          controller_failure_limit=startup_retries(timeout_s)),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             worker_runtime_env={"env_vars": dict(placement.ACTOR_ENV)}))
    try:
        return trainer.fit()
    except (TrainingFailedError, RayError) as exc:
        if isinstance(getattr(exc, "controller_failure", None), WorkerGroupStartupTimeoutError):
            # _check_placeable found room, then another job took it before Ray Train placed the workers
            raise ResourceError(f"Ray Train could not start {_workers(config, name)} within placement.timeout_s="
                                f"{timeout_s:g}s: {placement.shortage([resources] * config.num_workers)} "
                                f"{TRAIN_FIX}") from exc
        raise TrainingError(f"LoRA fine-tuning {name!r} failed ({config.num_workers} worker(s) x {resources}, "
                            f"train.max_failures={config.max_failures}): {_short(exc)}. {_LOGS_HINT}") from exc


def _short(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        return "; ".join(f"worker {rank}: {type(e).__name__}: {_last_line(e)}" for rank, e in sorted(failures.items()))
    return f"{type(exc).__name__}: {str(exc)[:500].rstrip('.')}"


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1][:300].rstrip(".") if lines else ""


def _publish(checkpoint: Any, adapter_dir: Path) -> dict:
    """Copy the adapter files out of Ray's checkpoint dir to a stable path; return the run's train state."""
    with checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        state = json.loads((ckpt / STATE_FILE).read_text())
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        adapter_dir.mkdir(parents=True)
        for name in ADAPTER_FILES:
            if not (ckpt / name).is_file():
                raise TrainingError(f"the final checkpoint {ckpt} has no {name}; the adapter was not saved")
            shutil.copy2(ckpt / name, adapter_dir / name)
    return state


def verify_adapter(adapter_dir: str | Path, initial_digests: dict[str, str] | None = None) -> None:
    """Refuse an adapter whose LoRA tensors are missing, empty, or not changed by training.

    peft initialises every lora_B to zero, so an all-zero B means the adapter changes nothing.
    With `initial_digests` (tensor_digest of each tensor before training, by saved name), a B
    equal to its initial value fails too (Θ after Θ starts from a non-zero B), and so does an
    adapter in which no tensor changed at all. Both happen when training never updated the
    adapter or the weights were lost on save (known with peft + DeepSpeed ZeRO-3, which can
    write empty or untouched adapter tensors).
    """
    import torch
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise TrainingError(f"no adapter weights at {path}")
    tensors = {k: v for k, v in load_file(str(path)).items() if "lora_" in k}
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    b_keys = [k for k in tensors if "lora_B" in k]
    zero_b = [k for k in b_keys if k not in empty and not torch.count_nonzero(tensors[k])]
    unchanged = [k for k, v in tensors.items() if initial_digests and initial_digests.get(k) == tensor_digest(v)]
    unchanged_b = [k for k in unchanged if "lora_B" in k and k not in zero_b]
    missing = sorted(set(initial_digests or ()) - set(tensors))
    if (not b_keys or empty or zero_b or unchanged_b or missing
            or (initial_digests and len(unchanged) == len(tensors))):
        example = (empty + zero_b + unchanged_b + missing + ["-"])[0]
        raise TrainingError(
            f"unusable adapter at {path}: {len(tensors)} LoRA tensors, {len(empty)} empty, "
            f"{len(zero_b)} of {len(b_keys)} lora_B still all zero, {len(unchanged)} equal to their initial "
            f"values{f', {len(missing)} missing' if missing else ''} (e.g. {example}). The adapter would not change "
            f"the model: training did not update it, or it was lost on save (a known peft + DeepSpeed ZeRO-3 "
            f"failure). Check the loss went down and the learning rate.")


def tensor_digest(tensor: Any) -> str:
    """sha256 of a tensor's values rounded to bf16: the dtype it is saved in (fp32 or bf16) does not matter."""
    import torch

    data = tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


# ---------------------------------------------------------------- on each worker


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point on every worker."""
    recipe = LoraRecipe(loop_config)
    recipe.setup()
    recipe.train()


class LoraRecipe:
    """One worker's share of a LoRA run: setup -> train (-> save_checkpoint every epoch)."""

    def __init__(self, loop_config: dict):
        import ray.train

        self.cfg = TrainConfig(**loop_config["train"])
        self.examples = [TokenizedExample(ids, labels) for ids, labels in loop_config["examples"]]
        self.loop_config = loop_config
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.local_world = context.get_local_world_size()
        self.start_epoch, self.losses, self.train_s, self.starts = 0, [], 0.0, []  # starts: epoch of each attempt
        self.optimizer_state = None  # from a checkpoint, when resuming
        self.initial_digests: dict[str, str] | None = None  # tensor_digest of the adapter before training
        self.engine = None  # the DeepSpeed engine under train.distributed=zero2/zero3
        # a zero-weight micro-batch for a worker with no examples left in a short last batch
        self.filler = min(range(len(self.examples)), key=lambda i: len(self.examples[i].input_ids))

    def setup(self) -> None:
        import torch
        import ray.train
        from ray.train.torch import get_device, prepare_model

        threads = self.cfg.torch_threads or max(1, (os.cpu_count() or 1) // self.local_world)
        torch.set_num_threads(threads)
        torch.manual_seed(self.loop_config["seed"])  # same LoRA init on every rank and every run
        self.device = get_device()
        model = self._load_model()
        self.initial_digests = initial_digests(model)  # the adapter training starts from (a resume keeps the first)
        self._restore(model, ray.train.get_checkpoint())
        self.peft_model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.learning_rate)
        if self.cfg.distributed == "ddp":
            self.model = prepare_model(model)
            if self.optimizer_state is not None:
                self.optimizer.load_state_dict(self.optimizer_state)
        else:
            self.model = self.engine = self._deepspeed(model)
        if self.rank == 0:
            logger.info("worker setup: %s %s, %d torch threads, %d trainable params, from epoch %d",
                        self.device, next(model.parameters()).dtype, threads,
                        sum(getattr(p, "ds_numel", p.numel()) for p in params),  # ZeRO-3: local numel is 0
                        self.start_epoch)

    def _deepspeed(self, model: Any) -> Any:
        """ZeRO-2/3 engine around the peft model, with torch's AdamW (built above) as its optimizer."""
        import deepspeed

        from bt_ray.train.deepspeed_config import deepspeed_config

        config = deepspeed_config(self.cfg.distributed, self.cfg.micro_batch_size, self.world,
                                  _use_bf16(self.cfg, self.device))
        engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        return engine

    def _load_model(self):
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if _use_bf16(self.cfg, self.device) else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.loop_config["base_model_dir"], dtype=dtype)
        if self.loop_config.get("init_adapter_dir"):  # Θ after Θ: keep training the current adapter
            init = storage.fetch(self.loop_config["init_adapter_dir"])  # a URI: downloaded on this node
            model = PeftModel.from_pretrained(model, init, is_trainable=True)
        else:
            lora = LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha,
                              lora_dropout=self.cfg.lora_dropout, target_modules=list(self.cfg.target_modules),
                              task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)  # adapter weights stay fp32 (peft's autocast_adapter_dtype)
        model.train()
        return model

    def _restore(self, model: Any, checkpoint: Any) -> None:
        """Resume from the latest epoch checkpoint of this same run (same data and config), if any."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if checkpoint is None:
            return
        with checkpoint.as_directory() as ckpt:
            state = json.loads((Path(ckpt) / STATE_FILE).read_text())
            if state.get("fingerprint") != self.loop_config["fingerprint"]:
                logger.warning("ignoring checkpoint %s: it is from a run with other data or settings", ckpt)
                return
            set_peft_model_state_dict(model, load_file(str(Path(ckpt) / "adapter_model.safetensors")))
            if (Path(ckpt) / OPTIMIZER_FILE).is_file():  # not written under DeepSpeed
                self.optimizer_state = torch.load(Path(ckpt) / OPTIMIZER_FILE, map_location="cpu")
            self.initial_digests = state.get("initial_digests") or self.initial_digests
        self.start_epoch, self.losses, self.train_s = state["epoch"], list(state["losses"]), state["train_s"]
        self.starts = list(state["starts"])
        logger.info("rank %d resumed at epoch %d of %d", self.rank, self.start_epoch, self.cfg.epochs)

    def train(self) -> None:
        cfg = self.cfg
        started = time.perf_counter() - self.train_s
        self.starts.append(self.start_epoch)
        for epoch in range(self.start_epoch, cfg.epochs):
            plan = plan_epoch(len(self.examples), epoch=epoch, seed=self.loop_config["seed"],
                              batch_size=cfg.batch_size, num_workers=self.world,
                              micro_batch_size=cfg.micro_batch_size)
            every = max(1, len(plan) // PROGRESS_LINES)
            for index, step in enumerate(plan):
                loss, tokens = self._step(step)
                self.losses.append(loss)
                self.train_s = time.perf_counter() - started
                if self.rank == 0 and (index % every == 0 or index == len(plan) - 1):
                    logger.info("epoch %d/%d step %d/%d: loss %.4f (%d trained tokens), %.1fs", epoch + 1,
                                cfg.epochs, index + 1, len(plan), loss, tokens, self.train_s)
            # One report per epoch, with its checkpoint: Ray Train's worker queue holds one report until
            # the controller polls it (every 2 s), so a report per step held every step for up to 2 s.
            self.save_checkpoint(epoch + 1, {"epoch": epoch, "step": len(self.losses), "loss": self.losses[-1]})
            if self.rank == 0:
                logger.info("epoch %d/%d: mean loss %.4f", epoch + 1, cfg.epochs,
                            sum(self.losses[-len(plan):]) / len(plan))
            self._maybe_crash_once()

    def _step(self, step: list[list[list[int]]]) -> tuple[float, int]:
        """One optimizer step; returns (mean token loss over the global batch, its label tokens)."""
        import torch

        # Every worker knows the whole plan, so the global token count needs no communication.
        tokens = sum(self.examples[i].trained_tokens for shard in step for micro in shard for i in micro)
        scale = self.world / max(tokens, 1)  # DDP averages over workers; this turns it into a token mean
        mine, loss_sum = step[self.rank], 0.0
        for k, micro in enumerate(mine):
            weight = 1.0 if micro else 0.0
            batch = _collate([self.examples[i] for i in (micro or [self.filler])], self.loop_config["pad_id"],
                             self.device)
            last = k == len(mine) - 1
            if self.engine is not None:  # DeepSpeed reduces and steps at the boundary we mark
                self.engine.set_gradient_accumulation_boundary(last)
            # DDP: skip the all-reduce until the last micro-batch (DeepSpeed's no_sync refuses ZeRO 2/3)
            sync = last or self.engine is not None or not hasattr(self.model, "no_sync")
            with nullcontext() if sync else self.model.no_sync():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                summed = token_loss_sum(logits, batch["labels"]) * weight
                if self.engine is not None:
                    self.engine.backward(summed * scale)
                else:
                    (summed * scale).backward()
            loss_sum += summed.item()
        if self.engine is not None:
            self.engine.step()  # optimizer step and zeroed gradients (the boundary is set)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        total = torch.tensor([loss_sum], dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(total)
        return total.item() / max(tokens, 1), tokens

    def save_checkpoint(self, epoch: int, metrics: dict) -> None:
        """Rank 0 saves adapter + optimizer + losses and reports them; the others report metrics only."""
        import torch
        import ray.train

        adapter = _adapter_state(self.peft_model, gathered=self.cfg.distributed == "zero3")  # all ranks: a collective
        if self.rank != 0:
            ray.train.report(metrics)
            return
        state = {"epoch": epoch, "losses": self.losses, "train_s": self.train_s, "starts": self.starts,
                 "fingerprint": self.loop_config["fingerprint"], "initial_digests": self.initial_digests}
        with tempfile.TemporaryDirectory() as tmp:
            # the peft model itself, never the DDP/DeepSpeed wrapper, with the tensors gathered above
            self.peft_model.save_pretrained(tmp, state_dict=adapter)
            if self.engine is None:  # a ZeRO optimizer's state is sharded across ranks: not kept
                torch.save(self.optimizer.state_dict(), Path(tmp) / OPTIMIZER_FILE)
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            # Ray names the checkpoint dir (unique); a fixed name like epoch_N would collide with
            # the same epoch of an earlier run under this name, and num_to_keep=1 then deletes it.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def _maybe_crash_once(self) -> None:
        marker = self.loop_config.get("crash_once_marker")
        if marker and self.rank == 0 and not Path(marker).exists():
            Path(marker).touch()
            raise RuntimeError(f"injected test crash ({CRASH_ONCE_ENV}={marker}); the retry should resume")


def _adapter_state(model: Any, gathered: bool) -> dict[str, Any]:
    """The LoRA tensors of a peft model, on CPU.

    `gathered`: under ZeRO-3 each rank holds a slice of every parameter; state_dict() would
    return the empty local slices (the known empty-adapter failure), so the LoRA parameters
    are gathered first (every rank must call this). Keys are peft's full names (with the
    adapter name), as save_pretrained(state_dict=...) expects.
    """
    if not gathered:
        return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items() if "lora_" in k}
    import deepspeed

    lora = [param for name, param in model.named_parameters() if "lora_" in name]
    with deepspeed.zero.GatheredParameters(lora, modifier_rank=None):
        return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items() if "lora_" in k}


def initial_digests(model: Any) -> dict[str, str]:
    """tensor_digest of every adapter tensor, by the name it is saved under (before any wrapping)."""
    from peft import get_peft_model_state_dict

    return {k: tensor_digest(v) for k, v in get_peft_model_state_dict(model).items()}


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Summed cross-entropy of next-token predictions over labelled tokens (labels align with inputs)."""
    import torch.nn.functional as F

    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def _collate(batch: list[TokenizedExample], pad_id: int, device: Any) -> dict:
    from bt_ray.train.data import collate

    return {k: v.to(device) for k, v in collate(batch, pad_id).items()}


def _use_bf16(config: TrainConfig, device: Any) -> bool:
    import torch

    if not config.bf16:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return _cpu_has_native_bf16()


def _cpu_has_native_bf16() -> bool:
    import torch

    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private; present since torch 2.1
    return bool(check and check())
