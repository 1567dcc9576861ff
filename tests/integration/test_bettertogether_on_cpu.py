"""bt_ray.BetterTogether(...).compile(strategy="p -> w -> fs") as a DSPy user calls it: the shipped model, a real
local Ray cluster, real DSPy, real LoRA on Ray Train (small subsamples)."""

import dspy
import pytest

import bt_ray
from bt_ray.config import TaskConfig
from bt_ray.tasks.iris import IrisProgram, load_splits, metric

pytestmark = pytest.mark.integration

SMALL = [
    "prompt.train_size=6", "prompt.val_size=6", "prompt.num_candidates=3",
    "inference.max_tokens=80", "inference.cpus_per_replica=1", "train.cpus_per_worker=1",
    # A few traces only: small batches, one epoch, a larger step, every trace kept (the plumbing is tested).
    "train.epochs=1", "train.learning_rate=5e-4", "train.batch_size=2", "train.metric_threshold=0",
]


def test_compile_p_w_fs_on_the_shipped_model(ray_cluster, tmp_path):
    """`p -> w -> fs`: bt-ray's Π on the base model, Θ, then DSPy's own BootstrapFewShot under the key "fs" (as
    `gepa -> w -> gepa` would be), which bootstraps and is scored through the pool on Θ's adapter version."""
    splits = load_splits(TaskConfig(), seed=0)
    trainset, valset = splits.train[:16], splits.dev[:6]
    with bt_ray.init(None, [*SMALL, f"output_dir={tmp_path}"]) as session:
        student = IrisProgram()
        student.set_lm(session.lm())  # the pool as a dspy.LM, base model
        fs = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=2, max_labeled_demos=2, max_errors=100)
        optimizer = bt_ray.BetterTogether(metric=metric, p=bt_ray.PromptOptimizer(), w=bt_ray.LoRAFinetune(),
                                          fs=fs)
        compiled = optimizer.compile(student, trainset=trainset, valset=valset, strategy="p -> w -> fs")
        version = f"{optimizer.run_dir.name}-v1"
        assert version in session.pool.adapters  # Θ's adapter is loaded on the replicas
        with dspy.context(adapter=session.adapter):  # the returned program runs through the pool, as in DSPy
            rescored = dspy.Evaluate(devset=valset, metric=metric, num_threads=8)(compiled).score

    candidates = compiled.candidate_programs
    order = ["", "p", "p -> w", "p -> w -> fs"]
    assert sorted(c["strategy"] for c in candidates) == order
    keys = [(c["score"], -order.index(c["strategy"])) for c in candidates]
    assert keys == sorted(keys, reverse=True) and compiled is candidates[0]["program"]
    steps = optimizer.results["steps"]
    assert [s["strategy"] for s in steps] == ["vanilla", "Π", "Π→Θ", "Π→Θ→fs"]
    assert [s["dev"] for s in steps] == [next(c["score"] for c in candidates if c["strategy"] == s)
                                         for s in order]
    assert set(steps[1]["requests_by_version"]) <= {"base"}  # Π ran on the base model
    assert steps[2]["requests_by_version"].get(version, 0) > 0  # the step after Θ is scored on its adapter
    assert steps[3]["details"]["optimizer"] == "BootstrapFewShot"
    assert set(steps[3]["requests_by_version"]) == {version}  # its bootstrapping and scoring ran on the adapter
    for strategy in ("p -> w", "p -> w -> fs"):
        after = next(c["program"] for c in candidates if c["strategy"] == strategy)
        assert {p.lm.model.rsplit("@", 1)[1] for p in after.predictors()} == {version}
    assert steps[2]["details"]["train"]["steps"] > 0
    assert rescored == candidates[0]["score"]  # same program, same model version, same (cached) answers
    assert bt_ray.current_session() is None and session.pool is None  # shut down; Ray (the fixture's) stays up
    assert ray_cluster.is_initialized()
    assert (optimizer.run_dir / "results.md").exists()
