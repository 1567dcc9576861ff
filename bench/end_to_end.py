"""End-to-end Π→Θ→Π on Iris: bt-ray against DSPy 3.4.1's own `dspy.BetterTogether`, same model, same data.

bt-ray: `bt_ray.BetterTogether(metric).compile(student, trainset, valset, strategy="p -> w -> p")` on a
bt-ray session (local Ray, one transformers replica, LoRA on Ray Train), the shipped SmolLM2-135M.

DSPy, wired as a DSPy user would without bt-ray:
  * model: a plain `dspy.LM` whose engine calls transformers `model.generate` once per request
    (bench/_common.py, fp32, the same converted SmolLM2-135M), set as the global LM
    (`dspy.configure(lm=...)`) and on the student (`student.set_lm(lm)`), as DSPy's docs say;
  * fine-tuning: that LM's `provider` is `LocalLoRAProvider` below, a `dspy.Provider` whose
    `finetune(job, model, train_data, ...)` trains a LoRA with peft on CPU on the chat data
    BootstrapFinetune hands it, with bt-ray's settings (rank 32, alpha 64, dropout 0, q_proj/k_proj,
    AdamW, the same epochs and learning rate, effective batch 8 of micro-batches of 1, loss on the
    assistant tokens only, bf16 training like bt-ray's trainer on this CPU), merges the adapter into an
    fp32 copy of the model and registers it with the engine under a new model name, which it returns:
    DSPy's `LM._run_finetune_job` then does `lm.copy(model=<that name>)` and BootstrapFinetune binds
    the student to the copy, so the fine-tuned model answers every request naming it;
  * optimizers: DSPy's defaults for "p" and "w" with the sizes of this bench:
    `BootstrapFewShotWithRandomSearch(metric, max_bootstrapped_demos=3, max_labeled_demos=3,
    num_candidate_programs=N-3, num_threads=8)` (its seeds -3..N-4: N candidates, as bt-ray's Π) and
    `BootstrapFinetune(metric, train_kwargs=<the LoRA settings>, num_threads=8)` (DSPy's default
    exclude_demos=False: the demos stay in the training prompts, so bt-ray runs with
    train.include_demos=true to train on the same prompts);
  * `dspy.BetterTogether(metric, p=..., w=...).compile(student, trainset, valset, strategy="p -> w -> p",
    num_threads=8, max_errors=10**4, seed=...)`; max_errors is raised (also in dspy.configure) because
    the 135M model's unparseable answers would otherwise stop DSPy's Evaluate after 10; bt-ray scores
    them 0 and counts them.
Both sides: ChatAdapter without JSON fallback, temperature 0.1, max_tokens 128, DSPy's response cache
off, the same train / validation / test examples. DSPy's BootstrapFewShotWithRandomSearch selects its
candidate on the valset it is given, which is BetterTogether's valset; to do the same work bt-ray's Π
is given that valset too (optimizer_compile_args={"p": {"valset": valset}}) and bootstraps on the whole
trainset (prompt.train_size = the train size).

Scores: each side reports its own validation score per step (DSPy: BetterTogether's Evaluate on the
valset; bt-ray: its evaluator on the same valset). Both returned programs are then scored by this
script with the same evaluator (`dspy.Evaluate(num_threads=8)`, the task's metric) on the same test
examples, each on the model its optimizer bound it to. Model calls are counted per model on both sides
(DSPy: by the engine, per model name; bt-ray: the pool's per-version usage), which shows which model
DSPy's last Π used.

    python bench/end_to_end.py                     # 12 train / 12 val / 20 test, 4 candidates, 5 epochs
    python bench/end_to_end.py --train-size 8 --val-size 8 --test-size 10 --epochs 2
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
import tempfile
import time
from pathlib import Path

from _common import BASE_MODEL, PlainGenerateEngine, load_average, model_dir, plain_lm  # sets the offline env first

import dspy  # noqa: E402
import torch  # noqa: E402

from bt_ray.config import TaskConfig  # noqa: E402
from bt_ray.inference import chat  # noqa: E402
from bt_ray.session import chat_adapter  # noqa: E402
from bt_ray.tasks import get_task  # noqa: E402

STRATEGY = "p -> w -> p"
LORA = {"lora_rank": 32, "lora_alpha": 64, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj"],
        "batch_size": 8}


class LocalLoRAProvider(dspy.Provider):
    """DSPy's fine-tuning hook for the plain engine: a LoRA trained with peft on CPU, merged, served by name."""

    def __init__(self, engine: PlainGenerateEngine, out_dir: str):
        super().__init__()
        self.finetunable = True
        self.engine = engine
        self.out_dir = Path(out_dir)
        self.jobs: list[dict] = []
        self.adapter_dirs: dict[str, Path] = {}  # model name -> its adapter (a Θ after Θ keeps training it)

    def finetune(self, job, model: str, train_data: list[dict], train_data_format, train_kwargs=None) -> str:
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        kw = {**LORA, **(train_kwargs or {})}
        started = time.perf_counter()
        tokenizer = self.engine.tokenizer
        examples = [chat.training_ids(tokenizer, [{"role": m["role"], "content": m["content"]}
                                                  for m in item["messages"]]) for item in train_data]
        base = AutoModelForCausalLM.from_pretrained(self.engine.model_dir, dtype=torch.bfloat16)
        if model in self.adapter_dirs:
            peft_model = PeftModel.from_pretrained(base, self.adapter_dirs[model], is_trainable=True)
        else:
            peft_model = get_peft_model(base, LoraConfig(r=kw["lora_rank"], lora_alpha=kw["lora_alpha"],
                                                         lora_dropout=kw["lora_dropout"],
                                                         target_modules=kw["target_modules"], task_type="CAUSAL_LM"))
        peft_model.train()
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=kw["learning_rate"])
        rng, losses, trained_tokens = random.Random(0), [], 0  # losses: mean batch loss per epoch
        for epoch in range(kw["epochs"]):
            epoch_losses = []
            order = list(range(len(examples)))
            rng.shuffle(order)
            for start in range(0, len(order), kw["batch_size"]):
                group = [examples[i] for i in order[start: start + kw["batch_size"]]]
                tokens = sum(sum(label != -100 for label in labels) for _, labels in group)
                total = 0.0
                for input_ids, labels in group:  # micro-batch 1, loss = mean over the batch's answer tokens
                    logits = peft_model(input_ids=torch.tensor([input_ids])).logits[0, :-1].float()
                    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100,
                                                             reduction="sum") / tokens
                    loss.backward()
                    total += loss.item()
                optimizer.step()
                optimizer.zero_grad()
                epoch_losses.append(total)
                trained_tokens += tokens
            losses.append(sum(epoch_losses) / max(1, len(epoch_losses)))
        name = f"{BASE_MODEL}:ft{len(self.jobs) + 1}"
        adapter_dir = self.out_dir / name.replace("/", "_").replace(":", "_")
        peft_model.save_pretrained(adapter_dir)
        served = AutoModelForCausalLM.from_pretrained(self.engine.model_dir, dtype=torch.float32)
        served = PeftModel.from_pretrained(served, adapter_dir).merge_and_unload().eval()
        self.engine.models[name] = served
        self.adapter_dirs[name] = adapter_dir
        self.jobs.append({"model": name, "from": model, "examples": len(examples), "epochs": kw["epochs"],
                          "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                          "trained_tokens": trained_tokens, "seconds": time.perf_counter() - started})
        print(f"LocalLoRAProvider: {len(examples)} examples x {kw['epochs']} epochs, epoch loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f}, {trained_tokens} answer tokens, {self.jobs[-1]['seconds']:.0f} s -> {name}",
              flush=True)
        return name


def _watch_steps(optimizers: dict, engine: PlainGenerateEngine, log: list, valset: list) -> None:
    """Record each DSPy step's compile: wall time, calls per model, and whether it was handed the valset."""
    for key, optimizer in optimizers.items():
        original = optimizer.compile

        @functools.wraps(original)
        def compile(student, *args, _key=key, _original=original, **kwargs):
            before, started = dict(engine.calls), time.perf_counter()
            try:
                return _original(student, *args, **kwargs)
            finally:
                calls = {m: n - before.get(m, 0) for m, n in engine.calls.items() if n - before.get(m, 0)}
                given = kwargs.get("valset")
                log.append({"key": _key, "seconds": time.perf_counter() - started, "calls": calls,
                            "selects_on_valset": given is not None and [x for x in given] == list(valset),
                            "student_model": [p.lm.model if p.lm else None for p in student.predictors()]})

        optimizer.compile = compile


def run_dspy(task, train, val, test, args, out_dir: str) -> dict:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    setup = time.perf_counter()
    engine = PlainGenerateEngine(model_dir())
    provider = LocalLoRAProvider(engine, out_dir)
    lm = plain_lm(engine, temperature=args.temperature, max_tokens=args.max_tokens, provider=provider)
    dspy.configure(lm=lm, adapter=chat_adapter(), max_errors=10**4)
    train_kwargs = {**LORA, "epochs": args.epochs, "learning_rate": args.learning_rate}
    optimizers = {
        "p": dspy.BootstrapFewShotWithRandomSearch(metric=task.metric, max_bootstrapped_demos=3, max_labeled_demos=3,
                                                   num_candidate_programs=args.candidates - 3, num_threads=8,
                                                   max_errors=10**4),
        "w": dspy.BootstrapFinetune(metric=task.metric, train_kwargs=train_kwargs, num_threads=8),
    }
    steps: list[dict] = []
    _watch_steps(optimizers, engine, steps, val)
    student = task.build_program()
    student.set_lm(lm)
    started = time.perf_counter()
    compiled = dspy.BetterTogether(metric=task.metric, **optimizers).compile(
        student, trainset=list(train), valset=list(val), strategy=STRATEGY, num_threads=8, max_errors=10**4,
        seed=args.seed)
    seconds, setup = time.perf_counter() - started, started - setup
    compile_calls = dict(engine.calls)
    test_score, test_calls = _test(compiled, test, task.metric, engine)
    by_strategy = {c["strategy"]: c["score"] for c in compiled.candidate_programs}
    return {"seconds": seconds, "setup": setup, "compile_calls": compile_calls, "test": test_score,
            "test_calls": test_calls,
            "scores": [by_strategy.get(s) for s in _prefixes()], "returned": compiled.candidate_programs[0]["strategy"],
            "returned_model": sorted({p.lm.model for p in compiled.predictors()}), "steps": steps,
            "finetunes": provider.jobs, "error": compiled.flag_compilation_error_occurred}


def run_bt_ray(task, train, val, test, args, out_dir: str) -> dict:
    import bt_ray

    overrides = [f"output_dir={out_dir}", f"seed={args.seed}", f"inference.temperature={args.temperature}",
                 f"inference.max_tokens={args.max_tokens}", f"prompt.train_size={len(train)}",
                 f"prompt.num_candidates={args.candidates}", f"train.epochs={args.epochs}",
                 f"train.learning_rate={args.learning_rate}", "train.include_demos=true",
                 f"train.lora_rank={LORA['lora_rank']}", f"train.lora_alpha={LORA['lora_alpha']}",
                 f"inference.request_timeout_s={args.request_timeout}", f"inference.torch_threads={args.torch_threads}",
                 f"train.torch_threads={args.torch_threads}"]
    setup = time.perf_counter()
    with bt_ray.init(None, overrides) as session:
        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
        student = task.build_program()
        student.set_lm(session.lm())
        optimizer = bt_ray.BetterTogether(metric=task.metric)
        started = time.perf_counter()
        compiled = optimizer.compile(student, trainset=list(train), valset=list(val), strategy=STRATEGY,
                                     seed=args.seed, optimizer_compile_args={"p": {"valset": list(val)}})
        seconds, setup = time.perf_counter() - started, started - setup
        usage = session.pool.usage_snapshot()
        compile_calls = dict(usage.by_version)
        with dspy.context(adapter=session.adapter):
            test_score, _ = _test(compiled, test, task.metric, None)
        test_calls = session.pool.usage_snapshot().since(usage).by_version
    steps = optimizer.results["steps"]
    by_strategy = {candidate["strategy"]: candidate["score"] for candidate in compiled.candidate_programs}
    return {"seconds": seconds, "setup": setup, "compile_calls": compile_calls, "test": test_score,
            "test_calls": test_calls,
            "scores": [by_strategy.get(s) for s in _prefixes()], "returned": compiled.candidate_programs[0]["strategy"],
            "returned_model": sorted({p.lm.model for p in compiled.predictors()}), "steps": steps,
            "run_dir": str(optimizer.run_dir)}


def _prefixes() -> list[str]:
    parts = STRATEGY.split(" -> ")
    return [" -> ".join(parts[:i]) for i in range(len(parts) + 1)]


def _test(program, test: list, metric, engine) -> tuple[float, dict]:
    before = dict(engine.calls) if engine else {}
    result = dspy.Evaluate(devset=test, metric=metric, num_threads=8, display_progress=False,
                           max_errors=len(test) * 10)(program)
    calls = {m: n - before.get(m, 0) for m, n in engine.calls.items() if n - before.get(m, 0)} if engine else {}
    return round(float(result.score), 1), calls


def _fmt(score) -> str:
    return "-" if score is None else f"{score:.1f}"


def _calls(calls: dict) -> str:
    short = {m.replace(BASE_MODEL, "base").replace("base:", ""): n for m, n in calls.items()}
    return ", ".join(f"{m} {n}" for m, n in sorted(short.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=12)
    parser.add_argument("--val-size", type=int, default=12)
    parser.add_argument("--test-size", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=4, help="candidates per Π (seeds -3..N-4; >= 3)")
    parser.add_argument("--epochs", type=int, default=5, help="LoRA epochs (quickstart: 5)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="LoRA learning rate (quickstart: 1e-4)")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch threads for each side (0: all cores); 1 avoids OpenMP collapse on a busy machine")
    parser.add_argument("--request-timeout", type=float, default=3600.0,
                        help="bt-ray's inference.request_timeout_s (a busy shared machine can exceed the default 600)")
    parser.add_argument("--only", choices=["bt-ray", "dspy"], help="run one side (no ratio)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.getLogger("dspy").setLevel(logging.WARNING)

    task = get_task("iris")
    splits = task.load_splits(TaskConfig(), args.seed)
    train, val, test = splits.train[: args.train_size], splits.dev[: args.val_size], splits.test[: args.test_size]
    print(f"Π→Θ→Π on Iris: {len(train)} train / {len(val)} validation / {len(test)} test examples, {args.candidates} "
          f"candidates per Π, LoRA r{LORA['lora_rank']} a{LORA['lora_alpha']} q_proj,k_proj {args.epochs} epochs "
          f"lr {args.learning_rate}, temperature {args.temperature}, max_tokens {args.max_tokens}", flush=True)

    results, loads = {}, {}
    with tempfile.TemporaryDirectory() as out:
        for side, run in (("bt-ray", run_bt_ray), ("dspy", run_dspy)):
            if args.only and args.only != side:
                continue
            loads[side] = [load_average()]
            print(f"\n=== {side} (before: {loads[side][0]})", flush=True)
            results[side] = run(task, train, val, test, args, str(Path(out) / side))
            loads[side].append(load_average())
            r = results[side]
            print(f"=== {side} done: compile {r['seconds']:.0f} s, val per step {r['scores']}, returned "
                  f"{r['returned']!r}, test {r['test']}, calls {r['compile_calls']} (after: {loads[side][1]})",
                  flush=True)
    report(results, loads)


def report(results: dict, loads: dict) -> None:
    names = {"bt-ray": "bt-ray BetterTogether", "dspy": "dspy.BetterTogether (plain LM + LoRA provider)"}
    print(f"\n{'side':46} {'setup s':>7} {'wall s':>7} {'x':>5}  {'val: start':>10} {'p':>5} {'p>w':>5} {'p>w>p':>6}  "
          f"{'returned':>9} {'test':>5}  model calls (compile; test)")
    dspy_s = results.get("dspy", {}).get("seconds")
    for side, r in results.items():
        ratio = f"{dspy_s / r['seconds']:5.2f}" if dspy_s else "    -"
        start, p, pw, pwp = (_fmt(s) for s in r["scores"])
        print(f"{names[side]:46} {r['setup']:7.0f} {r['seconds']:7.0f} {ratio}  {start:>10} {p:>5} {pw:>5} {pwp:>6}  "
              f"{r['returned'] or 'start':>9} {r['test']:5.1f}  {sum(r['compile_calls'].values())} "
              f"({_calls(r['compile_calls'])}); {sum(r['test_calls'].values())}")
    print("setup: start Ray + replica (bt-ray) or load the model (DSPy); wall: compile(), x: DSPy's wall / this. "
          "val: each side's own validation score per step (the same valset; DSPy's Evaluate, bt-ray's evaluator). "
          "test: this script's dspy.Evaluate on the same test examples, each returned program on its own model.")
    if "bt-ray" in results:
        print("\nbt-ray steps (from its results table):")
        for row in results["bt-ray"]["steps"]:
            print(f"  {row['strategy'] or 'vanilla':10} version {row['version']:28} val {_fmt(row['dev'])}  "
                  f"{row['wall_s']:.0f} s  {row['requests']} calls")
    if "dspy" in results:
        r = results["dspy"]
        print("\nDSPy steps (optimizer compile only; BetterTogether's valset scoring comes after each):")
        for step in r["steps"]:
            print(f"  {step['key']}: {step['seconds']:.0f} s, calls {_calls(step['calls'])}, student bound to "
                  f"{step['student_model']}")
        for job in r["finetunes"]:
            print(f"  LoRA {job['model']}: {job['examples']} passing traces x {job['epochs']} epochs, epoch loss "
                  f"{job['first_loss']:.3f} -> {job['last_loss']:.3f}, {job['seconds']:.0f} s")
        print("\nDSPy defects seen in this run:")
        for line in defects(r):
            print(f"  - {line}")
    for side, (before, after) in loads.items():
        print(f"load during {side}: before {before}; after {after}")


def defects(r: dict) -> list[str]:
    found = []
    finetuned = {job["model"] for job in r["finetunes"]}
    p_steps = [s for s in r["steps"] if s["key"] == "p"]
    if finetuned and len(p_steps) > 1:
        last = p_steps[-1]
        base = sum(n for m, n in last["calls"].items() if m not in finetuned)
        tuned = sum(n for m, n in last["calls"].items() if m in finetuned)
        if base:
            found.append(f"Π after Θ ran {base} of its {base + tuned} calls on the base model, not the fine-tuned "
                         f"one (BootstrapFewShotWithRandomSearch resets the predictors' LMs, so bootstrapping and "
                         f"candidate scoring fall back to the global LM), while the program it returns is bound to "
                         f"{last['student_model']} again afterwards")
        else:
            found.append(f"(not seen) Π after Θ ran all {tuned} calls on the fine-tuned model")
    if any(s["selects_on_valset"] for s in p_steps):
        found.append("the validation set both selects and reports: each Π picks its candidate on BetterTogether's "
                     "valset, whose score on the same examples is then reported and used to pick the returned "
                     "program (compare the val and test columns)")
    for job in r["finetunes"]:
        if job["examples"] < 8:
            found.append(f"Θ trained on only {job['examples']} passing traces (one trace per train example, fewer "
                         f"than one batch of 8)")
    if r["error"]:
        found.append("a step failed and BetterTogether returned the best program so far "
                     "(flag_compilation_error_occurred=True; see the log above)")
    if not finetuned:
        found.append("no fine-tune happened")
    return found or ["none detected"]


if __name__ == "__main__":
    main()
