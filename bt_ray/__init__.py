"""bt-ray: BetterTogether (prompt optimization + LoRA fine-tuning of DSPy programs) at scale on Ray.

    import bt_ray
    with bt_ray.init(None, ["train.epochs=2"]) as session:      # Ray, the model, the inference pool
        student.set_lm(session.lm())                             # a dspy.LM whose calls go to the pool
        compiled = bt_ray.BetterTogether(metric=metric).compile(student, trainset=trainset, strategy="p -> w")
"""

__version__ = "0.1.0"

# Imported on first use, so `bt-ray config` and the CLI's start stay fast.
_EXPORTS = {
    "BetterTogether": "bt_ray.bettertogether",
    "PromptOptimizer": "bt_ray.optimizers",
    "LoRAFinetune": "bt_ray.optimizers",
    "Session": "bt_ray.session",
    "init": "bt_ray.session",
    "shutdown": "bt_ray.session",
    "current_session": "bt_ray.session",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bt_ray' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
