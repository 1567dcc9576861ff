"""bt_ray.BetterTogether(...).compile(strategy="p -> w") as a DSPy user calls it: the shipped model, a real
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


def test_compile_p_w_on_the_shipped_model(ray_cluster, tmp_path):
    splits = load_splits(TaskConfig(), seed=0)
    trainset, valset = splits.train[:16], splits.dev[:6]
    with bt_ray.init(None, [*SMALL, f"output_dir={tmp_path}"]) as session:
        student = IrisProgram()
        student.set_lm(session.lm())  # the pool as a dspy.LM, base model
        optimizer = bt_ray.BetterTogether(metric=metric)
        compiled = optimizer.compile(student, trainset=trainset, valset=valset, strategy="p -> w")
        version = f"{optimizer.run_dir.name}-v1"
        assert version in session.pool.adapters  # Θ's adapter is loaded on the replicas
        with dspy.context(adapter=session.adapter):  # the returned program runs through the pool, as in DSPy
            rescored = dspy.Evaluate(devset=valset, metric=metric, num_threads=8)(compiled).score

    candidates = compiled.candidate_programs
    order = ["", "p", "p -> w"]
    assert sorted(c["strategy"] for c in candidates) == order
    keys = [(c["score"], -order.index(c["strategy"])) for c in candidates]
    assert keys == sorted(keys, reverse=True) and compiled is candidates[0]["program"]
    steps = optimizer.results["steps"]
    assert [s["dev"] for s in steps] == [next(c["score"] for c in candidates if c["strategy"] == s)
                                         for s in order]
    assert set(steps[1]["requests_by_version"]) <= {"base"}  # Π ran on the base model
    assert steps[2]["requests_by_version"].get(version, 0) > 0  # the step after Θ is scored on its adapter
    after_w = next(c["program"] for c in candidates if c["strategy"] == "p -> w")
    assert {p.lm.model.rsplit("@", 1)[1] for p in after_w.predictors()} == {version}
    assert steps[2]["details"]["train"]["steps"] > 0
    assert rescored == candidates[0]["score"]  # same program, same model version, same (cached) answers
    assert bt_ray.current_session() is None and session.pool is None  # shut down; Ray (the fixture's) stays up
    assert ray_cluster.is_initialized()
    assert (optimizer.run_dir / "results.md").exists()


def test_a_dspy_teleprompter_behind_a_key_runs_on_the_adapter(ray_cluster, tmp_path):
    """`fs -> w -> fs` with DSPy's own BootstrapFewShot under the key "fs" (as `gepa -> w -> gepa`): the first
    runs on the base model, the second bootstraps and is scored through the pool on Θ's adapter version."""
    splits = load_splits(TaskConfig(), seed=0)
    trainset, valset = splits.train[:12], splits.dev[:6]
    with bt_ray.init(None, [*SMALL, f"output_dir={tmp_path}"]) as session:
        student = IrisProgram()
        student.set_lm(session.lm())
        fs = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=2, max_labeled_demos=2, max_errors=100)
        optimizer = bt_ray.BetterTogether(metric=metric, w=bt_ray.LoRAFinetune(), fs=fs)
        compiled = optimizer.compile(student, trainset=trainset, valset=valset, strategy="fs -> w -> fs")
        version = f"{optimizer.run_dir.name}-v1"

    steps = optimizer.results["steps"]
    assert [s["strategy"] for s in steps] == ["vanilla", "fs", "fs→Θ", "fs→Θ→fs"]
    assert steps[1]["details"]["optimizer"] == steps[3]["details"]["optimizer"] == "BootstrapFewShot"
    assert set(steps[1]["requests_by_version"]) <= {"base"}  # (empty when DSPy's cache answered every call)
    assert set(steps[3]["requests_by_version"]) == {version}  # its bootstrapping and scoring ran on the adapter
    after_fs = next(c["program"] for c in compiled.candidate_programs if c["strategy"] == "fs -> w -> fs")
    assert {p.lm.model.rsplit("@", 1)[1] for p in after_fs.predictors()} == {version}
