import os

import pytest

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
