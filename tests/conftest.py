import atexit
import os
import shutil
import tempfile

import pytest

# DSPy's response cache of its own for each test session (before DSPy is imported): no test is answered
# from what an earlier run, of other code, left in ~/.dspy_cache, and CI times do not depend on it.
os.environ["DSPY_CACHEDIR"] = tempfile.mkdtemp(prefix="bt-ray-tests-dspy-cache-")
atexit.register(shutil.rmtree, os.environ["DSPY_CACHEDIR"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _reset_dspy_settings():
    """Each test starts from DSPy's defaults (as DSPy's own test suite does)."""
    import dspy

    yield
    dspy.settings.configure(lm=None, adapter=None, trace=[])


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir():
    """The shipped SmolLM2-135M as a transformers checkpoint (converted once, then cached)."""
    from bt_ray.config import ModelConfig
    from bt_ray.model import resolve_model

    cfg = ModelConfig()
    return str(resolve_model(cfg.name, cfg.cache_dir))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tests/tiny.py's random-weight Llama, written once (GPU tests and the CPU DeepSpeed tests)."""
    from bt_ray.synthetic import random_model
    from tests.tiny import TINY

    return str(random_model(tmp_path_factory.mktemp("tiny-llama"), TINY, vocab_size=512))


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
